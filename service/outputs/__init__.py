"""Outputs of /explain, registered in one place.

An output turns the pipeline's :class:`~service.pipeline.Result` (arrays) into an answer
(see :class:`~service.outputs.base.Output`). JSON answers ``application/json``; the DICOM
outputs answer ``application/dicom`` or ``multipart/related; type="application/dicom"``,
and as every DICOM object shares that media type, the ``dicom`` parameter names which one.
A new DICOM output is one module with an :class:`Output` subclass and one line below.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType
from typing import Final

from service.outputs.base import Output, Packaging
from service.outputs.json_maps import JsonMaps
from service.outputs.secondary_capture import SecondaryCaptures
from service.outputs.structured_report import StructuredReport

# ---- The registry. The first DICOM output is the ``dicom`` parameter's default. ----
JSON_OUTPUT: Final[Output] = JsonMaps()
DICOM_OUTPUTS: Final[MappingProxyType[str, Output]] = MappingProxyType({
    o.name: o for o in (
        SecondaryCaptures(),
        StructuredReport(),
    )
})
# --------------------------------------------------------------------------------------

DicomObject = StrEnum("DicomObject", {name.upper(): name for name in DICOM_OUTPUTS})  # type: ignore[misc]
"""The ``dicom`` parameter: which DICOM object a DICOM answer holds."""


def for_packaging(packaging: Packaging, dicom: str) -> Output:
    """The output answering in ``packaging``; ``dicom`` names the DICOM object."""
    if packaging is Packaging.JSON:
        return JSON_OUTPUT
    return DICOM_OUTPUTS[dicom]


__all__ = ["DICOM_OUTPUTS", "JSON_OUTPUT", "DicomObject", "Output", "Packaging",
           "for_packaging"]

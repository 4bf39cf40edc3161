"""Outputs of /explain, registered in one place.

An output turns the pipeline's :class:`~service.pipeline.Result` (arrays) into an answer
(see :class:`~service.outputs.base.Output`). JSON answers ``application/json``; the DICOM
outputs answer ``application/dicom`` or ``multipart/related; type="application/dicom"``,
and as every DICOM object shares that media type, the ``dicom`` parameter names which ones
(several answer together in multipart/related: :mod:`service.outputs.several`).
A new DICOM output is one module with a :class:`DicomOutput` subclass and one line below.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from service.outputs.base import DicomOutput, Output, Packaging
from service.outputs.json_maps import JsonMaps
from service.outputs.presentation_state import PresentationState
from service.outputs.secondary_capture import SecondaryCaptures
from service.outputs.segmentation import Segments
from service.outputs.several import SeveralObjects
from service.outputs.structured_report import StructuredReport

# ---- The registry. The first DICOM output is the ``dicom`` parameter's default. ----
JSON_OUTPUT: Final[Output] = JsonMaps()
DICOM_OUTPUTS: Final[MappingProxyType[str, DicomOutput]] = MappingProxyType({
    o.name: o for o in (
        SecondaryCaptures(),
        StructuredReport(),
        PresentationState(),
        Segments(),
    )
})
# --------------------------------------------------------------------------------------

DicomObject = StrEnum("DicomObject", {name.upper(): name for name in DICOM_OUTPUTS})  # type: ignore[misc]
"""An item of the ``dicom`` parameter: a DICOM object a DICOM answer holds."""


def for_packaging(packaging: Packaging, dicom: Sequence[str]) -> Output | None:
    """The output answering in ``packaging``; ``dicom`` names the DICOM objects. None when
    the packaging cannot carry them (several objects as one application/dicom body)."""
    if packaging is Packaging.JSON:
        return JSON_OUTPUT
    if len(dicom) == 1:
        return DICOM_OUTPUTS[dicom[0]]
    several = SeveralObjects([DICOM_OUTPUTS[name] for name in dicom])
    return several if packaging in several.packagings else None


__all__ = ["DICOM_OUTPUTS", "JSON_OUTPUT", "DicomObject", "DicomOutput", "Output", "Packaging",
           "for_packaging"]

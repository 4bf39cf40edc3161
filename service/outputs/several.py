"""``dicom=sc,sr``: several DICOM outputs from one computation, as one multipart/related.

A PACS integration that files both the captures and the report of an image asks once; the
image is decoded and explained once, and each output writes its objects from the same
result, in the order the parameter names them. Only multipart/related carries several
objects: ``application/dicom`` is one object, so it gives way to the next acceptable
packaging (or a 406).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from service.imaging.base import DecodedImage
from service.outputs.base import DicomOutput, Encoded, Packaging
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax
from service.pipeline import ExplainOptions, Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams
    from service.models.repository import Served


class SeveralObjects(DicomOutput):
    """The objects of ``outputs``, one after the other."""

    name: ClassVar[str] = "several"
    summary: ClassVar[str] = "the objects of several DICOM outputs in one multipart/related"
    packagings: ClassVar[frozenset[Packaging]] = frozenset({Packaging.MULTIPART})

    def __init__(self, outputs: Sequence[DicomOutput]) -> None:
        self.outputs = tuple(outputs)
        self.full_resolution = any(o.full_resolution for o in self.outputs)
        self.needs = "; ".join(f"dicom={o.name}: {o.needs}" for o in self.outputs)

    def accepts(self, image: DecodedImage) -> bool:
        return all(o.accepts(image) for o in self.outputs)

    def lacking(self, image: DecodedImage) -> str:
        # Only the objects that cannot be made of this image: the others could be.
        return "; ".join(f"dicom={o.name}: {o.needs}" for o in self.outputs
                         if not o.accepts(image))

    def options(self, params: ExplainParams, model: Served,
                packaging: Packaging) -> ExplainOptions:
        # Every output is asked (each may refuse a parameter); in multipart/related none
        # narrows what the parameters ask, so one computation serves them all.
        wanted = {o.options(params, model, packaging) for o in self.outputs}
        if len(wanted) != 1:
            raise AssertionError("DICOM outputs asking for different computations")
        return wanted.pop()

    def objects(self, result: Result, params: ExplainParams, packaging: Packaging,
                syntax: TransferSyntax = DEFAULT) -> list[Encoded]:
        return [obj for o in self.outputs
                for obj in o.objects(result, params, packaging, syntax)]

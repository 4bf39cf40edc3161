"""What an output is: it turns one :class:`~service.pipeline.Result` into an HTTP answer.

Each output declares what it needs from the request path (full-resolution pixels, a DICOM
source study), may narrow what is computed (:meth:`Output.options`), and writes the body.
The route picks one by content negotiation and never looks inside.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Final, NamedTuple

from starlette.responses import Response

from service.imaging.base import DecodedImage
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax, media_type
from service.pipeline import ExplainOptions, Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams
    from service.models.repository import Served

DICOM: Final[str] = "application/dicom"
MULTIPART_DICOM: Final[str] = 'multipart/related; type="application/dicom"'
JSON: Final[str] = "application/json"


class Packaging(Enum):
    """How an answer travels, as negotiated from the Accept header (server order first)."""

    JSON = JSON
    DICOM = DICOM  # one DICOM object as the whole body
    MULTIPART = MULTIPART_DICOM  # DICOM objects as the parts of multipart/related


class Output(ABC):
    """One kind of answer to /explain.

    Attributes (of the class; ``full_resolution`` and ``needs`` may be an instance's, as
    for several outputs answering together: service.outputs.several):
        name: the registry key (for DICOM outputs, the ``dicom`` parameter's value).
        summary: one line for the docs.
        packagings: the packagings it answers in.
        full_resolution: whether it draws on the image's full-resolution pixels (then a
            JPEG 2000 upload is never decoded at a reduced resolution for it).
        needs: what an upload must be for this output, for the 406 when it is not.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    packagings: ClassVar[frozenset[Packaging]]
    full_resolution: bool = False
    needs: str = ""

    def accepts(self, image: DecodedImage) -> bool:
        """Whether this output can answer for the decoded upload."""
        return True

    def lacking(self, image: DecodedImage) -> str:
        """What this output needs that ``image`` is not, for the 406 (it does not accept
        the image)."""
        return self.needs

    def options(self, params: ExplainParams, model: Served,
                packaging: Packaging) -> ExplainOptions:
        """What the pipeline computes for this output.

        Raises:
            InvalidParameter: for parameters this output cannot honour.
        """
        return params.options()

    @abstractmethod
    def render(self, result: Result, params: ExplainParams, packaging: Packaging,
               syntax: TransferSyntax = DEFAULT) -> Response:
        """The HTTP answer; ``syntax`` is the negotiated transfer syntax of DICOM objects."""


class Encoded(NamedTuple):
    """One DICOM object as a Part 10 file, and the transfer syntax it is written in."""

    data: bytes
    transfer_syntax: TransferSyntax


class DicomOutput(Output):
    """An output of DICOM objects: one as the whole body, or the parts of multipart/related
    (RFC 2387)."""

    packagings: ClassVar[frozenset[Packaging]] = frozenset({Packaging.DICOM,
                                                            Packaging.MULTIPART})

    @abstractmethod
    def objects(self, result: Result, params: ExplainParams, packaging: Packaging,
                syntax: TransferSyntax = DEFAULT) -> list[Encoded]:
        """The encoded objects (exactly one for ``Packaging.DICOM``), their Pixel Data in
        ``syntax`` (an object without Pixel Data is in the default syntax)."""

    def render(self, result: Result, params: ExplainParams, packaging: Packaging,
               syntax: TransferSyntax = DEFAULT) -> Response:
        parts = self.objects(result, params, packaging, syntax)
        result.watch.lap("render")
        headers = {"Vary": "Accept"}
        if packaging is Packaging.DICOM:
            (part,) = parts
            return Response(part.data, media_type=media_type(DICOM, part.transfer_syntax),
                            headers=headers)
        body, boundary = multipart_related(parts)
        # The transfer-syntax parameter of the whole is its first part's (PS3.18 8.7.3.4).
        return Response(body, headers=headers, media_type=(
            f"{media_type(MULTIPART_DICOM, parts[0].transfer_syntax)}; boundary={boundary}"))


def multipart_related(parts: list[Encoded]) -> tuple[bytes, str]:
    """A multipart/related body of DICOM parts, each with its media type, and its boundary."""
    boundary = secrets.token_hex(16)
    while any(boundary.encode() in part.data for part in parts):
        boundary = secrets.token_hex(16)
    chunks = []
    for part in parts:
        chunks += [b"--", boundary.encode(), b"\r\nContent-Type: ",
                   media_type(DICOM, part.transfer_syntax).encode(), b"\r\n\r\n", part.data,
                   b"\r\n"]
    chunks += [b"--", boundary.encode(), b"--\r\n"]
    return b"".join(chunks), boundary


def not_for_diagnosis(model: Served) -> bool:
    """Whether the model's description marks it as a demo, not for diagnosis."""
    description = model.config.description.lower()
    return "synthetic" in description or "not for diagnosis" in description


__all__ = ["DICOM", "JSON", "MULTIPART_DICOM", "DicomOutput", "Encoded", "Output", "Packaging",
           "multipart_related", "not_for_diagnosis"]

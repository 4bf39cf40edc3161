"""The transfer syntaxes DICOM answers are written in, registered in one place.

A client picks one as DICOMweb clients do, with the ``transfer-syntax`` parameter of the
media type it accepts (PS3.18 8.7.3.5): ``application/dicom;
transfer-syntax=1.2.840.10008.1.2.4.80``, or the same parameter beside ``type`` on
``multipart/related``. Without the parameter the answer is Explicit VR Little Endian, the
default of DICOMweb payloads (PS3.18 8.7.3.4); ``transfer-syntax=*`` leaves the choice to
the server, which takes that default too.

Only Pixel Data is compressed. An object without it (the Structured Report) is written in
Explicit VR Little Endian whatever was asked, as WADO does where a requested syntax cannot
apply; its part of a multipart answer says so in its own Content-Type.

A Secondary Capture of a 1841×1955 radiograph (1841×2292 RGB with its caption) measured
12.7 MB uncompressed, 11.4 MB in RLE, 3.4 MB in JPEG-LS, 1.7 MB in JPEG 2000 (both
lossless) and 0.7 MB in lossy baseline JPEG: see BENCHMARKS.md for what each costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

__all__ = ["DEFAULT", "TRANSFER_SYNTAXES", "TransferSyntax", "media_type"]


@dataclass(frozen=True)
class TransferSyntax:
    """One transfer syntax an answer can be written in.

    Attributes:
        uid: the Transfer Syntax UID.
        colour: the Photometric Interpretation that RGB pixels take in it (JPEG 2000
            lossless codes them with its reversible colour transform, baseline JPEG as
            subsampled YCbCr; highdicom converts the RGB it is given).
        lossy_method: for a lossy syntax, its Lossy Image Compression Method (0028,2114);
            None for a lossless one.
    """

    uid: UID
    colour: str = "RGB"
    lossy_method: str | None = None

    @property
    def compressed(self) -> bool:
        return self.uid != ExplicitVRLittleEndian


# ---- The registry, in the server's order of preference: the first is the default. ----
TRANSFER_SYNTAXES: Final[MappingProxyType[str, TransferSyntax]] = MappingProxyType({
    t.uid: t for t in (
        TransferSyntax(ExplicitVRLittleEndian),
        TransferSyntax(JPEGLSLossless),
        TransferSyntax(JPEG2000Lossless, colour="YBR_RCT"),
        TransferSyntax(RLELossless),
        TransferSyntax(JPEGBaseline8Bit, colour="YBR_FULL_422", lossy_method="ISO_10918_1"),
    )
})
# ---------------------------------------------------------------------------------------

DEFAULT: Final[TransferSyntax] = next(iter(TRANSFER_SYNTAXES.values()))


def media_type(base: str, syntax: TransferSyntax) -> str:
    """``base`` with the transfer-syntax parameter a compressed object's media type carries
    (PS3.18 8.7.3.4: optional, and left out, for Explicit VR Little Endian)."""
    return f"{base}; transfer-syntax={syntax.uid}" if syntax.compressed else base

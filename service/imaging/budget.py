"""The memory one decode takes, worked out from headers before any pixel is decoded.

A pixel count alone does not bound memory: a grey 8-bit PNG and an RGB 16-bit one of the
same size differ sixfold, and the 0..1 float32 conversion, the colour handling and the
codecs hold their own image-sized arrays. Each decoder describes what it is about to do as
a :class:`Footprint` (bytes per pixel of every array it holds at its peak, plus buffers of
their own size such as a parsed DICOM dataset) and :func:`check` refuses it over the
request's budget. The per-pixel costs below were measured with ``tracemalloc`` on real
files (tests/imaging/test_budget.py checks that each estimate bounds the measured peak).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from service.errors import DecodeBudgetExceeded

# Sized for chest radiographs, what the service is for: the largest detectors (43 cm at
# 100 um, ~4300 x 4300 at 16 bits) take ~150 MB decoded from native DICOM and ~205 MB from
# JPEG 2000, and uncompressed mammograms of up to ~29 megapixels fit too; a 7000 x 7000
# image (49 MP, a 47 KB PNG) does not. See Settings.max_decode_bytes.
DEFAULT_MAX_DECODE_BYTES: Final[int] = 224 << 20

# The 0..1 float32 image every decoder returns: one sample (grey) or three (colour).
FLOAT32: Final[int] = 4
# DICOM paths that convert through float64 arrays (colour, palette, float or 32-bit grey,
# the per-pixel LUT pipeline): several 8-byte arrays per output sample at once; measured
# 35-57 bytes per pixel for grey and 50-74 for colour, float32 result included.
FLOAT64_PIPELINE_PER_SAMPLE: Final[int] = 24
# OpenJPEG decodes into 32-bit integers per sample before the copy into the output array.
OPENJPEG_PER_SAMPLE: Final[int] = 4


@dataclass(frozen=True)
class Footprint:
    """What a decode holds at its peak, as declared by the headers.

    Attributes:
        what: the format, for the error detail ("PNG", "DICOM", ...).
        width: pixels per row of the decoded image.
        height: rows of the decoded image.
        bytes_per_pixel: every image-sized array held at the peak, per pixel (decoder output
            samples x bytes per sample, codec buffers, conversions, the float32 result).
        fixed_bytes: buffers not proportional to the pixel count (a parsed or inflated
            DICOM dataset).
    """

    what: str
    width: int
    height: int
    bytes_per_pixel: int
    fixed_bytes: int = 0

    @property
    def total(self) -> int:
        """The estimated peak in bytes."""
        return self.width * self.height * self.bytes_per_pixel + self.fixed_bytes


def check(footprint: Footprint, max_bytes: int) -> None:
    """Refuse a decode whose footprint exceeds the budget.

    Raises:
        DecodeBudgetExceeded: ``footprint.total`` > ``max_bytes``.
    """
    if footprint.total > max_bytes:
        raise DecodeBudgetExceeded(
            f"decoding this {footprint.what} image ({footprint.width}x{footprint.height}) "
            f"would take about {_mib(footprint.total)} MiB of memory; the limit is "
            f"{_mib(max_bytes)} MiB"
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f}"

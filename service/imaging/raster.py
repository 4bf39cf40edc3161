"""PNG and JPEG decoding with OpenCV, guarded against decompression bombs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np

from service.errors import InvalidImage, PayloadTooLarge
from service.imaging import budget
from service.imaging.base import DecodedImage
from service.imaging.budget import DEFAULT_MAX_DECODE_BYTES

DEFAULT_MAX_PIXELS: Final[int] = 50_000_000

PNG_SIGNATURE: Final[bytes] = b"\x89PNG\r\n\x1a\n"
JPEG_SOI: Final[bytes] = b"\xff\xd8\xff"

# Start-of-frame markers that carry the image size: SOF0..SOF15 minus DHT (C4), JPG (C8)
# and DAC (CC), plus JPEG-LS SOF55 (F7) so DICOM JPEG-LS codestreams can be checked too.
_JPEG_SOF_MARKERS: Final[frozenset[int]] = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
)
# Markers without a length field: TEM, RST0..RST7 (SOI/EOI never occur mid-header).
_JPEG_STANDALONE_MARKERS: Final[frozenset[int]] = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS: Final[int] = 0xDA

# How OpenCV decodes: any colour and depth, alpha dropped (it says nothing about the
# pixels a network sees), and the EXIF orientation (a JPEG's APP1, a PNG's eXIf chunk)
# applied, so the image is the one viewers and browsers show and every coordinate of an
# answer is in that picture; IMREAD_UNCHANGED would ignore the orientation.
_IMREAD_FLAGS: Final[int] = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH

# Samples per pixel _IMREAD_FLAGS gives per PNG colour type: grey (with or without tRNS),
# -, RGB, palette (expanded to BGR), grey + alpha (expanded to BGR), -, RGBA (to BGR).
_PNG_SAMPLES: Final[dict[int, int]] = {0: 1, 2: 3, 3: 3, 4: 3, 6: 3}


@dataclass(frozen=True)
class RasterHeader:
    """What a PNG or JPEG header says about the pixels the decoder will produce."""

    width: int
    height: int
    samples: int  # per pixel, as OpenCV decodes them
    bytes_per_sample: int

    def footprint(self, what: str) -> budget.Footprint:
        """The decode's peak: OpenCV's array, then the 0..1 float32 image (see
        :func:`_decode_raster`): grey costs the decoded samples plus 4 bytes; colour adds
        a reordered (or grey) copy and a 3-sample float32 image. That also bounds OpenCV
        turning an image to its EXIF orientation, which holds the decoded image twice
        (at most 2 × 2 bytes a grey pixel, 2 × 6 a colour one) before either exists."""
        decoded = self.samples * self.bytes_per_sample
        if self.samples == 1:
            per_pixel = decoded + budget.FLOAT32
        else:
            per_pixel = decoded + 3 * self.bytes_per_sample + 3 * budget.FLOAT32
        return budget.Footprint(what, self.width, self.height, per_pixel)


def png_header(data: bytes) -> RasterHeader:
    """Read a PNG's IHDR chunk without decoding.

    Args:
        data: the PNG file bytes (only the IHDR chunk is looked at).

    Returns:
        Size, samples and sample size as OpenCV will decode them.

    Raises:
        InvalidImage: the bytes do not start with a PNG signature and an IHDR chunk.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidImage("PNG data could not be decoded (no PNG signature)")
    # IHDR must be the first chunk: 4-byte length, b"IHDR", width, height, bit depth and
    # colour type.
    if len(data) < 26 or data[12:16] != b"IHDR":
        raise InvalidImage("PNG data could not be decoded (truncated or missing IHDR header)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    samples = _PNG_SAMPLES.get(colour_type, 3)
    return RasterHeader(int(width), int(height), samples, 2 if bit_depth > 8 else 1)


def jpeg_header(data: bytes) -> RasterHeader:
    """Read a JPEG's first start-of-frame segment.

    Walks the marker segments up to the first SOFn (JPEG-LS SOF55 included); entropy-coded
    data is never touched, so this costs a few hundred bytes of parsing at most.

    Args:
        data: a JPEG (or JPEG-LS) codestream.

    Returns:
        Size, components (four-component CMYK counted as four: the codec holds them) and
        sample size (precision over 8 bits: 2 bytes), as the frame header declares them.

    Raises:
        InvalidImage: no SOI marker, a malformed segment, or no frame header before the scan.
    """
    if not data.startswith(b"\xff\xd8"):
        raise InvalidImage("JPEG data could not be decoded (no JPEG start-of-image marker)")
    pos = 2
    size = len(data)
    while pos < size:
        if data[pos] != 0xFF:
            raise InvalidImage("JPEG data could not be decoded (corrupt marker segment)")
        # Any number of 0xFF fill bytes may precede a marker code.
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if pos + 2 > size:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise InvalidImage("JPEG data could not be decoded (corrupt marker segment)")
        if marker in _JPEG_SOF_MARKERS:
            if pos + 8 > size:
                break
            # Lf, P, Y, X, Nf (ITU-T T.81 B.2.2).
            precision, height, width, components = struct.unpack(
                ">BHHB", data[pos + 2 : pos + 8]
            )
            if height == 0:
                # Height 0 defers the size to a DNL marker after the first scan: the size
                # cannot be bounded up front, and OpenCV's libjpeg rejects it anyway.
                raise InvalidImage("JPEG data with a deferred (DNL) height is not supported")
            samples = 1 if components == 1 else max(3, min(components, 4))
            return RasterHeader(int(width), int(height), samples, 2 if precision > 8 else 1)
        if marker == _JPEG_SOS:
            raise InvalidImage("JPEG data could not be decoded (no frame header before scan)")
        pos += length
    raise InvalidImage("JPEG data could not be decoded (truncated header)")


def check_pixel_count(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse images whose declared size exceeds the pixel budget.

    Args:
        width: declared width in pixels.
        height: declared height in pixels.
        max_pixels: the largest accepted width * height.
        what: format name for the error detail ("PNG", "JPEG", "DICOM").

    Raises:
        PayloadTooLarge: width * height > max_pixels.
    """
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{what} image is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} pixels"
        )


def decode_png(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> DecodedImage:
    """Decode PNG bytes to 0..1 float32 pixels.

    Args:
        data: the PNG file.
        max_pixels: the largest accepted width * height, checked on the IHDR header before
            any pixel is decoded.
        max_decode_bytes: the memory the decode may take (see :mod:`service.imaging.budget`),
            checked on the header before any pixel is decoded.

    Returns:
        The decoded image, (H, W) grey or (H, W, 3) RGB; meta has bit_depth and channels.

    Raises:
        InvalidImage: not a PNG, truncated or corrupt.
        PayloadTooLarge: the header declares more than max_pixels pixels.
        DecodeBudgetExceeded: decoding would take more than max_decode_bytes.
    """
    header = png_header(data)
    check_pixel_count(header.width, header.height, max_pixels, "PNG")
    budget.check(header.footprint("PNG"), max_decode_bytes)
    return _decode_raster(data, "png", "PNG")


def decode_jpeg(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> DecodedImage:
    """Decode JPEG bytes to 0..1 float32 pixels.

    Args:
        data: the JPEG file.
        max_pixels: the largest accepted width * height, checked on the SOFn header before
            any pixel is decoded.
        max_decode_bytes: the memory the decode may take (see :mod:`service.imaging.budget`),
            checked on the header before any pixel is decoded.

    Returns:
        The decoded image, (H, W) grey or (H, W, 3) RGB; meta has bit_depth and channels.

    Raises:
        InvalidImage: not a JPEG, truncated or corrupt.
        PayloadTooLarge: the header declares more than max_pixels pixels.
        DecodeBudgetExceeded: decoding would take more than max_decode_bytes.
    """
    header = jpeg_header(data)
    check_pixel_count(header.width, header.height, max_pixels, "JPEG")
    budget.check(header.footprint("JPEG"), max_decode_bytes)
    return _decode_raster(data, "jpeg", "JPEG")


def _decode_raster(data: bytes, fmt: str, what: str) -> DecodedImage:
    """Decode with OpenCV and normalise channels and range (shared by PNG and JPEG)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        decoded = cv2.imdecode(buffer, _IMREAD_FLAGS)
    except cv2.error as exc:
        # imdecode reports most failures by returning None, but asserts (cv2.error) on
        # inputs it rejects outright, e.g. sizes over OPENCV_IO_MAX_IMAGE_PIXELS.
        raise InvalidImage(f"{what} data could not be decoded (truncated or corrupt)") from exc
    if decoded is None:
        raise InvalidImage(f"{what} data could not be decoded (truncated or corrupt)")

    if decoded.dtype == np.uint8:
        bit_depth, scale = 8, 255.0
    elif decoded.dtype == np.uint16:
        bit_depth, scale = 16, 65535.0
    else:
        raise InvalidImage(f"{what} sample type {decoded.dtype} is not supported")

    pixels = _to_grey_or_rgb(decoded)
    # One float32 array (the budget counts one), whatever numpy does with temporaries.
    pixels01 = np.divide(pixels, np.float32(scale), dtype=np.float32)
    channels = 1 if pixels01.ndim == 2 else 3
    return DecodedImage(
        pixels=pixels01, format=fmt, meta={"bit_depth": bit_depth, "channels": channels}
    )


def _to_grey_or_rgb(decoded: np.ndarray) -> np.ndarray:
    """Map OpenCV's (H, W) grey or (H, W, 3) BGR (what _IMREAD_FLAGS gives) to (H, W) grey
    or (H, W, 3) RGB."""
    if decoded.ndim == 2:
        return decoded
    if decoded.ndim != 3 or decoded.shape[2] != 3:
        raise InvalidImage(f"images decoded to shape {decoded.shape} are not supported")
    blue, green, red = decoded[:, :, 0], decoded[:, :, 1], decoded[:, :, 2]
    # Radiographs are often saved as RGB with three equal channels (and OpenCV expands
    # grey + alpha PNGs to BGR): keep those grey so nothing downstream treats them as colour.
    if np.array_equal(blue, green) and np.array_equal(green, red):
        return np.ascontiguousarray(blue)
    return np.ascontiguousarray(decoded[:, :, ::-1])

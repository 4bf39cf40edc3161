"""PNG and JPEG decoding with OpenCV, guarded against decompression bombs."""

from __future__ import annotations

import struct
from typing import Final

import cv2
import numpy as np

from service.errors import InvalidImage, PayloadTooLarge
from service.imaging.base import DecodedImage

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


def png_dimensions(data: bytes) -> tuple[int, int]:
    """Read (width, height) from a PNG's IHDR chunk without decoding anything.

    Args:
        data: the PNG file bytes (only the first 24 are looked at).

    Returns:
        (width, height) as declared by the header.

    Raises:
        InvalidImage: the bytes do not start with a PNG signature and an IHDR chunk.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidImage("PNG data could not be decoded (no PNG signature)")
    # IHDR must be the first chunk: 4-byte length, b"IHDR", then width and height.
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidImage("PNG data could not be decoded (truncated or missing IHDR header)")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """Read (width, height) from a JPEG's first start-of-frame segment.

    Walks the marker segments up to the first SOFn (JPEG-LS SOF55 included); entropy-coded
    data is never touched, so this costs a few hundred bytes of parsing at most.

    Args:
        data: a JPEG (or JPEG-LS) codestream.

    Returns:
        (width, height) as declared by the frame header.

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
            if pos + 7 > size:
                break
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if height == 0:
                # Height 0 defers the size to a DNL marker after the first scan: the size
                # cannot be bounded up front, and OpenCV's libjpeg rejects it anyway.
                raise InvalidImage("JPEG data with a deferred (DNL) height is not supported")
            return int(width), int(height)
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


def decode_png(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode PNG bytes to 0..1 float32 pixels.

    Args:
        data: the PNG file.
        max_pixels: the largest accepted width * height, checked on the IHDR header before
            any pixel is decoded.

    Returns:
        The decoded image, (H, W) grey or (H, W, 3) RGB; meta has bit_depth and channels.

    Raises:
        InvalidImage: not a PNG, truncated or corrupt.
        PayloadTooLarge: the header declares more than max_pixels pixels.
    """
    width, height = png_dimensions(data)
    check_pixel_count(width, height, max_pixels, "PNG")
    return _decode_raster(data, "png", "PNG")


def decode_jpeg(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode JPEG bytes to 0..1 float32 pixels.

    Args:
        data: the JPEG file.
        max_pixels: the largest accepted width * height, checked on the SOFn header before
            any pixel is decoded.

    Returns:
        The decoded image, (H, W) grey or (H, W, 3) RGB; meta has bit_depth and channels.

    Raises:
        InvalidImage: not a JPEG, truncated or corrupt.
        PayloadTooLarge: the header declares more than max_pixels pixels.
    """
    width, height = jpeg_dimensions(data)
    check_pixel_count(width, height, max_pixels, "JPEG")
    return _decode_raster(data, "jpeg", "JPEG")


def _decode_raster(data: bytes, fmt: str, what: str) -> DecodedImage:
    """Decode with OpenCV and normalise channels and range (shared by PNG and JPEG)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
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
    pixels01 = pixels.astype(np.float32) / np.float32(scale)
    channels = 1 if pixels01.ndim == 2 else 3
    return DecodedImage(
        pixels=pixels01, format=fmt, meta={"bit_depth": bit_depth, "channels": channels}
    )


def _to_grey_or_rgb(decoded: np.ndarray) -> np.ndarray:
    """Map OpenCV's (H, W), (H, W, 2|3|4) BGR(A) layouts to (H, W) grey or (H, W, 3) RGB."""
    if decoded.ndim == 2:
        return decoded
    channels = decoded.shape[2]
    if channels == 1:
        return decoded[:, :, 0]
    if channels == 2:
        # Grey + alpha: alpha is dropped, as for RGBA.
        return decoded[:, :, 0]
    if channels not in (3, 4):
        raise InvalidImage(f"images with {channels} channels are not supported")
    bgr = decoded[:, :, :3]
    blue, green, red = bgr[:, :, 0], bgr[:, :, 1], bgr[:, :, 2]
    # Radiographs are often saved as RGB with three equal channels (and OpenCV expands
    # grey+alpha PNGs to BGRA): keep those grey so nothing downstream treats them as colour.
    if np.array_equal(blue, green) and np.array_equal(green, red):
        return np.ascontiguousarray(blue)
    return np.ascontiguousarray(bgr[:, :, ::-1])

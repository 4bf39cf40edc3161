"""Image decoding: the media-type registry and the sniffing entry point.

``decode`` turns uploaded bytes into a :class:`DecodedImage`. Clients often label uploads
wrongly (curl's default form type, generic octet-stream, a DICOM sent as image/png), so
the bytes' magic numbers win over the declared type whenever they identify a supported
format; the declared type only decides when the bytes are not recognisable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from service.errors import EmptyBody, FrameOutOfRange, UnsupportedMediaType
from service.imaging.base import DecodedImage
from service.imaging.budget import DEFAULT_MAX_DECODE_BYTES
from service.imaging.dicom import (
    DEFAULT_MAX_FRAMES,
    Accept,
    Window,
    decode_dicom,
    looks_like_dicom,
)
from service.imaging.raster import (
    DEFAULT_MAX_PIXELS,
    JPEG_SOI,
    PNG_SIGNATURE,
    decode_jpeg,
    decode_png,
)

__all__ = [
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_MEDIA_TYPES",
    "Accept",
    "DecodedImage",
    "Window",
    "decode",
    "sniff_media_type",
]

# (data, frame, window, max_pixels, max_frames, max_decode_bytes, min_size, accept) ->
# image; adapters give every format one signature.
_Decoder = Callable[[bytes, int, Window, int, int, int, "tuple[int, int] | None",
                     "Accept | None"], DecodedImage]


def _png(data: bytes, frame: int, window: Window, max_pixels: int, max_frames: int,
         max_decode_bytes: int, min_size: tuple[int, int] | None,
         accept: Accept | None) -> DecodedImage:
    _single_frame_only(frame)
    return decode_png(data, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)


def _jpeg(data: bytes, frame: int, window: Window, max_pixels: int, max_frames: int,
          max_decode_bytes: int, min_size: tuple[int, int] | None,
          accept: Accept | None) -> DecodedImage:
    _single_frame_only(frame)
    return decode_jpeg(data, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)


def _dicom(data: bytes, frame: int, window: Window, max_pixels: int, max_frames: int,
           max_decode_bytes: int, min_size: tuple[int, int] | None,
           accept: Accept | None) -> DecodedImage:
    return decode_dicom(data, frame=frame, window=window, max_pixels=max_pixels,
                        max_frames=max_frames, max_decode_bytes=max_decode_bytes,
                        min_size=min_size, accept=accept)


# ---- The registry: media type -> decoder. Add a format here (and to the sniffer). ----
_REGISTRY: Final[Mapping[str, _Decoder]] = MappingProxyType(
    {
        "image/png": _png,
        "image/jpeg": _jpeg,
        # Not registered with IANA, but sent: image/jpg by mistake, image/pjpeg (a
        # progressive JPEG) and image/x-png by older browsers and Windows' registry.
        "image/jpg": _jpeg,
        "image/pjpeg": _jpeg,
        "image/x-png": _png,
        "application/dicom": _dicom,
    }
)
# ---------------------------------------------------------------------------------------

SUPPORTED_MEDIA_TYPES: Final[tuple[str, ...]] = tuple(_REGISTRY)

# Types that say nothing about the content: decide by the bytes alone. curl sends
# application/x-www-form-urlencoded for --data-binary unless told otherwise.
_GENERIC_MEDIA_TYPES: Final[frozenset[str]] = frozenset(
    {
        "",
        "application/octet-stream",
        "binary/octet-stream",
        "application/x-www-form-urlencoded",
    }
)


def sniff_media_type(data: bytes) -> str | None:
    """Identify a supported format from magic bytes.

    Args:
        data: the upload.

    Returns:
        "image/png", "image/jpeg", "application/dicom", or None if none matches.
    """
    if data.startswith(PNG_SIGNATURE):
        return "image/png"
    if data.startswith(JPEG_SOI):
        return "image/jpeg"
    if looks_like_dicom(data):
        return "application/dicom"
    return None


def decode(
    data: bytes,
    media_type: str | None,
    *,
    frame: int = 0,
    window: Window = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    min_size: tuple[int, int] | None = None,
    accept: Accept | None = None,
) -> DecodedImage:
    """Decode an upload, trusting its bytes over its declared media type.

    Args:
        data: the uploaded bytes.
        media_type: the Content-Type (of the request or multipart part), parameters
            allowed; None when absent.
        frame: 0-based frame for multi-frame DICOM; must be 0 for PNG/JPEG.
        window: DICOM windowing (see :func:`service.imaging.dicom.decode_dicom`); PNG and
            JPEG pixels are display values already, so it is ignored for them.
        max_pixels: the largest accepted width * height, checked before decoding.
        max_frames: the largest accepted DICOM Number of Frames, checked before decoding.
        max_decode_bytes: the memory the decode may take, estimated from the headers
            before decoding (see :mod:`service.imaging.budget`).
        min_size: (height, width) the pixels are needed at (a network's input); JPEG 2000
            DICOM may then be decoded at a reduced resolution no smaller than that (see
            :func:`service.imaging.dicom.decode_dicom`). None: full resolution.
        accept: called with a DICOM object's attributes before any size check or pixel
            decode, to refuse an object it raises for (PNG and JPEG carry no header).

    Returns:
        The decoded image.

    Raises:
        EmptyBody: no bytes.
        UnsupportedMediaType: an unsupported declared type, or generic/absent type with
            bytes that are not PNG, JPEG or DICOM.
        InvalidImage, InvalidDicom, DicomWithoutPixels, UnsupportedTransferSyntax,
        PayloadTooLarge, DecodeBudgetExceeded, InvalidParameter, TooManyFrames: from the
            decoder; whatever ``accept`` raises.
    """
    if not data:
        raise EmptyBody("the request carries no image bytes")
    declared = (media_type or "").split(";", 1)[0].strip().lower()
    sniffed = sniff_media_type(data)

    if declared in _GENERIC_MEDIA_TYPES:
        if sniffed is None:
            raise UnsupportedMediaType(
                "the bytes are not PNG, JPEG or DICOM; supported types: "
                + ", ".join(SUPPORTED_MEDIA_TYPES)
            )
        chosen = sniffed
    elif declared in _REGISTRY:
        # A recognised format beats a wrong label; otherwise the declared decoder reports
        # why the bytes are not what they claim to be.
        chosen = sniffed if sniffed is not None else declared
    else:
        raise UnsupportedMediaType(
            f"media type {declared[:100]!r} is not supported; supported types: "
            + ", ".join(SUPPORTED_MEDIA_TYPES)
        )
    return _REGISTRY[chosen](data, frame, window, max_pixels, max_frames, max_decode_bytes,
                             min_size, accept)


def _single_frame_only(frame: int) -> None:
    if frame != 0:
        raise FrameOutOfRange(f"frame {frame!r:.40} is out of range: PNG and JPEG have 1 frame")

"""JPEG 2000 decoding at reduced resolution, for images far larger than the network input.

A JPEG 2000 codestream is a wavelet pyramid: discarding the r finest resolution levels
decodes a 2^r times smaller image (each side ceil(size / 2^r), ISO/IEC 15444-1 B.5) at a
fraction of the cost, and its pixels are the wavelet's low-pass band, close to an area
downscale. pylibjpeg-openjpeg (pydicom's plugin) cannot discard levels, so this uses
OpenJPEG through Pillow, whose JPEG 2000 files take a ``reduce`` attribute.

Everything here declines (returns None) rather than guesses: the caller then decodes the
full image with pydicom as usual.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from typing import Final

import numpy as np

try:
    from PIL import Image, features

    _HAVE_OPENJPEG: Final[bool] = bool(features.check_codec("jpg_2000"))
except ImportError:  # pragma: no cover - Pillow comes with highdicom
    _HAVE_OPENJPEG = False

# JPEG 2000 Lossless and JPEG 2000 (lossy). HTJ2K is left to pydicom.
REDUCIBLE_SYNTAXES: Final[frozenset[str]] = frozenset(
    {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
)

_SOC_SIZ: Final[bytes] = b"\xff\x4f\xff\x51"
# The JP2 signature box, always the file's first 12 bytes (ISO 15444-1 I.5.1).
_JP2_SIGNATURE: Final[bytes] = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JP2_CODESTREAM_BOX: Final[bytes] = b"jp2c"
_COD: Final[int] = 0xFF52
_COC: Final[int] = 0xFF53
_SOT: Final[int] = 0xFF90

# Everything Pillow may raise for a stream it cannot decode (SyntaxError from plugin
# headers, OSError for decoder failures, DecompressionBombError for its own size cap).
_PILLOW_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    *((Image.DecompressionBombError,) if _HAVE_OPENJPEG else ()),
)


@dataclass(frozen=True)
class Codestream:
    """What the main header of a codestream says (only what reduction depends on)."""

    width: int
    height: int
    components: int
    precision: int
    signed: bool
    levels: int  # the fewest decomposition levels of any component in the main header


def locate(frame: bytes) -> bytes | None:
    """The codestream a JPEG 2000 decoder decodes from a frame; None when there is none.

    OpenJPEG (pydicom's plugin and Pillow alike) takes a raw codestream, which starts with
    SOC immediately followed by SIZ (ISO 15444-1 A.3), or a JP2 file, which starts with the
    signature box and holds the codestream in its first ``jp2c`` box; other boxes (``xml ``,
    ``uuid``, ...) may hold anything, a decoy SOC/SIZ included, so only the box walk says
    which header the decoder will read.

    Args:
        frame: one encapsulated frame.

    Returns:
        The raw codestream, starting with SOC and SIZ; None for anything else.
    """
    if frame.startswith(_SOC_SIZ):
        return frame
    if not frame.startswith(_JP2_SIGNATURE):
        return None
    pos = len(_JP2_SIGNATURE)
    while pos + 8 <= len(frame):
        length, kind = struct.unpack(">I4s", frame[pos : pos + 8])
        header = 8
        if length == 1:  # XLBox: a 64-bit length follows the type (I.4)
            if pos + 16 > len(frame):
                return None
            (length,) = struct.unpack(">Q", frame[pos + 8 : pos + 16])
            header = 16
        elif length == 0:  # the last box, up to the end of the file
            length = len(frame) - pos
        if length < header:
            return None
        if kind == _JP2_CODESTREAM_BOX:
            codestream = frame[pos + header : pos + length]
            return codestream if codestream.startswith(_SOC_SIZ) else None
        pos += length
    return None


def parse(codestream: bytes) -> Codestream | None:
    """Read SIZ, COD and COC of a raw codestream's main header; None when unusable here.

    Unusable: not a raw codestream (see :func:`locate`), no COD, image offsets (reduced
    sizes then depend on them), subsampled components, or components of different
    precision or signedness.
    """
    if not codestream.startswith(_SOC_SIZ):
        return None
    try:
        pos = 4
        (lsiz,) = struct.unpack(">H", codestream[pos : pos + 2])
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", codestream[pos + 4 : pos + 20])
        (csiz,) = struct.unpack(">H", codestream[pos + 36 : pos + 38])
        components = [
            struct.unpack(">BBB", codestream[pos + 38 + 3 * i : pos + 41 + 3 * i])
            for i in range(csiz)
        ]
        if csiz < 1 or xosiz or yosiz or xsiz < 1 or ysiz < 1:
            return None
        if any(c[1:] != (1, 1) for c in components) or len({c[0] for c in components}) != 1:
            return None
        ssiz = components[0][0]
        levels = _levels(codestream, pos + lsiz, csiz)
    except struct.error:
        return None
    if levels is None:
        return None
    return Codestream(xsiz, ysiz, csiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels)


def _levels(codestream: bytes, pos: int, components: int) -> int | None:
    """The fewest decomposition levels in the main header's COD and COC segments."""
    levels: list[int] = []
    while pos + 4 <= len(codestream):
        marker, length = struct.unpack(">HH", codestream[pos : pos + 4])
        if marker == _SOT or marker >> 8 != 0xFF:
            break
        if marker == _COD:
            # Lcod, Scod, SGcod (progression, layers, MCT), then SPcod's level count.
            levels.append(codestream[pos + 9])
        elif marker == _COC:
            # Lcoc, Ccoc (1 or 2 bytes), Scoc, then SPcoc's level count.
            levels.append(codestream[pos + 4 + (2 if components >= 257 else 1) + 1])
        pos += 2 + length
    return min(levels) if levels else None


def reduce_factor(stream: Codestream, min_size: tuple[int, int]) -> int:
    """The most levels to discard with both sides still at least ``min_size`` (h, w)."""
    min_height, min_width = min_size
    r = 0
    while (
        r < stream.levels
        and -(-stream.height // (2 ** (r + 1))) >= min_height
        and -(-stream.width // (2 ** (r + 1))) >= min_width
    ):
        r += 1
    return r


def decode_reduced(
    codestream: bytes, stream: Codestream, r: int, pixel_representation: int
) -> np.ndarray | None:
    """Decode with the r finest levels discarded, as stored values; None if Pillow can't.

    The values match pydicom's for the same codestream (pylibjpeg-openjpeg plugin): grey
    in the container dtype of the precision, signed per Pixel Representation (pydicom's
    J2K sign correction: the low ``precision`` bits reinterpreted), colour as 8-bit RGB
    (OpenJPEG has already undone the RCT/ICT).

    Args:
        codestream: one frame's codestream.
        stream: its :func:`parse` result.
        r: levels to discard, 0 <= r <= stream.levels (0: the full image).
        pixel_representation: the dataset's Pixel Representation (0 or 1).
    """
    if not _HAVE_OPENJPEG or not 0 <= r <= stream.levels:
        return None
    grey = stream.components == 1 and stream.precision <= 16
    colour = stream.components == 3 and stream.precision <= 8 and not stream.signed
    if not (grey or colour):
        return None
    height = -(-stream.height // 2**r)
    width = -(-stream.width // 2**r)
    try:
        with warnings.catch_warnings():
            # The pixel count was checked against the service's own limit before.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(codestream), formats=("JPEG2000",)) as image:
                image.reduce = r  # type: ignore[method-assign,assignment]
                # Pillow sizes the reduced image by rounding, OpenJPEG by ceiling (and
                # fails on the difference); a multiple of 2^r rounds to the ceiling.
                image._size = (width * 2**r, height * 2**r)
                image.load()
                decoded = np.asarray(image)
    except _PILLOW_ERRORS:
        return None
    if decoded.shape[:2] != (height, width):
        return None
    if colour:
        if decoded.ndim != 3 or decoded.shape[2] != 3 or decoded.dtype != np.uint8:
            return None
        return np.ascontiguousarray(decoded)
    return _stored_grey(decoded, stream, pixel_representation)


def _stored_grey(
    decoded: np.ndarray, stream: Codestream, pixel_representation: int
) -> np.ndarray | None:
    """Undo Pillow's scaling: it writes (value + 2^(p-1) if signed) << (container - p)."""
    container = 8 if stream.precision <= 8 else 16
    expected = np.uint8 if container == 8 else np.uint16
    if decoded.ndim != 2 or decoded.dtype != expected:
        return None
    precision = stream.precision
    values = decoded.astype(np.int64) >> (container - precision)
    if stream.signed:
        values -= 1 << (precision - 1)
    # Reinterpret the low `precision` bits as the dataset says (pydicom does the same).
    values &= (1 << precision) - 1
    if pixel_representation == 1:
        values -= (values >> (precision - 1) & 1) << precision
    dtype = np.dtype(f"{'i' if pixel_representation == 1 else 'u'}{container // 8}")
    return values.astype(dtype)

"""DICOM decoding: one frame, photometric handling and the Modality/VOI LUT pipeline.

Everything happens in memory. The output follows the display pipeline of PS3.4 Annex N:
stored values -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence) -> VOI
(VOI LUT Sequence, else the first Window Center/Width, or the caller's override) -> 0..1,
with MONOCHROME1 inverted last so that bone is bright for every radiograph. Grey frames of
integers up to 16 bits evaluate that pipeline once per possible stored value and look the
pixels up (same float32 bits, a fraction of the time); see :func:`_grey01_by_table`.
"""

from __future__ import annotations

import io
import math
import numbers
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.decoders.base import Decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from service.errors import (
    DicomWithoutPixels,
    FrameOutOfRange,
    InvalidDicom,
    InvalidImage,
    InvalidParameter,
    PayloadTooLarge,
    TooManyFrames,
    UnsupportedTransferSyntax,
)
from service.imaging import budget, j2k
from service.imaging.base import DecodedImage, LinearWindow
from service.imaging.budget import DEFAULT_MAX_DECODE_BYTES
from service.imaging.raster import DEFAULT_MAX_PIXELS, check_pixel_count, jpeg_header

Window: TypeAlias = tuple[float, float] | None | Literal["none"]
"""None: the file's own VOI; (center, width): that linear window; "none": min-max."""

Accept: TypeAlias = Callable[[Dataset], None]
"""Called with a DICOM object's attributes (pixels not read); raises to refuse it."""

DICM_OFFSET: Final[int] = 128
# Cine loops and breast tomosynthesis run to a few hundred frames; see Settings.max_frames.
DEFAULT_MAX_FRAMES: Final[int] = 1000

# pydicom parses lazily (raw elements are converted on first access) and hands pixel
# decoding to plugins, so malformed input surfaces as a broad, undocumented set of
# exceptions: InvalidDicomError / BytesLengthException (pydicom), EOFError / OSError
# ("No tag to read"), struct.error and zlib.error (binary and deflate parsing),
# ValueError (bad values, short pixel data), TypeError / KeyError / IndexError /
# AttributeError (missing or mistyped elements), NotImplementedError (unknown VRs, pixel
# layouts pydicom does not handle), OverflowError, and RuntimeError (pydicom's "all
# decoding plugins failed"). Every one of them means "this upload is not usable DICOM".
_PYDICOM_ERRORS: Final[tuple[type[BaseException], ...]] = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    OSError,
    struct.error,
    zlib.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    RuntimeError,
)

_PIXEL_KEYWORDS: Final[tuple[str, ...]] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PALETTE_COLOURS: Final[tuple[str, ...]] = ("Red", "Green", "Blue", "Alpha")
_IMAGE_PIXEL_KEYWORDS: Final[tuple[str, ...]] = ("Rows", "Columns", "BitsAllocated")

_JPEG_SYNTAXES: Final[frozenset[str]] = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    }
)
_J2K_SYNTAXES: Final[frozenset[str]] = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_RLE_SYNTAX: Final[str] = str(RLELossless)
# The grey LUT pipeline evaluated on a table of every 8- or 16-bit value (or per pixel on
# images smaller than the table): a few MB whatever the image size.
_GREY_TABLE_BYTES: Final[int] = 4 << 20
# Per output pixel of the paths that convert through float64 arrays (see budget): grey
# float, 32-bit or per-pixel LUT pipelines, and colour (three samples).
_GREY_FLOAT64_PER_PIXEL: Final[int] = 48
_COLOUR_FLOAT64_PER_PIXEL: Final[int] = 60
# Inflating a deflated dataset to count its size: output discarded in pieces this big.
_INFLATE_INPUT_CHUNK: Final[int] = 1 << 16
_INFLATE_OUTPUT_CHUNK: Final[int] = 1 << 20

# Only these characters may reach a client or a log from a DICOM header: UIDs are digits
# and dots, Modality / Photometric Interpretation are code strings. Anything else (a
# hostile file can put a name anywhere) is dropped.
_UID_RE: Final[re.Pattern[str]] = re.compile(r"[0-9.]{1,64}")
_CODE_RE: Final[re.Pattern[str]] = re.compile(r"[A-Z0-9_ ]{1,16}")

# Explicit VR elements whose length field is 4 bytes (after 2 reserved bytes), PS3.5 7.1.2.
_LONG_VRS: Final[frozenset[bytes]] = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


@dataclass(frozen=True)
class _Header:
    """The Image Pixel facts needed before decoding."""

    rows: int
    columns: int
    frames: int
    photometric: str
    bits_stored: int
    transfer_syntax: UID
    samples: int  # Samples per Pixel
    bits_allocated: int  # 32 or 64 for Float / Double Float Pixel Data
    integer: bool  # Pixel Data (integers), not Float / Double Float Pixel Data


def looks_like_dicom(data: bytes) -> bool:
    """Tell whether bytes are plausibly DICOM, without parsing them.

    True for the DICOM File Format ("DICM" at byte 128) and for bare datasets written
    without preamble and File Meta Information, which some PACS exports still produce:
    those are recognised by a first element in group 0x0002 or 0x0008 (either byte order),
    where every dataset starts.

    Args:
        data: the upload.

    Returns:
        Whether the bytes should be handed to the DICOM decoder.
    """
    if data[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group_le = int.from_bytes(data[0:2], "little")
    group_be = int.from_bytes(data[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def decode_dicom(
    data: bytes,
    *,
    frame: int = 0,
    window: Window = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    min_size: tuple[int, int] | None = None,
    accept: Accept | None = None,
) -> DecodedImage:
    """Decode one frame of a DICOM object to 0..1 display pixels.

    Files without the 128-byte preamble and "DICM" are read with ``force=True`` only when
    :func:`looks_like_dicom` accepts them; their transfer syntax is then taken from the
    encoding pydicom detects (implicit/explicit VR, byte order), i.e. a native syntax.

    Args:
        data: the DICOM file.
        frame: 0-based frame index; only that frame is decoded.
        window: None applies the file's VOI LUT Sequence or first Window Center/Width
            (min-max if it has neither); ``(center, width)`` applies that window to the
            modality values with LINEAR_EXACT semantics (PS3.3 C.11.2.1.3.2), so any
            positive width works; ``"none"`` scales the modality values min-max.
        max_pixels: the largest accepted Rows * Columns, checked before decoding.
        max_frames: the largest accepted Number of Frames, checked before decoding.
        max_decode_bytes: the memory the decode may take: the parsed (and inflated)
            dataset, the frame as the codec produces it, the codec's own buffers and the
            conversion to 0..1 (see :func:`_footprint`), checked before the pixels are
            decoded; a deflated dataset may inflate to at most half of what the upload
            leaves of it (pydicom holds the inflated bytes twice while parsing).
        min_size: (height, width) the pixels are needed at, e.g. a network's input. With
            it, JPEG 2000 frames are decoded at the smallest power-of-two reduction still
            at least that large in both axes (see :mod:`service.imaging.j2k`); the image's
            ``original_size`` then keeps Rows x Columns. None: always full resolution.
        accept: called with the object's attributes once they are read, before the frame
            count, pixel count and budget are checked and before any pixel is decoded: an
            object the caller does not want is refused as such, whatever its size or
            encoding (a C-STORE SCP is sent every image of a study).

    Returns:
        The decoded frame: (H, W) grey or (H, W, 3) RGB float32 in 0..1, with non-identifying
        meta (UIDs, Modality, frames, frame, TransferSyntaxUID, PhotometricInterpretation,
        bit_depth, width, height).

    Raises:
        InvalidDicom: not DICOM, truncated, corrupt, or pixels that cannot be decoded.
        DicomWithoutPixels: a valid object without pixel data (SR, RTPLAN, waveform, ...).
        UnsupportedTransferSyntax: no installed decoder for the transfer syntax.
        PayloadTooLarge: Rows * Columns (or a compressed frame's own header, or the inflated
            size of a deflated dataset) exceeds the limit.
        DecodeBudgetExceeded: decoding would take more than ``max_decode_bytes``.
        InvalidParameter: frame out of range, a malformed window, or a window on colour.
        TooManyFrames: Number of Frames exceeds ``max_frames``.
        Whatever ``accept`` raises.
    """
    window = _check_window(window)
    min_size = _check_min_size(min_size)
    ds, inflated = _read_dataset(data, max_decode_bytes)
    header = _read_header(ds)
    if accept is not None:
        try:
            accept(ds)
        except _PYDICOM_ERRORS as exc:
            raise InvalidDicom("DICOM attributes could not be read (corrupt attributes)") \
                from exc
    if header.frames > max_frames:
        raise TooManyFrames(
            f"the DICOM object has {header.frames} frames; the limit is {max_frames}"
        )
    check_pixel_count(header.columns, header.rows, max_pixels, "DICOM")
    if not _is_index(frame) or not 0 <= frame < header.frames:
        raise FrameOutOfRange(
            f"frame {frame!r:.40} is out of range: the object has {header.frames} frame(s), "
            f"numbered from 0"
        )
    decoder = _decoder_for(header.transfer_syntax)
    codestream, coded = None, (header.columns, header.rows)
    if not decoder.is_native:
        codestream, coded = _check_codestream_size(ds, header, frame, max_pixels)
    # pydicom keeps its own copy of every value it parsed (and of the inflated dataset,
    # twice while it parses it).
    budget.check(_footprint(header, coded, len(data) + 2 * inflated), max_decode_bytes)

    reduced = None
    if min_size is not None and codestream is not None:
        reduced = _decode_reduced(ds, header, codestream, min_size)
    if reduced is not None:
        arr, photometric = reduced
    else:
        # pydicom's RLE plugin: pylibjpeg-rle panics (a BaseException) on corrupt segments.
        plugin = "pydicom" if header.transfer_syntax == RLELossless else ""
        try:
            if _grey_view_possible(decoder, ds, header):
                arr, props = _native_grey(decoder, ds, frame, header.bits_stored)
            else:
                arr, props = decoder.as_array(ds, index=frame, decoding_plugin=plugin)
        except _PYDICOM_ERRORS as exc:
            raise InvalidDicom(
                f"DICOM pixel data could not be decoded ({header.transfer_syntax.name}; "
                f"truncated or corrupt)"
            ) from exc
        # pydicom converts YBR_FULL(_422) to RGB, and J2K decoders undo YBR_ICT/RCT; the
        # properties say what the array now holds.
        photometric = str(props.get("photometric_interpretation", header.photometric))
    photometric = photometric.strip().upper()

    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            pixels, applied = _grey01(arr, ds, frame, window,
                                      invert=photometric == "MONOCHROME1")
        else:
            if isinstance(window, tuple):
                raise InvalidParameter(
                    f"a window applies to MONOCHROME images only, not to {photometric}"
                )
            pixels, applied = _colour01(arr, ds, photometric, header.bits_stored), None
        meta = _meta(ds, header, frame)
        # Copying the header parses elements the decoding never touched (a corrupt VR in
        # the patient module shows up only here).
        source = _without_pixels(ds)
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicom(
            "DICOM attributes could not be read or pixel transformations (LUTs) applied "
            "(corrupt attributes)"
        ) from exc

    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32), format="dicom", meta=meta,
        source=source,
        original_size=(header.rows, header.columns) if reduced is not None else None,
        window=applied,
    )


def _grey_view_possible(decoder: Decoder, ds: Dataset, header: _Header) -> bool:
    """Whether pydicom can hand out native grey pixels as a view on the Pixel Data.

    Not for bit-packed data, nor 8-bit big endian (OW byte pairs to swap), where it would
    copy anyway and log that it cannot make a view.
    """
    if not decoder.is_native or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return False
    if "PixelData" not in ds:
        return False  # Float / Double Float Pixel Data: the usual path
    bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    if bits_allocated == 8:
        return bool(header.transfer_syntax.is_little_endian)
    return bits_allocated in (16, 32)


def _native_grey(
    decoder: Decoder, ds: Dataset, frame: int, bits_stored: int
) -> tuple[np.ndarray, dict[str, str | int]]:
    """A native grey frame as pydicom decodes it, without its copy when nothing needs it.

    pydicom clears the bits above Bits Stored in a copy of the frame: 7 MB for a 2k
    radiograph, whose fresh pages' first touch can cost more than the rest of the decode.
    Almost every writer leaves those bits clear; only a frame whose values show otherwise
    is decoded again, with pydicom's correction.
    """
    arr, props = decoder.as_array(ds, index=frame, view_only=True, correct_unused_bits=False)
    if arr.dtype.kind in "iu" and bits_stored < 8 * arr.dtype.itemsize and arr.size:
        signed = arr.dtype.kind == "i"
        low = -(1 << (bits_stored - 1)) if signed else 0
        high = (1 << (bits_stored - 1 if signed else bits_stored)) - 1
        if int(arr.min()) < low or int(arr.max()) > high:
            arr, props = decoder.as_array(ds, index=frame)
    return arr, props


def _check_min_size(min_size: object) -> tuple[int, int] | None:
    """Validate the caller's min_size argument: None or two positive integers."""
    if min_size is None:
        return None
    if (
        isinstance(min_size, tuple)
        and len(min_size) == 2
        and all(_is_index(v) and v > 0 for v in min_size)
    ):
        return (int(min_size[0]), int(min_size[1]))
    raise ValueError("min_size must be None or (height, width) with positive integers")


def _decode_reduced(
    ds: Dataset, header: _Header, codestream: bytes, min_size: tuple[int, int]
) -> tuple[np.ndarray, str] | None:
    """A JPEG 2000 frame at reduced resolution, with its photometric; None: decode fully.

    Only when the codestream agrees with Rows/Columns, so that the reduced grid is an
    exact power-of-two reduction of the image the caller maps results back onto.
    """
    if str(header.transfer_syntax) not in j2k.REDUCIBLE_SYNTAXES:
        return None
    stream = j2k.parse(codestream)
    if stream is None or (stream.height, stream.width) != (header.rows, header.columns):
        return None
    r = j2k.reduce_factor(stream, min_size)
    if r == 0:
        return None
    photometric = header.photometric
    if stream.components == 1:
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            return None
    elif photometric in ("YBR_ICT", "YBR_RCT"):
        photometric = "RGB"  # OpenJPEG undoes the component transform, as pydicom says
    elif photometric != "RGB":
        return None
    try:
        pixel_representation = int(ds.get("PixelRepresentation", 0) or 0)
    except _PYDICOM_ERRORS:
        return None
    arr = j2k.decode_reduced(codestream, stream, r, pixel_representation)
    return None if arr is None else (arr, photometric)


def _without_pixels(ds: Dataset) -> Dataset:
    """Every element but the pixel data group (7FE0), left unparsed (raw elements stay raw)."""
    header = Dataset()
    header.file_meta = ds.file_meta
    header.set_original_encoding(*ds.original_encoding)
    for element in ds.elements():
        if element.tag.group != 0x7FE0:
            header[element.tag] = element
    return header


def _is_index(value: object) -> bool:
    """An integer (numpy integers included) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_window(window: object) -> Window:
    """Validate the caller's window argument."""
    if window is None:
        return None
    if isinstance(window, str) and window == "none":
        return "none"
    if isinstance(window, tuple) and len(window) == 2:
        center, width = window
        if (
            all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in window)
            and math.isfinite(center)
            and math.isfinite(width)
            and width > 0
        ):
            return (float(center), float(width))
    raise InvalidParameter(
        'window must be omitted, "none", or (center, width) with finite numbers and width > 0'
    )


def _read_dataset(data: bytes, max_decode_bytes: int) -> tuple[Dataset, int]:
    """Parse the whole object from memory; (dataset, inflated size of a deflated one or 0)."""
    has_preamble = data[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"
    if not looks_like_dicom(data):
        raise InvalidDicom(
            "data is not DICOM (no 'DICM' marker at byte 128 and no data element at byte 0)"
        )
    inflated = 0
    if has_preamble:
        inflated = _inflated_size(data, max(max_decode_bytes - len(data), 0) // 2)
    try:
        # force only for bare datasets: with a preamble, pydicom validates the File Meta.
        return pydicom.dcmread(io.BytesIO(data), force=not has_preamble), inflated
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicom("DICOM data could not be parsed (truncated or corrupt)") from exc


def _inflated_size(data: bytes, limit: int) -> int:
    """A deflated dataset's inflated size (0 if not deflated), refused over ``limit``.

    pydicom inflates the whole dataset at once, and deflate reaches ~1000:1, so a small
    upload could expand to gigabytes: the size is counted first by inflating piece by
    piece and throwing the output away, so that counting holds ~1 MB whatever the size.

    Raises:
        PayloadTooLarge: the dataset inflates to more than ``limit`` bytes.
        InvalidDicom: the deflate stream is corrupt.
    """
    offset = _deflated_dataset_offset(data)
    if offset is None:
        return 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    stream = memoryview(data)[offset:]
    total = 0
    try:
        for start in range(0, len(stream), _INFLATE_INPUT_CHUNK):
            pending: bytes | memoryview = stream[start : start + _INFLATE_INPUT_CHUNK]
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, _INFLATE_OUTPUT_CHUNK))
                if total > limit:
                    raise PayloadTooLarge(
                        f"deflated DICOM dataset inflates to more than {limit} bytes"
                    )
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        # What the last input left inside the inflater (a bounded output was full).
        while not inflater.eof and (tail := inflater.decompress(b"", _INFLATE_OUTPUT_CHUNK)):
            total += len(tail)
            if total > limit:
                raise PayloadTooLarge(
                    f"deflated DICOM dataset inflates to more than {limit} bytes"
                )
    except zlib.error as exc:
        raise InvalidDicom("deflated DICOM dataset could not be inflated (corrupt)") from exc
    return total


def _deflated_dataset_offset(data: bytes) -> int | None:
    """Return where the dataset starts if the File Meta names the deflated syntax."""
    pos = DICM_OFFSET + 4
    syntax = b""
    # The File Meta group is always explicit VR little endian (PS3.10 7.1).
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        element = int.from_bytes(data[pos + 2 : pos + 4], "little")
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                return None
            length = int.from_bytes(data[pos + 8 : pos + 12], "little")
            value_at = pos + 12
        else:
            length = int.from_bytes(data[pos + 6 : pos + 8], "little")
            value_at = pos + 8
        if element == 0x0010:
            syntax = data[value_at : value_at + length]
        pos = value_at + length
    if syntax.rstrip(b"\x00 ") == DeflatedExplicitVRLittleEndian.encode("ascii"):
        return pos
    return None


def _read_header(ds: Dataset) -> _Header:
    """Find the pixel data and read the Image Pixel attributes that decoding depends on."""
    try:
        if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
            _raise_without_pixels(ds)
        rows = _positive_int(ds, "Rows")
        columns = _positive_int(ds, "Columns")
        frames_value = ds.get("NumberOfFrames")
        # pydicom treats an absent, empty or zero Number of Frames as one frame, so do we.
        frames = max(int(frames_value), 1) if frames_value not in (None, "") else 1
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        bits_stored_value = ds.get("BitsStored", ds.get("BitsAllocated"))
        bits_stored = int(bits_stored_value) if bits_stored_value is not None else 0
        syntax = _transfer_syntax(ds)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        integer = "PixelData" in ds
        bits_allocated = int(ds.get("BitsAllocated", 0) or 0) if integer else (
            32 if "FloatPixelData" in ds else 64)
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicom(
            "DICOM Image Pixel attributes are missing or invalid (truncated or corrupt)"
        ) from exc
    if not _CODE_RE.fullmatch(photometric):
        raise InvalidDicom("DICOM Photometric Interpretation is missing or invalid")
    if not 1 <= bits_stored <= 64:
        raise InvalidDicom("DICOM Bits Stored is missing or invalid")
    if not 1 <= samples <= 4:
        raise InvalidDicom("DICOM Samples per Pixel is invalid")
    if not 1 <= bits_allocated <= 64:
        raise InvalidDicom("DICOM Bits Allocated is missing or invalid")
    return _Header(rows, columns, frames, photometric, bits_stored, syntax, samples,
                   bits_allocated, integer)


def _footprint(header: _Header, coded: tuple[int, int], parsed_bytes: int) -> budget.Footprint:
    """What decoding one frame holds at its peak (see :mod:`service.imaging.budget`).

    Args:
        header: the Image Pixel facts.
        coded: (width, height) the codec decodes: a compressed frame's own header, which
            may exceed Rows x Columns (it is what the codec allocates).
        parsed_bytes: the parsed dataset's own copies (upload and inflated bytes).
    """
    width, height = max(coded[0], header.columns), max(coded[1], header.rows)
    container = 1 << max(0, (header.bits_allocated - 1).bit_length() - 3)  # 1, 2, 4, 8
    # The frame as the codec hands it over (a native frame may be a view; one copy is
    # counted all the same: pydicom copies it to clear unused bits or to reorder bytes).
    per_pixel = header.samples * container
    syntax = str(header.transfer_syntax)
    if syntax in _J2K_SYNTAXES:
        per_pixel += header.samples * budget.OPENJPEG_PER_SAMPLE
    elif syntax == _RLE_SYNTAX:
        per_pixel += header.samples * container  # the segments are decoded to bytes first
    fixed = parsed_bytes
    grey = header.photometric in ("MONOCHROME1", "MONOCHROME2")
    if grey and header.integer and container <= 2:
        per_pixel += budget.FLOAT32
        fixed += _GREY_TABLE_BYTES
    elif grey:
        per_pixel += _GREY_FLOAT64_PER_PIXEL
    else:
        per_pixel += _COLOUR_FLOAT64_PER_PIXEL
    return budget.Footprint("DICOM", width, height, per_pixel, fixed)


# Media Storage Directory Storage: the SOP Class of a DICOMDIR.
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


def _raise_without_pixels(ds: Dataset) -> None:
    """Tell a genuine pixel-less object from a truncated image; raise accordingly."""
    # pydicom keeps what it parsed before an unexpected end of data (and drops the whole
    # dataset when the cut falls inside a sequence or encapsulated pixel data), so a cut
    # image looks pixel-less: empty, with Image Pixel attributes or an image SOP Class, or
    # with a SOP Class UID cut short (then it differs from the intact File Meta copy).
    sop_class = ds.get("SOPClassUID")
    media_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    # A DICOMDIR (a media directory) has no SOP Class UID in its dataset, only in its File
    # Meta: a whole object of the wrong kind, not a cut image.
    if (sop_class is None and str(media_class) == _MEDIA_DIRECTORY
            and "DirectoryRecordSequence" in ds):
        raise DicomWithoutPixels("DICOM object has no pixel data to classify "
                                 "(a DICOMDIR: Media Storage Directory)")
    if (
        sop_class is None
        or (media_class is not None and str(media_class) != str(sop_class))
        or any(keyword in ds for keyword in _IMAGE_PIXEL_KEYWORDS)
        or "Image Storage" in UID(str(sop_class)).name
    ):
        raise InvalidDicom(
            "DICOM data has no Pixel Data where an image is expected: a truncated or "
            "corrupt file, or an image's header only"
        )
    sop_text = str(sop_class)
    sop_detail = UID(sop_text).name if _UID_RE.fullmatch(sop_text) else "unknown"
    raise DicomWithoutPixels(
        f"DICOM object has no pixel data to classify (SOP Class: {sop_detail}"
        f"{_modality_suffix(ds)})"
    )


def _modality_suffix(ds: Dataset) -> str:
    modality = str(ds.get("Modality", ""))
    return f", Modality: {modality}" if _CODE_RE.fullmatch(modality) else ""


def _positive_int(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or int(value) < 1:
        raise ValueError(f"{keyword} missing or not positive")
    return int(value)


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax, or the native one pydicom detected for bare datasets."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax:
        text = str(syntax).strip()
        if not _UID_RE.fullmatch(text):
            raise InvalidDicom("DICOM Transfer Syntax UID is not a valid UID")
        return UID(text)
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise InvalidDicom("DICOM transfer syntax is missing and cannot be inferred")
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decoder_for(syntax: UID) -> Decoder:
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntax(
            f"transfer syntax {syntax} ({syntax.name}) is not supported: no pixel decoder"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(
            f"transfer syntax {syntax} ({syntax.name}) is not supported: "
            f"its decoder plugins are not installed"
        )
    return decoder


def _check_codestream_size(
    ds: Dataset, header: _Header, frame: int, max_pixels: int
) -> tuple[bytes | None, tuple[int, int]]:
    """Check a compressed frame's own header: the codec allocates what it declares.

    Returns:
        The codestream the codec decodes (JPEG, JPEG-LS, raw JPEG 2000 from a JP2 file
        too; None for other syntaxes) and its (width, height).
    """
    syntax = str(header.transfer_syntax)
    if syntax not in _JPEG_SYNTAXES and syntax not in _J2K_SYNTAXES:
        # RLE output is sized from Rows/Columns, already checked.
        return None, (header.columns, header.rows)
    try:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        codestream = get_frame(
            ds.PixelData, frame, extended_offsets=offsets, number_of_frames=header.frames
        )
    except _PYDICOM_ERRORS as exc:
        raise InvalidDicom(
            f"DICOM encapsulated frame {frame} could not be located (truncated or corrupt)"
        ) from exc
    if syntax in _JPEG_SYNTAXES:
        try:
            jpeg = jpeg_header(codestream)
        except InvalidImage as exc:
            raise InvalidDicom(
                f"DICOM JPEG frame {frame} has no valid frame header (corrupt)"
            ) from exc
        width, height = jpeg.width, jpeg.height
    else:
        codestream, (width, height) = _j2k_codestream(codestream)
    check_pixel_count(width, height, max_pixels, "DICOM compressed frame")
    return codestream, (width, height)


def _j2k_codestream(frame: bytes) -> tuple[bytes, tuple[int, int]]:
    """The codestream OpenJPEG decodes from a frame (see :func:`j2k.locate`) and the
    (width, height) its SIZ declares."""
    codestream = j2k.locate(frame)
    if codestream is None or len(codestream) < 24:
        raise InvalidDicom("DICOM JPEG 2000 frame has no codestream header (corrupt)")
    # SOC, SIZ marker, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz (PS ISO 15444-1 A.5.1).
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", codestream[8:24])
    return codestream, (max(xsiz - xosiz, 0), max(ysiz - yosiz, 0))


def frame_view(ds: Dataset, frame: int) -> Dataset:
    """The LUT-relevant attributes in effect for one frame.

    Enhanced multi-frame objects keep Rescale and Window values in the Shared and
    Per-Frame Functional Groups rather than at the top level, where pydicom's LUT
    functions look; a small view dataset puts the frame's values where they expect them.
    It also keeps pydicom's in-place edits (apply_windowing rewrites elements) off ``ds``.
    """
    view = Dataset()
    view.file_meta = ds.file_meta  # endianness of OW LUT Data
    view.set_original_encoding(*ds.original_encoding)
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
    ):
        if keyword in ds:
            view[keyword] = ds[keyword]
    if view.get("ModalityLUTSequence"):
        item = view.ModalityLUTSequence[0]
        entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
        if bits not in (8, 16):
            # apply_modality_lut builds dtype f"uint{bits}": legal 9..15-bit LUTs (PS3.3
            # C.11.1.1.1) would raise, so widen them to 16 bits; values are unchanged.
            widened = Dataset()
            widened.update(item)
            widened.LUTDescriptor = [entries, first_mapped, 16]
            view.ModalityLUTSequence = [widened]
    groups = [ds.get("SharedFunctionalGroupsSequence")]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append([per_frame[frame]])
    for group in groups:  # shared first, so per-frame values win
        if not group:
            continue
        item = group[0]
        for sequence, keywords in (
            ("PixelValueTransformationSequence",
             ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            if item.get(sequence):
                for keyword in keywords:
                    if keyword in item[sequence][0]:
                        view[keyword] = item[sequence][0][keyword]
    return view


def _clip_to_lut_input(stored: np.ndarray, item: Dataset) -> np.ndarray:
    """Clamp to a LUT's input range in int64.

    pydicom subtracts the first mapped value in the input's own dtype, which wraps for
    values near the dtype's limits; clamping first gives the same lookup without wrapping.
    """
    entries, first_mapped, _ = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    return np.clip(stored.astype(np.int64), first_mapped, first_mapped + entries - 1)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Which of ``stored`` equal Pixel Padding Value (or lie within its range limit)."""
    if ds.get("PixelPaddingValue") is None:
        return None
    padding = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == padding
    low, high = sorted((padding, int(limit)))
    return (stored >= low) & (stored <= high)


def _grey01(
    stored: np.ndarray, ds: Dataset, frame: int, window: Window, *, invert: bool
) -> tuple[np.ndarray, LinearWindow | None]:
    """Grey stored values to 0..1 display pixels, MONOCHROME1 (``invert``) inverted last,
    and the linear window that mapped them when one did (see :func:`_monochrome01`)."""
    view = frame_view(ds, frame)
    if _table_applies(stored):
        try:
            return _grey01_by_table(stored, ds, view, window, invert=invert)
        except IndexError:
            # The table also holds values the image lacks; a LUT shorter than its
            # descriptor fails on those alone, so let the image's own values decide.
            view = frame_view(ds, frame)
    padding = _padding_mask(ds, stored) if stored.ndim == 2 else None
    pixels, applied = _monochrome01(stored, view, window, padding)
    return (1.0 - pixels if invert else pixels), applied


def _table_applies(stored: np.ndarray) -> bool:
    """Whether a lookup table over every value of the dtype is both possible and cheaper."""
    if stored.ndim != 2 or stored.dtype.kind not in "iu":
        return False
    if stored.dtype.itemsize > 2:
        return False  # 2^32 entries: the pipeline runs per pixel
    # Evaluating the pipeline on the table costs about what it costs on as many pixels.
    return stored.size >= _TABLE_BREAK_EVEN * (1 << (8 * stored.dtype.itemsize))


# Pixels per table entry from which the table is used; results are the same either way.
_TABLE_BREAK_EVEN: float = 1.0
# Pixels per np.take / np.bincount call: their intp copy of the indices then stays in cache
# (a whole 2k radiograph's is 29 MB), ~40 % faster than one call over the image.
_CHUNK_PIXELS: Final[int] = 1 << 17


def _grey01_by_table(
    stored: np.ndarray, ds: Dataset, view: Dataset, window: Window, *, invert: bool
) -> tuple[np.ndarray, LinearWindow | None]:
    """The per-pixel pipeline evaluated once per possible stored value, then looked up.

    Every step is elementwise except the scaling that depends on which values occur
    (min-max, a VOI LUT's real maximum); :class:`_Occurring` answers those from the image,
    so the float32 results equal the per-pixel path's bit for bit.
    """
    unsigned = _index_dtype(stored.dtype)
    every = np.arange(1 << (8 * stored.dtype.itemsize), dtype=unsigned).view(stored.dtype)
    # Entries for values the image lacks may overflow exp() (SIGMOID) or divide by zero;
    # they are never looked up, so their warnings would only be noise.
    with np.errstate(all="ignore"):
        table, applied = _monochrome01(every, view, window, _padding_mask(ds, every),
                                       _Occurring(stored))
        if invert:
            table = 1.0 - table
    table = table.astype(np.float32)
    index = stored.view(unsigned)
    pixels = np.empty(stored.shape, dtype=np.float32)
    rows = max(1, _CHUNK_PIXELS // max(stored.shape[1], 1))
    for top in range(0, stored.shape[0], rows):
        # mode="clip": every index is in range, and "raise" would buffer the output.
        np.take(table, index[top : top + rows], out=pixels[top : top + rows], mode="clip")
    return pixels, applied


def _index_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned dtype whose value is a stored value's bits: its index in a table."""
    # Same byte order, so that big endian stored values index by their value's bits too.
    return np.dtype(f"u{dtype.itemsize}").newbyteorder(dtype.byteorder)


class _Occurring:
    """The stored values that occur in an image, worked out only as far as a question needs.

    Tables are indexed by the stored value's bits (signed values viewed as unsigned).
    """

    def __init__(self, stored: np.ndarray) -> None:
        self._stored = stored
        self._unsigned = _index_dtype(stored.dtype)
        self._span: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def extremes(
        self, table: np.ndarray, eligible: np.ndarray | None = None
    ) -> tuple[float, float] | None:
        """(min, max) of ``table`` over the occurring values that are ``eligible``; None: none.

        Where the table is monotonic between the smallest and the largest stored value
        (rescales, most LUTs) and every value there is eligible, its ends are the answer,
        at the cost of a min and a max over the image; otherwise the image is counted.
        """
        span = self._value_span()
        ordered = table[span]
        if eligible is None or eligible[span].all():
            rising = bool(np.all(ordered[1:] >= ordered[:-1]))
            if rising or bool(np.all(ordered[1:] <= ordered[:-1])):
                ends = (float(ordered[0]), float(ordered[-1]))
                return min(ends), max(ends)
        wanted = self._occurs() if eligible is None else self._occurs() & eligible
        if not wanted.any():
            return None
        chosen = table[wanted]
        return float(chosen.min()), float(chosen.max())

    def _value_span(self) -> np.ndarray:
        """Table indices of every value from the image's min to its max, in value order."""
        if self._span is None:
            low, high = int(self._stored.min()), int(self._stored.max())
            values = np.arange(low, high + 1, dtype=np.int64)
            self._span = values.astype(self._stored.dtype).view(self._unsigned)
        return self._span

    def _occurs(self) -> np.ndarray:
        """Boolean mask over the table: which stored values occur."""
        if self._mask is None:
            entries = 1 << (8 * self._unsigned.itemsize)
            counts = np.zeros(entries, dtype=np.intp)
            flat = self._stored.view(self._unsigned).reshape(-1)
            for start in range(0, flat.size, _CHUNK_PIXELS):
                counts += np.bincount(flat[start : start + _CHUNK_PIXELS], minlength=entries)
            self._mask = counts > 0
        return self._mask


def _monochrome01(
    stored: np.ndarray,
    view: Dataset,
    window: Window,
    padding: np.ndarray | None,
    occurring: _Occurring | None = None,
) -> tuple[np.ndarray, LinearWindow | None]:
    """Modality LUT, then VOI (file, override or none), then 0..1 (before MONOCHROME1).

    ``occurring`` None: ``stored`` are the image's pixels; else ``stored`` is a table of
    every possible value and ``occurring`` says which of them the image holds.

    Returns:
        The 0..1 values, and the window that mapped the modality values to them when it
        was not the file's own VOI: the caller's, or min-max as the window from min to max
        (None for the file's VOI, and for an image of one value).
    """
    if view.get("ModalityLUTSequence"):
        stored = _clip_to_lut_input(stored, view.ModalityLUTSequence[0])
    values = apply_modality_lut(stored, view)
    if isinstance(window, tuple):
        center, width = window
        return (np.clip((values.astype(np.float64) - center) / width + 0.5, 0.0, 1.0),
                LinearWindow(center, width))
    if window is None:
        voi = _file_voi01(values, view, occurring)
        if voi is not None:
            return voi, None
    return _min_max01(values, padding, occurring)


def _file_voi01(
    values: np.ndarray, view: Dataset, occurring: _Occurring | None = None
) -> np.ndarray | None:
    """The file's VOI LUT Sequence or first window, scaled by its output range; None if absent."""
    lut_item = view.VOILUTSequence[0] if view.get("VOILUTSequence") else None
    if lut_item is not None and "LUTDescriptor" in lut_item and "LUTData" in lut_item:
        entries, first_mapped, bits = (int(v) for v in lut_item.LUTDescriptor)
        entries = entries or 65536
        # apply_voi indexes with integers (it warns on floats) and subtracts first_mapped in
        # the LUT's unsigned dtype, which wraps for out-of-range inputs: clamp first.
        indices = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1)
        mapped = apply_voi(indices.astype(np.int64), view, index=0)
        # Output range is 0..2^bits-1 (PS3.3 C.11.2.1.1); some writers declare fewer bits
        # than the data use, so never scale below the LUT's real maximum.
        top = float(2**bits - 1)
        peak = float(mapped.max(initial=0))
        if peak > top and occurring is not None:
            # Only the entries the image uses count (a table holds them all).
            found = occurring.extremes(mapped)
            peak = max(found[1], 0.0) if found is not None else 0.0
        if peak > top:
            top = float(2 ** int(peak).bit_length() - 1)
        return mapped.astype(np.float64) / top

    center = _first_number(view, "WindowCenter")
    width = _first_number(view, "WindowWidth")
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if center is None or width is None:
        return None
    # An unusable window in the header should not block inference: fall back to min-max
    # instead of letting apply_windowing raise.
    if function == "LINEAR":
        if width < 1:
            return None
    elif function in ("LINEAR_EXACT", "SIGMOID"):
        if width <= 0:
            return None
    else:
        return None
    windowed = apply_windowing(values, view, index=0)
    # apply_windowing maps into a range derived from Bits Stored, Pixel Representation,
    # Rescale and any Modality LUT; reading it back by windowing -inf/+inf keeps this
    # independent of how pydicom computes it.
    low, high = apply_windowing(np.array([-np.inf, np.inf]), view, index=0)
    if not high > low:
        return None
    return np.clip((windowed - low) / (high - low), 0.0, 1.0)


def _first_number(view: Dataset, keyword: str) -> float | None:
    """First value of a possibly multi-valued DS element; None when absent or not finite."""
    element = view.get(keyword)
    if element is None or element == "":
        return None
    value = element[0] if isinstance(element, MultiValue) else element
    if value is None or value == "":
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _min_max01(
    values: np.ndarray, padding: np.ndarray | None, occurring: _Occurring | None = None
) -> tuple[np.ndarray, LinearWindow | None]:
    """Scale to 0..1 by min and max of the pixels that are not padding; that window."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    eligible = finite & ~padding if padding is not None else finite
    bounds = _extremes(values, eligible, occurring)
    if bounds is None:
        bounds = _extremes(values, finite, occurring)
    if bounds is None:
        return np.zeros(values.shape, dtype=np.float64), None
    low, high = bounds
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64), None
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0), LinearWindow((low + high) / 2, high - low)


def _extremes(
    values: np.ndarray, eligible: np.ndarray, occurring: _Occurring | None
) -> tuple[float, float] | None:
    """(min, max) of the eligible pixels' values; None when there are none."""
    if occurring is not None:
        return occurring.extremes(values, eligible)
    if not eligible.any():
        return None
    chosen = values[eligible]
    return float(chosen.min()), float(chosen.max())


def _colour01(arr: np.ndarray, ds: Dataset, photometric: str, bits_stored: int) -> np.ndarray:
    """RGB / palette / residual YBR pixels to 0..1 RGB, grey when all channels are equal."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, _palette_source(ds))
        top = float(np.iinfo(rgb.dtype).max)
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if photometric != "RGB":
            # pydicom converts these itself (raw=False); kept for a plugin that did not.
            arr = convert_color_space(arr, photometric, "RGB")
        rgb = arr
        top = float(2**bits_stored - 1)
    else:
        raise InvalidDicom(f"DICOM Photometric Interpretation {photometric} is not supported")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidDicom(f"DICOM {photometric} pixel data does not have 3 samples per pixel")
    scaled = np.clip(rgb.astype(np.float64) / top, 0.0, 1.0)
    if np.array_equal(scaled[:, :, 0], scaled[:, :, 1]) and np.array_equal(
        scaled[:, :, 1], scaled[:, :, 2]
    ):
        return scaled[:, :, 0]
    return scaled


def _palette_source(ds: Dataset) -> Dataset:
    """The palette module with LUT Data as native-order bytes, as apply_color_lut assumes.

    pydicom 3.0's apply_color_lut reads (non-segmented) LUT Data with np.frombuffer in
    native byte order, so big endian files come out byte-swapped, and LUT Data read as a
    list of US values (explicit VR US) is not bytes at all; both are normalised here.
    """
    big_endian = ds.original_encoding[1] is False
    needs_view = big_endian or any(
        isinstance(ds.get(f"{colour}PaletteColorLookupTableData"), (list, MultiValue))
        for colour in _PALETTE_COLOURS
    )
    if not needs_view:
        return ds
    view = Dataset()
    view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding)
    for element in ds.group_dataset(0x0028):
        view.add(element)
    if "PixelPresentation" in ds:  # apply_color_lut refuses supplemental palettes
        view["PixelPresentation"] = ds["PixelPresentation"]
    for colour in _PALETTE_COLOURS:
        keyword = f"{colour}PaletteColorLookupTableData"
        value = ds.get(keyword)
        if value is None:
            continue
        entries = int(ds[f"{colour}PaletteColorLookupTableDescriptor"].value[0]) or 65536
        if isinstance(value, (list, MultiValue)):
            words = np.asarray(value, dtype=np.uint16)
        elif len(value) == 2 * entries:
            words = np.frombuffer(value, dtype=">u2" if big_endian else "<u2")
        else:
            continue  # 8-bit entries: byte order does not apply
        view[keyword] = DataElement(ds[keyword].tag, "OW", words.astype("=u2").tobytes())
    return view


def _meta(ds: Dataset, header: _Header, frame: int) -> dict[str, str | int]:
    """Non-identifying facts only: UIDs, Modality, frames, sizes, syntax, photometric, bits."""
    meta: dict[str, str | int] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        text = str(ds.get(keyword, "")).strip()
        if _UID_RE.fullmatch(text):
            meta[keyword] = text
    modality = str(ds.get("Modality", "")).strip()
    if _CODE_RE.fullmatch(modality):
        meta["Modality"] = modality
    meta["frames"] = header.frames
    meta["frame"] = int(frame)
    meta["TransferSyntaxUID"] = str(header.transfer_syntax)
    meta["PhotometricInterpretation"] = header.photometric
    meta["bit_depth"] = header.bits_stored
    meta["width"] = header.columns
    meta["height"] = header.rows
    return meta

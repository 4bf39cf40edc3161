"""The per-pixel float64 grey pipeline as it was before the lookup-table decode: a reference.

``service.imaging.dicom`` now evaluates its grey pipeline once per possible stored value
and looks pixels up; this module keeps the previous implementation, which ran every step
on every pixel, so tests can hold the two to bit-identical results and
``tools/bench_decode.py`` can time old against new in one run. The functions from
``_frame_view`` to ``_min_max01`` are copied verbatim from ``service/imaging/dicom.py`` at
commit 276c595; :func:`grey01` is that version's MONOCHROME branch of ``decode_dicom``.
Do not "fix" them here: they define what the fast path must reproduce.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import RLELossless

from service.imaging import dicom
from service.imaging.base import DecodedImage
from service.imaging.dicom import Window


def grey01(stored: np.ndarray, ds: Dataset, frame: int, window: Window,
           photometric: str) -> np.ndarray:
    """Stored grey values to float32 0..1 display pixels, exactly as the old decode did."""
    pixels = _monochrome01(stored, _frame_view(ds, frame), window, _padding_mask(ds, stored))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return np.ascontiguousarray(pixels, dtype=np.float32)


def stored_values(data: bytes, frame: int = 0) -> tuple[np.ndarray, Dataset, str]:
    """One frame's stored values, its dataset and photometric, read as ``decode_dicom`` does."""
    arr, ds, _, photometric = _read(data, frame)
    return arr, ds, photometric


def _read(data: bytes, frame: int) -> tuple[np.ndarray, Dataset, dicom._Header, str]:
    ds, _ = dicom._read_dataset(data, dicom.DEFAULT_MAX_DECODE_BYTES)
    header = dicom._read_header(ds)
    decoder = dicom._decoder_for(header.transfer_syntax)
    plugin = "pydicom" if header.transfer_syntax == RLELossless else ""
    arr, props = decoder.as_array(ds, index=frame, decoding_plugin=plugin)
    photometric = str(props.get("photometric_interpretation", header.photometric))
    return arr, ds, header, photometric.strip().upper()


def decode_grey(data: bytes, frame: int = 0, window: Window = None) -> np.ndarray:
    """A grey DICOM frame decoded with the old per-pixel pipeline (full resolution)."""
    arr, ds, photometric = stored_values(data, frame)
    assert photometric in ("MONOCHROME1", "MONOCHROME2"), photometric
    return grey01(arr, ds, frame, window, photometric)


def decode_dicom_old(data: bytes, frame: int = 0, window: Window = None) -> DecodedImage:
    """The old ``decode_dicom`` of a grey frame, with its header copy and meta: a timing twin."""
    arr, ds, header, photometric = _read(data, frame)
    pixels = grey01(arr, ds, frame, window, photometric)
    return DecodedImage(pixels=pixels, format="dicom", meta=dicom._meta(ds, header, frame),
                        source=dicom._without_pixels(ds))


# ---- Verbatim from service/imaging/dicom.py at 276c595 -------------------------------


def _frame_view(ds: Dataset, frame: int) -> Dataset:
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
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
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
    """Pixels equal to Pixel Padding Value (or within its range limit), in stored values."""
    if stored.ndim != 2 or ds.get("PixelPaddingValue") is None:
        return None
    padding = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == padding
    low, high = sorted((padding, int(limit)))
    return (stored >= low) & (stored <= high)


def _monochrome01(
    stored: np.ndarray, view: Dataset, window: Window, padding: np.ndarray | None
) -> np.ndarray:
    """Modality LUT, then VOI (file, override or none), then 0..1 (before MONOCHROME1)."""
    if view.get("ModalityLUTSequence"):
        stored = _clip_to_lut_input(stored, view.ModalityLUTSequence[0])
    values = apply_modality_lut(stored, view)
    if isinstance(window, tuple):
        center, width = window
        return np.clip((values.astype(np.float64) - center) / width + 0.5, 0.0, 1.0)
    if window is None:
        voi = _file_voi01(values, view)
        if voi is not None:
            return voi
    return _min_max01(values, padding)


def _file_voi01(values: np.ndarray, view: Dataset) -> np.ndarray | None:
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


def _min_max01(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """Scale to 0..1 by min and max of the pixels that are not padding."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if padding is not None:
        finite &= ~padding
    if not finite.any():
        finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.float64)
    low = float(values[finite].min())
    high = float(values[finite].max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float64)
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0)

"""DICOM decoding against pydicom-data files, with references computed independently here.

References use pydicom only to read stored values (``pixel_array``); the display
transforms (rescale, windowing, palette lookup, inversion) are written out below.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder

from service.errors import (
    DicomWithoutPixels,
    InvalidDicom,
    InvalidParameter,
    PayloadTooLarge,
    ServiceError,
    TooManyFrames,
    UnsupportedTransferSyntax,
)
from service.imaging import j2k
from service.imaging.base import DecodedImage
from service.imaging.dicom import decode_dicom
from tests.imaging import bombs

TOL = 1e-6  # float32 output vs float64 reference

ALLOWED_META = {
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "frames",
    "frame",
    "TransferSyntaxUID",
    "PhotometricInterpretation",
    "bit_depth",
    "width",
    "height",
}


def _path(name: str) -> str:
    path = get_testdata_file(name, download=False)
    # pydicom-data is a pinned test dependency: a missing file is a broken install.
    assert path is not None, f"{name} is not in the installed pydicom-data"
    return str(path)


def _bytes(name: str) -> bytes:
    return Path(_path(name)).read_bytes()


def _dataset(name: str) -> Dataset:
    return pydicom.dcmread(_path(name), force=True)


def _stored(name: str) -> np.ndarray:
    return _dataset(name).pixel_array


def _decode(name: str, **kwargs: object) -> DecodedImage:
    return decode_dicom(_bytes(name), **kwargs)  # type: ignore[arg-type]


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _linear_window01(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 'LINEAR', output range 0..1."""
    x = x.astype(np.float64)
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    y[x <= center - 0.5 - (width - 1) / 2] = 0.0
    y[x > center - 0.5 + (width - 1) / 2] = 1.0
    return y


def _min_max01(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


def _palette01(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Palette lookup written out for OW, 16-bit, little-endian LUT data."""
    channels = []
    for colour in ("Red", "Green", "Blue"):
        entries, first, bits = ds[f"{colour}PaletteColorLookupTableDescriptor"].value
        assert bits == 16
        lut = np.frombuffer(ds[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2")
        index = np.clip(stored.astype(np.int64) - first, 0, (entries or 65536) - 1)
        channels.append(lut[index])
    return np.stack(channels, axis=-1).astype(np.float64) / 65535


# ---- Radiographs: MONOCHROME1 CR, decoded once per module (1955 x 1841) -------------


@pytest.fixture(scope="module")
def rg1() -> dict[str, np.ndarray]:
    uncompressed = _bytes("RG1_UNCR.dcm")
    ds = pydicom.dcmread(io.BytesIO(uncompressed))
    relabelled = pydicom.dcmread(io.BytesIO(uncompressed))
    relabelled.PhotometricInterpretation = "MONOCHROME2"
    return {
        "stored": ds.pixel_array,
        "uncr": decode_dicom(uncompressed).pixels,
        "j2kr": _decode("RG1_J2KR.dcm").pixels,
        "as_mono2": decode_dicom(_to_bytes(relabelled)).pixels,
    }


def test_rg1_is_monochrome1_windowed_and_inverted(rg1: dict[str, np.ndarray]) -> None:
    ds = pydicom.dcmread(_path("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (15000.0, 30000.0)
    expected = 1.0 - _linear_window01(rg1["stored"], 15000, 30000)
    assert rg1["uncr"].shape == (1955, 1841)
    assert rg1["uncr"].dtype == np.float32
    np.testing.assert_allclose(rg1["uncr"], expected, atol=TOL, rtol=0)


def test_rg1_lossless_j2k_equals_uncompressed(rg1: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(rg1["j2kr"], rg1["uncr"])


def test_monochrome1_is_the_inverse_of_the_same_pixels_as_monochrome2(
    rg1: dict[str, np.ndarray],
) -> None:
    np.testing.assert_allclose(rg1["uncr"], 1.0 - rg1["as_mono2"], atol=TOL, rtol=0)
    # Bone (high stored values in MONOCHROME1) ends up bright.
    stored = rg1["stored"]
    assert rg1["uncr"][stored == stored.min()].mean() > rg1["uncr"][stored == stored.max()].mean()


def test_monochrome1_inversion_happens_after_windowing() -> None:
    ds = _dataset("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    pixels = decode_dicom(_to_bytes(ds)).pixels
    np.testing.assert_allclose(
        pixels, 1.0 - _linear_window01(_stored("MR_small.dcm"), 600, 1600), atol=TOL, rtol=0
    )


# ---- Greyscale values ---------------------------------------------------------------


def test_ct_small_rescale_then_min_max() -> None:
    ds = _dataset("CT_small.dcm")
    assert "WindowCenter" not in ds
    hounsfield = ds.pixel_array * 1.0 - 1024.0  # Rescale Slope 1, Intercept -1024
    image = _decode("CT_small.dcm")
    np.testing.assert_allclose(image.pixels, _min_max01(hounsfield), atol=TOL, rtol=0)


def test_pixel_padding_is_excluded_from_min_max() -> None:
    ds = _dataset("CT_small.dcm")
    stored = ds.pixel_array.copy()
    reference = _min_max01(stored)
    assert int(ds.PixelPaddingValue) == -2000
    stored[:10, :10] = -2000
    ds.PixelData = stored.astype("<i2").tobytes()
    pixels = decode_dicom(_to_bytes(ds)).pixels
    assert np.all(pixels[:10, :10] == 0.0)
    np.testing.assert_allclose(pixels[10:], reference[10:], atol=TOL, rtol=0)


def test_mr_small_first_window() -> None:
    image = _decode("MR_small.dcm")
    expected = _linear_window01(_stored("MR_small.dcm"), 600, 1600)
    np.testing.assert_allclose(image.pixels, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_mr_small_variants_decode_identically(variant: str) -> None:
    np.testing.assert_array_equal(_decode(variant).pixels, _decode("MR_small.dcm").pixels)


def test_window_override_and_none() -> None:
    stored = _stored("MR_small.dcm").astype(np.float64)
    overridden = _decode("MR_small.dcm", window=(1000.0, 500.0)).pixels
    np.testing.assert_allclose(
        overridden, np.clip((stored - 1000.0) / 500.0 + 0.5, 0, 1), atol=TOL, rtol=0
    )
    unwindowed = _decode("MR_small.dcm", window="none").pixels
    np.testing.assert_allclose(unwindowed, _min_max01(stored), atol=TOL, rtol=0)
    assert unwindowed.min() == 0.0 and unwindowed.max() == 1.0


def test_the_image_says_which_window_mapped_it() -> None:
    """``DecodedImage.window``: the caller's window, min-max as the window from min to max of
    the modality values (a presentation state shows the image with it), None for the file's
    own VOI and for colour."""
    assert _decode("MR_small.dcm").window is None  # its own window
    assert _decode("MR_small.dcm", window=(1000.0, 500.0)).window == (1000.0, 500.0)
    stored = _stored("MR_small.dcm").astype(np.float64)
    low, high = stored.min(), stored.max()
    assert _decode("MR_small.dcm", window="none").window == ((low + high) / 2, high - low)
    # CT_small has no window: min-max of the Hounsfield values (Rescale Intercept -1024).
    hounsfield = _stored("CT_small.dcm") - 1024.0
    image = _decode("CT_small.dcm")
    assert image.window == ((hounsfield.min() + hounsfield.max()) / 2,
                            hounsfield.max() - hounsfield.min())
    center, width = image.window
    np.testing.assert_allclose(image.pixels, np.clip((hounsfield - center) / width + 0.5, 0, 1),
                               atol=TOL, rtol=0)
    # The lookup-table path (a Modality LUT Sequence) says the same.
    ds = _dataset("mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    values = np.asarray(item.LUTData, dtype=np.float64)[
        np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)]
    assert _decode("mlut_18.dcm").window == ((values.min() + values.max()) / 2,
                                             values.max() - values.min())
    assert _decode("vlut_04.dcm").window is None  # its VOI LUT Sequence
    assert _decode("SC_rgb.dcm").window is None


def test_window_override_applies_to_modality_values() -> None:
    hounsfield = _stored("CT_small.dcm") - 1024.0
    pixels = _decode("CT_small.dcm", window=(40, 400)).pixels
    np.testing.assert_allclose(
        pixels, np.clip((hounsfield - 40) / 400 + 0.5, 0, 1), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("window", [(40, 0), (40, -5), (float("nan"), 10), "auto", (1, 2, 3)])
def test_bad_window_is_invalid_parameter(window: object) -> None:
    with pytest.raises(InvalidParameter, match="window"):
        _decode("MR_small.dcm", window=window)


def test_jpeg2000_signed_nm_min_max() -> None:
    image = _decode("JPEG2000.dcm")
    np.testing.assert_allclose(image.pixels, _min_max01(_stored("JPEG2000.dcm")), atol=TOL, rtol=0)
    np.testing.assert_array_equal(image.pixels, _decode("JPEG2000_UNC.dcm").pixels)


def test_deflated_dataset() -> None:
    image = _decode("image_dfl.dcm")
    assert image.meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.1.99"
    np.testing.assert_allclose(image.pixels, _min_max01(_stored("image_dfl.dcm")), atol=TOL, rtol=0)


def test_voi_lut_sequence() -> None:
    ds = _dataset("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    entries, first, bits = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = lut[index] / (2**bits - 1)
    np.testing.assert_allclose(_decode("vlut_04.dcm").pixels, expected, atol=TOL, rtol=0)


def test_modality_lut_sequence() -> None:
    ds = _dataset("mlut_18.dcm")
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    expected = _min_max01(lut[index])
    np.testing.assert_allclose(_decode("mlut_18.dcm").pixels, expected, atol=TOL, rtol=0)


# ---- Colour -------------------------------------------------------------------------


def test_rgb_values() -> None:
    image = _decode("SC_rgb.dcm")
    assert image.pixels.shape == (100, 100, 3)
    np.testing.assert_allclose(image.pixels, _stored("SC_rgb.dcm") / 255.0, atol=TOL, rtol=0)
    np.testing.assert_array_equal(image.pixels[0, 0], [1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "variant", ["SC_rgb_rle.dcm", "SC_rgb_expb.dcm", "SC_rgb_16bit.dcm", "SC_rgb_jpeg_gdcm.dcm"]
)
def test_lossless_rgb_variants_are_identical(variant: str) -> None:
    np.testing.assert_array_equal(_decode(variant).pixels, _decode("SC_rgb.dcm").pixels)


@pytest.mark.parametrize(
    "variant",
    [
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_ybr_full_uncompressed.dcm",  # native YBR_FULL
        "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
    ],
)
def test_ybr_is_converted_to_rgb(variant: str) -> None:
    image = _decode(variant)
    assert image.meta["PhotometricInterpretation"].startswith("YBR_FULL")
    # Same picture as SC_rgb.dcm, up to YCbCr rounding (and lossy JPEG for dcmtk).
    assert np.abs(image.pixels - _decode("SC_rgb.dcm").pixels).max() <= 6 / 255


def test_ybr_full_matches_written_out_conversion() -> None:
    ds = _dataset("SC_ybr_full_uncompressed.dcm")
    ds.pixel_array_options(as_rgb=False)
    ybr = ds.pixel_array.astype(np.float64)
    y, cb, cr = ybr[..., 0], ybr[..., 1] - 128, ybr[..., 2] - 128
    # PS3.3 C.7.6.3.1.2 YBR_FULL -> RGB
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    expected = np.clip(np.rint(rgb), 0, 255) / 255
    assert np.abs(_decode("SC_ybr_full_uncompressed.dcm").pixels - expected).max() <= 1 / 255


def test_lossless_j2k_ybr_rct_equals_uncompressed_rgb() -> None:
    assert _dataset("US1_J2KR.dcm").PhotometricInterpretation == "YBR_RCT"
    np.testing.assert_array_equal(_decode("US1_J2KR.dcm").pixels, _decode("US1_UNCR.dcm").pixels)


@pytest.mark.parametrize("variant", ["OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_expb.dcm"])
def test_palette_color(variant: str) -> None:
    ds = _dataset("OBXXXX1A.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    image = _decode(variant)
    assert image.pixels.shape == (600, 800, 3)
    np.testing.assert_allclose(image.pixels, _palette01(ds.pixel_array, ds), atol=TOL, rtol=0)


def test_segmented_palette_big_endian_equals_little_endian() -> None:
    assert "SegmentedRedPaletteColorLookupTableData" in _dataset("gdcm-US-ALOKA-16.dcm")
    np.testing.assert_array_equal(
        _decode("gdcm-US-ALOKA-16_big.dcm").pixels, _decode("gdcm-US-ALOKA-16.dcm").pixels
    )


def test_window_on_colour_is_invalid_parameter() -> None:
    with pytest.raises(InvalidParameter, match="MONOCHROME"):
        _decode("SC_rgb.dcm", window=(128, 256))
    assert _decode("SC_rgb.dcm", window="none").pixels.shape == (100, 100, 3)


# ---- Frames -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_multiframe_decodes_the_requested_frame(variant: str) -> None:
    stored = _stored("emri_small.dcm")
    assert stored.shape == (10, 64, 64)
    image = _decode(variant, frame=3)
    assert image.meta["frames"] == 10
    assert image.meta["frame"] == 3
    np.testing.assert_allclose(image.pixels, _min_max01(stored[3]), atol=TOL, rtol=0)


def test_only_the_requested_frame_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    indices: list[int | None] = []
    original = Decoder.as_array

    def spy(self: Decoder, src: object, **kwargs: object) -> object:
        indices.append(kwargs.get("index"))  # type: ignore[arg-type]
        return original(self, src, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Decoder, "as_array", spy)
    _decode("emri_small_jpeg_ls_lossless.dcm", frame=9)
    assert indices == [9]


def functional_group(sequence: str, **values: object) -> Dataset:
    """A functional group item holding one ``sequence`` of one item with ``values``."""
    inner = Dataset()
    for keyword, value in values.items():
        setattr(inner, keyword, value)
    outer = Dataset()
    setattr(outer, sequence, [inner])
    return outer


def test_enhanced_multiframe_functional_groups_are_applied_per_frame() -> None:
    ds = _dataset("emri_small.dcm")
    stored = ds.pixel_array

    shared = functional_group("PixelValueTransformationSequence", RescaleSlope=2,
                              RescaleIntercept=-10)
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = [functional_group("FrameVOILUTSequence", WindowCenter=300,
                                  WindowWidth=200)] * 10
    per_frame[2] = functional_group("FrameVOILUTSequence", WindowCenter=100, WindowWidth=50)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    data = _to_bytes(ds)
    for frame, (center, width) in ((2, (100, 50)), (5, (300, 200))):
        expected = _linear_window01(2.0 * stored[frame] - 10, center, width)
        pixels = decode_dicom(data, frame=frame).pixels
        np.testing.assert_allclose(pixels, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("frame", [10, -1, 99])
def test_frame_out_of_range(frame: int) -> None:
    with pytest.raises(InvalidParameter, match=r"out of range: the object has 10 frame"):
        _decode("emri_small.dcm", frame=frame)
    with pytest.raises(InvalidParameter, match="has 1 frame"):
        _decode("CT_small.dcm", frame=1)


# ---- Errors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_objects_without_pixels(name: str) -> None:
    with pytest.raises(DicomWithoutPixels, match="no pixel data"):
        _decode(name)


def _pixel_data_value_offset(data: bytes) -> int:
    """Offset of the (7FE0,0010) value in an explicit VR little endian file."""
    tag = data.rfind(b"\xe0\x7f\x10\x00")
    assert tag > 0
    return tag + 12


def _pixel_data_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the Pixel Data value, native or encapsulated."""
    start = _pixel_data_value_offset(data)
    (length,) = struct.unpack("<I", data[start - 4 : start])
    if length == 0xFFFFFFFF:  # encapsulated: ends with the Sequence Delimitation Item
        return start, data.rindex(b"\xfe\xff\xdd\xe0")
    return start, start + length


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"]
)
def test_truncated_files_are_invalid_dicom(name: str) -> None:
    data = _bytes(name)
    pixels_at, pixels_end = _pixel_data_span(data)
    in_header = [0, 64, 128, 131, 132, 140, 200, 300, 400, 500, pixels_at - 12, pixels_at - 4]
    size = pixels_end - pixels_at
    in_pixels = [pixels_at, pixels_at + 1, pixels_at + 9]
    in_pixels += [pixels_at + int(size * f) for f in (0.1, 0.5, 0.9)] + [pixels_end - 1]
    secret = str(_dataset(name).get("PatientName", "")) or None
    for cut in in_header + in_pixels:
        with pytest.raises(InvalidDicom) as caught:
            decode_dicom(data[:cut])
        assert secret is None or secret not in caught.value.detail, cut


def test_truncated_multiframe_and_deflated_are_invalid_dicom() -> None:
    for name in ("emri_small_jpeg_ls_lossless.dcm", "image_dfl.dcm"):
        data = _bytes(name)
        for fraction in (0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
            with pytest.raises(InvalidDicom):
                decode_dicom(data[: int(len(data) * fraction)])


def test_corrupt_rle_segment_never_panics() -> None:
    # This byte makes pylibjpeg-rle panic (pyo3 PanicException, a BaseException that no
    # `except Exception` catches); decode_dicom uses pydicom's own RLE plugin instead.
    data = bytearray(_bytes("MR_small_RLE.dcm"))
    data[_pixel_data_value_offset(bytes(data)) + 331] = 132
    try:
        image = decode_dicom(bytes(data))
    except InvalidDicom:
        return
    assert image.pixels.shape == (64, 64)


def test_pixel_data_shorter_than_declared() -> None:
    with pytest.raises(InvalidDicom, match="pixel data could not be decoded"):
        _decode("MR_truncated.dcm")


def test_random_bytes_with_dicm_preamble(rng: np.random.Generator) -> None:
    for seed in range(5):
        junk = np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        with pytest.raises(InvalidDicom):
            decode_dicom(bytes(128) + b"DICM" + junk)
    with pytest.raises(InvalidDicom, match="not DICOM"):
        decode_dicom(b"\x01\x02" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InvalidDicom):
        decode_dicom(b"")


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264 High Profile / Level 4.1"),
    ],
)
def test_unsupported_transfer_syntax(syntax: str, name: str) -> None:
    ds = _dataset("MR_small_jp2klossless.dcm")
    ds.file_meta.TransferSyntaxUID = syntax
    with pytest.raises(UnsupportedTransferSyntax, match=syntax.replace(".", r"\.")) as caught:
        decode_dicom(_to_bytes(ds))
    assert name in caught.value.detail


def test_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _decode("MR_small.dcm", max_pixels=64 * 64).pixels.shape == (64, 64)
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(PayloadTooLarge, match=r"64x64 = 4096 pixels; the limit is 4095"):
        _decode("MR_small.dcm", max_pixels=64 * 64 - 1)


def _patch(data: bytes, marker: bytes, offset: int, payload: bytes) -> bytes:
    at = data.index(marker) + offset
    return data[:at] + payload + data[at + len(payload) :]


def test_jpeg_frame_header_larger_than_rows_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    # The codec allocates what the codestream declares, whatever Rows/Columns say.
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    data = _bytes("SC_rgb_jpeg_dcmtk.dcm")
    sof = data.index(b"\xff\xc0", _pixel_data_value_offset(data))
    bomb = data[: sof + 5] + struct.pack(">HH", 60000, 60000) + data[sof + 9 :]
    with pytest.raises(PayloadTooLarge, match="compressed frame"):
        decode_dicom(bomb)


def test_j2k_frame_header_larger_than_rows_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    data = _bytes("MR_small_jp2klossless.dcm")
    bomb = _patch(data, b"\xff\x4f\xff\x51", 8, struct.pack(">II", 100_000, 100_000))
    with pytest.raises(PayloadTooLarge, match="compressed frame"):
        decode_dicom(bomb)


def test_deflate_bomb_refused_before_inflating() -> None:
    # 70 MiB of zeros deflated to ~70 KB, over what a 100 MiB budget lets it inflate to.
    with pytest.raises(PayloadTooLarge, match="deflated DICOM dataset inflates to more than"):
        decode_dicom(bombs.deflate_bomb(70 << 20), max_decode_bytes=100 << 20)


def test_frame_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _decode("emri_small.dcm", frame=9, max_frames=10).meta["frames"] == 10
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(TooManyFrames, match="has 10 frames; the limit is 9") as caught:
        _decode("emri_small_jpeg_2k_lossless.dcm", max_frames=9)
    assert caught.value.code == "too_many_frames"


# ---- JPEG 2000 at reduced resolution ------------------------------------------------

J2K_FILES = [
    "RG1_J2KR.dcm",  # 15-bit MONOCHROME1
    "RG1_J2KI.dcm",
    "RG3_J2KR.dcm",  # 10-bit
    "MR2_J2KI.dcm",  # 12-bit
    "693_J2KR.dcm",  # signed, codestream precision 14 < Bits Stored 16
    "US1_J2KR.dcm",  # YBR_RCT
    "US1_J2KI.dcm",  # YBR_ICT
    "emri_small_jpeg_2k_lossless.dcm",  # multi-frame
]


@pytest.mark.parametrize("name", J2K_FILES)
def test_reduced_decoder_stored_values_equal_pydicom_at_full_resolution(name: str) -> None:
    # The value conversion (Pillow's scaling undone, sign correction) is exactly pydicom's.
    ds = _dataset(name)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    codestream = pydicom.encaps.get_frame(ds.PixelData, frames - 1, number_of_frames=frames)
    stream = j2k.parse(codestream)
    assert stream is not None
    expected = ds.pixel_array[frames - 1] if frames > 1 else ds.pixel_array
    got = j2k.decode_reduced(codestream, stream, 0, int(ds.PixelRepresentation))
    assert got is not None and got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_reduce_factor_is_the_largest_that_keeps_the_target_size() -> None:
    stream = j2k.Codestream(width=1841, height=1955, components=1, precision=15,
                            signed=False, levels=5)
    # Each level halves each side, rounding up: 1955 -> 978 -> 489 -> 245; 1841 -> ... 231.
    assert j2k.reduce_factor(stream, (256, 256)) == 2
    assert j2k.reduce_factor(stream, (489, 461)) == 2
    assert j2k.reduce_factor(stream, (490, 256)) == 1
    assert j2k.reduce_factor(stream, (2000, 2000)) == 0
    assert j2k.reduce_factor(stream, (1, 1)) == 5  # never more than the codestream has


def test_rg1_reduced_is_close_to_an_area_downscale(rg1: dict[str, np.ndarray]) -> None:
    image = _decode("RG1_J2KR.dcm", min_size=(256, 256))
    assert image.pixels.shape == (489, 461) and image.pixels.dtype == np.float32
    # Results map onto the original grid: width/height stay Columns/Rows.
    assert (image.width, image.height) == (1841, 1955)
    assert image.original_size == (1955, 1841) and image.reduced
    assert image.meta["width"] == 1841 and image.meta["height"] == 1955
    area = cv2.resize(rg1["j2kr"], (461, 489), interpolation=cv2.INTER_AREA)
    diff = np.abs(image.pixels - area)
    # The 5/3 wavelet's low-pass band is not a box filter (and 1955/489 is not exactly 4):
    # measured mean 0.0045 and 99th percentile 0.029 on the 0..1 scale, the size of the
    # difference between cv2's own INTER_AREA and INTER_LINEAR downscales (0.0027, 0.011).
    assert diff.mean() < 0.01
    assert np.quantile(diff, 0.99) < 0.05
    # Windowing and MONOCHROME1 inversion still apply: bright bone, dark background.
    np.testing.assert_allclose(image.pixels.mean(), rg1["j2kr"].mean(), atol=0.005)


def test_reduced_colour_and_multiframe() -> None:
    full = _decode("US1_J2KR.dcm")
    image = _decode("US1_J2KR.dcm", min_size=(100, 100))
    assert image.pixels.shape == (120, 160, 3)
    assert (image.width, image.height) == (640, 480)
    area = cv2.resize(full.pixels, (160, 120), interpolation=cv2.INTER_AREA)
    # RGB in the right order (OpenJPEG undid the RCT); speckle and burnt-in text make the
    # wavelet band and the box filter differ at edges (mean 0.05), not elsewhere.
    np.testing.assert_allclose(image.pixels.mean(axis=(0, 1)), area.mean(axis=(0, 1)),
                               atol=0.01)
    assert np.median(np.abs(image.pixels - area)) < 0.01
    # The requested frame is the one reduced: it matches that frame best (r = 1 of a
    # 64 x 64 MR; min-max scaling follows the reduced image's own extremes).
    image = _decode("emri_small_jpeg_2k_lossless.dcm", frame=3, min_size=(32, 32))
    assert image.pixels.shape == (32, 32) and image.meta["frame"] == 3
    stored = _stored("emri_small.dcm")
    correlations = [
        np.corrcoef(
            image.pixels.ravel(),
            cv2.resize(_min_max01(f).astype(np.float32), (32, 32),
                       interpolation=cv2.INTER_AREA).ravel(),
        )[0, 1]
        for f in stored
    ]
    assert int(np.argmax(correlations)) == 3 and correlations[3] > 0.9  # measured 0.949


@pytest.mark.parametrize(
    ("name", "min_size"),
    [
        ("RG1_UNCR.dcm", (256, 256)),  # not JPEG 2000
        ("SC_rgb_jpeg_dcmtk.dcm", (8, 8)),  # JPEG
        ("RG1_J2KR.dcm", None),  # no size asked for
        ("RG1_J2KR.dcm", (1000, 1000)),  # a reduction would be smaller than asked
    ],
)
def test_no_reduction(name: str, min_size: tuple[int, int] | None) -> None:
    image = _decode(name, min_size=min_size)
    assert image.original_size is None and not image.reduced
    assert image.pixels.shape[:2] == (image.height, image.width)


def test_reduction_falls_back_to_a_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(j2k, "decode_reduced", lambda *a, **k: None)
    image = _decode("MR2_J2KR.dcm", min_size=(256, 256))
    assert image.pixels.shape == (1024, 1024) and image.original_size is None


@pytest.mark.parametrize("min_size", [(0, 256), (256,), (256.0, 256), "256"])
def test_bad_min_size_is_a_programming_error(min_size: object) -> None:
    with pytest.raises(ValueError, match="min_size"):
        _decode("MR2_J2KR.dcm", min_size=min_size)


# ---- Files without preamble ---------------------------------------------------------


def test_bare_dataset_without_preamble_is_read() -> None:
    data = _bytes("OT-PAL-8-face.dcm")
    assert data[128:132] != b"DICM"
    ds = _dataset("OT-PAL-8-face.dcm")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    image = decode_dicom(data)
    assert image.meta["TransferSyntaxUID"] == "1.2.840.10008.1.2"  # inferred: implicit LE
    expected = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(
        image.pixels, expected / np.iinfo(expected.dtype).max, atol=TOL, rtol=0
    )
    with pytest.raises(DicomWithoutPixels):
        _decode("ExplVR_LitEndNoMeta.dcm")


# ---- Metadata and privacy -----------------------------------------------------------


def test_meta_is_non_identifying() -> None:
    ds = _dataset("CT_small.dcm")
    image = _decode("CT_small.dcm")
    assert set(image.meta) == ALLOWED_META
    assert image.meta == {
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SOPInstanceUID": ds.SOPInstanceUID,
        "Modality": "CT",
        "frames": 1,
        "frame": 0,
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "PhotometricInterpretation": "MONOCHROME2",
        "bit_depth": 16,
        "width": 128,
        "height": 128,
    }
    for value in (ds.PatientName, ds.PatientID):
        assert str(value) not in repr(image.meta)


def test_error_details_never_contain_patient_data() -> None:
    ds = _dataset("CT_small.dcm")
    secrets = [str(ds.PatientName), str(ds.PatientID)]
    data = _bytes("CT_small.dcm")
    no_pixels = ds.copy()
    del no_pixels.PixelData
    failures: list[Callable[[], object]] = [
        lambda: decode_dicom(data[:3000]),
        lambda: decode_dicom(data, max_pixels=10),
        lambda: decode_dicom(data, frame=4),
        lambda: decode_dicom(_to_bytes(no_pixels)),
    ]
    for failure in failures:
        with pytest.raises(ServiceError) as caught:
            failure()
        for secret in secrets:
            assert secret not in caught.value.detail


def test_a_header_only_image_is_not_called_truncated() -> None:
    # pydicom-data's TINY_ALPHA stubs (CT headers, no Pixel Data) read whole: the message
    # names that case too, not only a cut file.
    ds = _dataset("CT_small.dcm")
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(InvalidDicom, match="truncated or corrupt file, or an image's header "
                                           "only"):
        decode_dicom(buf.getvalue())

"""The lookup-table grey decode against the per-pixel pipeline it replaced.

``tests/imaging/reference_voi.py`` keeps the previous implementation verbatim. Every grey
pydicom-data file the suite uses, the suite's own DICOM phantoms, and crafted datasets for
what those files lack must decode to the same float32 bits, with the table used
(``table``) and at the default size threshold (``default``: small images still run per
pixel). Colour images never take the table path.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from service.imaging import dicom, j2k
from service.imaging.dicom import Window, decode_dicom
from tests.imaging import reference_voi
from tests.imaging.test_dicom import functional_group

# Every pydicom-data image the rest of the suite decodes (grep tests/ for the names), plus
# RG3_UNCR.dcm, the uncompressed twin of RG3_J2KR.dcm.
GREY_FILES = [
    "CT_small.dcm",  # signed, rescale, Pixel Padding Value -2000 (absent from the image)
    "MR_small.dcm",  # signed, first window
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",  # big endian stored values
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "JPEG2000.dcm",  # signed, min-max
    "JPEG2000_UNC.dcm",
    "image_dfl.dcm",  # 8-bit, deflated
    "vlut_04.dcm",  # 8-bit, VOI LUT Sequence
    "mlut_18.dcm",  # Modality LUT Sequence
    "emri_small.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_big_endian.dcm",
    "RG1_UNCR.dcm",  # 15-bit CR, MONOCHROME1, window 15000/30000
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
    "RG3_UNCR.dcm",  # 10-bit CR, MONOCHROME1, window 550/1024
    "RG3_J2KR.dcm",
    "MR2_J2KI.dcm",
    "MR2_J2KR.dcm",
    "693_J2KR.dcm",  # signed, codestream precision below Bits Stored
]
COLOUR_FILES = [
    "SC_rgb.dcm",
    "SC_rgb_16bit.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_expb.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_ybr_full_uncompressed.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "US1_UNCR.dcm",
    "US1_J2KR.dcm",
    "US1_J2KI.dcm",
    "OBXXXX1A.dcm",
    "OBXXXX1A_rle.dcm",
    "OBXXXX1A_expb.dcm",
    "OT-PAL-8-face.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "gdcm-US-ALOKA-16_big.dcm",
]
# The suite's own DICOM phantoms (tests/data/dicom).
PHANTOMS = sorted((Path(__file__).resolve().parents[1] / "data" / "dicom").glob("*.dcm"))
WINDOWS: list[Window] = [None, "none", (100.0, 300.0), (15000.0, 30000.0)]


def _bytes(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the installed pydicom-data"
    return Path(path).read_bytes()


def _assert_same_bits(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype == np.float32
    assert got.shape == expected.shape
    # As uint32: bit-identical, which also tells -0.0 from 0.0 and compares NaNs.
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.fixture(params=["table", "default"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "table":
        monkeypatch.setattr(dicom, "_TABLE_BREAK_EVEN", 0.0)
    yield request.param


@pytest.fixture
def table_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the images the table path decoded (to the end, without falling back)."""
    runs: list[tuple[int, ...]] = []
    original = dicom._grey01_by_table

    def spy(stored: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        pixels = original(stored, *args, **kwargs)  # type: ignore[arg-type]
        runs.append(stored.shape)
        return pixels

    monkeypatch.setattr(dicom, "_grey01_by_table", spy)
    return runs


def _check(data: bytes, mode: str, table_runs: list[tuple[int, ...]], *, frame: int = 0,
           windows: list[Window] = WINDOWS, table: bool = True) -> None:
    stored, ds, photometric = reference_voi.stored_values(data, frame)
    big = stored.size >= 1 << (8 * stored.dtype.itemsize)
    if mode == "default" and big:
        windows = windows[:1]  # the path "table" takes with every window
    for window in windows:
        table_runs.clear()
        with np.errstate(over="ignore"):  # the old path warns of exp() overflow (SIGMOID)
            expected = reference_voi.grey01(stored, ds, frame, window, photometric)
        got = decode_dicom(data, frame=frame, window=window).pixels
        _assert_same_bits(got, expected)
        assert bool(table_runs) == (table and (mode == "table" or big)), window


# ---- pydicom-data ------------------------------------------------------------------


@pytest.mark.parametrize("name", GREY_FILES)
def test_files_decode_to_the_same_bits(name: str, mode: str,
                                       table_runs: list[tuple[int, ...]]) -> None:
    data = _bytes(name)
    frame = 3 if name.startswith("emri_small") else 0
    _check(data, mode, table_runs, frame=frame)


@pytest.mark.parametrize("path", PHANTOMS, ids=[p.name for p in PHANTOMS])
def test_phantoms_decode_to_the_same_bits(path: Path, mode: str,
                                          table_runs: list[tuple[int, ...]]) -> None:
    _check(path.read_bytes(), mode, table_runs)


def test_files_cover_what_the_table_must_reproduce() -> None:
    """The files reach every branch of the pipeline (crafted datasets add the variants)."""
    seen: dict[str, set[str]] = {"big": set(), "signed": set(), "8-bit": set(),
                                 "MONOCHROME1": set(), "window": set(), "no VOI": set(),
                                 "VOI LUT": set(), "Modality LUT": set(), "padding": set()}
    for name in GREY_FILES:
        arr, ds, photometric = reference_voi.stored_values(_bytes(name))
        for case, present in (
            ("big", arr.size >= 1 << 16),
            ("signed", arr.dtype.kind == "i"),
            ("8-bit", arr.dtype.itemsize == 1),
            ("MONOCHROME1", photometric == "MONOCHROME1"),
            ("window", "WindowCenter" in ds),
            ("no VOI", "WindowCenter" not in ds and "VOILUTSequence" not in ds),
            ("VOI LUT", "VOILUTSequence" in ds),
            ("Modality LUT", "ModalityLUTSequence" in ds),
            ("padding", "PixelPaddingValue" in ds),
        ):
            if present:
                seen[case].add(name)
    assert all(seen.values()), {case: names for case, names in seen.items() if not names}


def test_reduced_jpeg2000_decodes_to_the_same_bits(table_runs: list[tuple[int, ...]]) -> None:
    data = _bytes("RG1_J2KR.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    codestream = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    stream = j2k.parse(codestream)
    assert stream is not None
    stored = j2k.decode_reduced(codestream, stream, 2, int(ds.PixelRepresentation))
    assert stored is not None
    expected = reference_voi.grey01(stored, ds, 0, None, "MONOCHROME1")
    got = decode_dicom(data, min_size=(256, 256)).pixels
    _assert_same_bits(got, expected)
    assert table_runs == [(489, 461)]


@pytest.mark.parametrize("name", COLOUR_FILES)
def test_colour_never_builds_a_table(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom, "_TABLE_BREAK_EVEN", 0.0)
    monkeypatch.setattr(dicom, "_grey01_by_table", lambda *a, **k: pytest.fail("table"))
    assert decode_dicom(_bytes(name)).pixels.ndim in (2, 3)


# ---- Crafted datasets: what pydicom-data lacks ------------------------------------

SHAPE = (300, 260)  # 78,000 pixels: above the default threshold for 16-bit tables


def _file(stored: np.ndarray, *, bits_stored: int | None = None,
          photometric: str = "MONOCHROME2", **attributes: object) -> bytes:
    """A Secondary Capture of ``stored`` (its dtype sets Bits Allocated and signedness)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * stored.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    for keyword, value in attributes.items():
        if isinstance(value, DataElement):
            ds[value.tag] = value
        else:
            setattr(ds, keyword, value)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _lut_item(descriptor: list[int], data: np.ndarray | list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item["LUTData"] = DataElement(0x00283006, "US", [int(v) for v in data])
    return item


def _values(low: int, high: int, dtype: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high + 1, SHAPE).astype(dtype)


def _ct_with_padding(limit: int | None) -> bytes:
    stored = _values(-1000, 3000, "i2")
    stored[:40, :40] = -2000
    stored[-5:, -5:] = -1700  # inside the range limit, when there is one
    extra = {} if limit is None else {"PixelPaddingRangeLimit": limit}
    return _file(stored, RescaleSlope=1, RescaleIntercept=-1024, PixelPaddingValue=-2000,
                 **extra)


def _padding_not_in_image() -> bytes:
    # Between the image's extremes, but no pixel holds it: it must not matter.
    return _file(_values(0, 4000, "u2") & ~np.uint16(1), bits_stored=12,
                 PixelPaddingValue=1001)


def _modality_lut(monotonic: bool, bits: int = 16) -> bytes:
    rng = np.random.default_rng(1)
    data = np.arange(4096) * 13 if monotonic else rng.integers(0, 2**bits, 4096)
    item = _lut_item([4096, -2048, bits], data)
    # Some values below and above the LUT's input range: they clamp to its ends.
    return _file(_values(-2500, 2500, "i2"), ModalityLUTSequence=[item])


def _short_modality_lut() -> bytes:
    # The descriptor claims 4096 entries, the data hold 100: only values the image lacks
    # fall off the end, so the table gives way to the per-pixel path.
    item = _lut_item([4096, 0, 16], np.arange(100) * 7)
    return _file(_values(0, 99, "u2"), ModalityLUTSequence=[item])


def _voi_lut(monotonic: bool) -> bytes:
    # Declared 10 bits (top 1023) but entries above it; the largest entry (5000, at index
    # 50) is one no pixel uses, so the scale comes from the largest used one (3000).
    data = np.arange(1024) * 2 if monotonic else np.random.default_rng(2).integers(0, 1024, 1024)
    if not monotonic:
        data[50] = 5000
        data[700] = 3000
    stored = _values(100, 1123, "u2")
    stored[stored == 150] = 151
    stored[0, 0] = 800  # index 700
    return _file(stored, bits_stored=12, VOILUTSequence=[_lut_item([1024, 100, 10], data)])


def _window(function: str, width: float, *, signed: bool = False, slope: float = 0.5,
            photometric: str = "MONOCHROME2") -> bytes:
    stored = _values(-2048, 2047, "i2") if signed else _values(0, 4095, "u2")
    return _file(stored, bits_stored=12, photometric=photometric, RescaleSlope=slope,
                 RescaleIntercept=-100, WindowCenter=700, WindowWidth=width,
                 VOILUTFunction=function)


def _eight_bit(signed: bool) -> bytes:
    stored = _values(-128, 127, "i1") if signed else _values(0, 255, "u1")
    return _file(stored, photometric="MONOCHROME1", RescaleSlope=-2, RescaleIntercept=10)


def _garbage_above_bits_stored(signed: bool) -> bytes:
    # pydicom clears bits above Bits Stored; the decode must too when a writer left some.
    stored = _values(-2048, 2047, "i2") if signed else _values(0, 4095, "u2")
    raw = stored.view(np.uint16).copy()
    raw[::7, ::3] |= np.uint16(0xA000)
    return _file(raw.view(stored.dtype), bits_stored=12, WindowCenter=100, WindowWidth=900)


def _thirty_two_bit() -> bytes:
    return _file(_values(0, 2**20 - 1, "u4"), bits_stored=20)


def _enhanced_multiframe() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(_bytes("emri_small.dcm")))

    ds.SharedFunctionalGroupsSequence = [
        functional_group("PixelValueTransformationSequence", RescaleSlope=2,
                         RescaleIntercept=-10)
    ]
    per_frame = [functional_group("FrameVOILUTSequence", WindowCenter=300,
                                  WindowWidth=200)] * 10
    per_frame[2] = functional_group("FrameVOILUTSequence", WindowCenter=100, WindowWidth=50,
                        VOILUTFunction="SIGMOID")
    ds.PerFrameFunctionalGroupsSequence = per_frame
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


CRAFTED: dict[str, tuple[Callable[[], bytes], bool]] = {
    # name: (file, whether the table path holds to the end)
    "padding value": (lambda: _ct_with_padding(None), True),
    "padding range limit": (lambda: _ct_with_padding(-1500), True),
    "padding value not in the image": (_padding_not_in_image, True),
    "modality LUT, monotonic": (lambda: _modality_lut(True), True),
    "modality LUT, unordered": (lambda: _modality_lut(False), True),
    "modality LUT, 12-bit entries": (lambda: _modality_lut(False, 12), True),
    "modality LUT shorter than declared": (_short_modality_lut, False),
    "VOI LUT, monotonic, beyond its bits": (lambda: _voi_lut(True), True),
    "VOI LUT, unordered, beyond its bits": (lambda: _voi_lut(False), True),
    "LINEAR": (lambda: _window("LINEAR", 800), True),
    "LINEAR width < 1 (min-max)": (lambda: _window("LINEAR", 0.5), True),
    "LINEAR_EXACT": (lambda: _window("LINEAR_EXACT", 0.5), True),
    "LINEAR_EXACT signed MONOCHROME1": (
        lambda: _window("LINEAR_EXACT", 300, signed=True, photometric="MONOCHROME1"), True),
    "SIGMOID": (lambda: _window("SIGMOID", 400), True),
    "SIGMOID signed, negative slope": (lambda: _window("SIGMOID", 50, signed=True, slope=-3),
                                       True),
    "unknown VOI LUT Function (min-max)": (lambda: _window("CUBIC", 400), True),
    "8-bit unsigned": (lambda: _eight_bit(False), True),
    "8-bit signed": (lambda: _eight_bit(True), True),
    "bits above Bits Stored, unsigned": (lambda: _garbage_above_bits_stored(False), True),
    "bits above Bits Stored, signed": (lambda: _garbage_above_bits_stored(True), True),
    "32-bit stored values": (_thirty_two_bit, False),
}


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_decode_to_the_same_bits(name: str, mode: str,
                                         table_runs: list[tuple[int, ...]]) -> None:
    build, table = CRAFTED[name]
    _check(build(), mode, table_runs, table=table)


@pytest.mark.parametrize("frame", [2, 5])
def test_enhanced_multiframe_decodes_to_the_same_bits(
    frame: int, mode: str, table_runs: list[tuple[int, ...]]
) -> None:
    _check(_enhanced_multiframe(), mode, table_runs, frame=frame)


def test_32_bit_values_run_per_pixel_within_tolerance(table_runs: list[tuple[int, ...]]) -> None:
    data = _thirty_two_bit()
    for window in WINDOWS:
        expected = reference_voi.decode_grey(data, 0, window)
        got = decode_dicom(data, window=window).pixels
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert not table_runs


def test_unused_bits_are_cleared_as_pydicom_does() -> None:
    data = _garbage_above_bits_stored(False)
    ds = pydicom.dcmread(io.BytesIO(data))
    stored = ds.pixel_array
    assert int(stored.max()) <= 4095  # pydicom cleared them
    expected = np.clip((stored - 100.0 + 0.5) / 899 + 0.5, 0, 1)
    np.testing.assert_allclose(decode_dicom(data).pixels, expected, atol=1e-6)


def test_random_pipelines_decode_to_the_same_bits(table_runs: list[tuple[int, ...]]) -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        dtype = str(rng.choice(["u1", "i1", "u2", "i2"]))
        bits = 8 * int(dtype[1])
        bits_stored = int(rng.integers(max(bits - 6, 2), bits + 1))
        signed = dtype[0] == "i"
        low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed \
            else (0, 2**bits_stored - 1)
        span = sorted(int(v) for v in rng.integers(low, high + 1, 2))
        stored = rng.integers(span[0], span[1] + 1, SHAPE).astype(dtype)
        attributes: dict[str, object] = {}
        if rng.random() < 0.7:
            attributes.update(RescaleSlope=float(rng.choice([1, 0.25, -1.5, 3])),
                              RescaleIntercept=float(rng.integers(-1024, 1024)))
        if rng.random() < 0.6:
            attributes.update(
                WindowCenter=float(rng.integers(low, high + 1)),
                WindowWidth=float(rng.choice([1, 2, 10, 300, 5000])),
                VOILUTFunction=str(rng.choice(["LINEAR", "LINEAR_EXACT", "SIGMOID"])))
        if rng.random() < 0.3:
            attributes["PixelPaddingValue"] = int(stored.flat[0])
        photometric = str(rng.choice(["MONOCHROME1", "MONOCHROME2"]))
        data = _file(stored, bits_stored=bits_stored, photometric=photometric, **attributes)
        windows: list[Window] = [None, "none", (float(rng.integers(low, high + 1)), 77.0)]
        _check(data, "default", table_runs, windows=windows)

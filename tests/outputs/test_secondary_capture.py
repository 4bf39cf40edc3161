"""Secondary Captures without a model: rendering, study membership, copied attributes."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from service.errors import NotAcceptable
from service.imaging import decode
from service.imaging.base import DecodedImage
from service.methods import METHODS
from service.outputs.render import Canvas
from service.outputs.secondary_capture import (
    PATIENT_STUDY_KEYWORDS,
    SERIES_BASE,
    Caption,
    Explained,
    capture_series,
    is_capturable,
    render,
    series_number,
)
from tests.dicom_tools import dciodvfy, dcmdump
from tests.outputs import reference

DATA = Path(__file__).resolve().parents[1] / "data"
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"
CAPTION = Caption("gradcam", "Nodule", 0.873, "demo-cxr", "1", "0.1.0", not_for_diagnosis=True)


def _blob(height: int, width: int) -> np.ndarray:
    """A map that is zero outside one blob, like a CAM after ReLU."""
    yy, xx = np.mgrid[0:height, 0:width]
    blob = 3.0 - np.hypot((yy - 0.4 * height) / (0.08 * height),
                          (xx - 0.6 * width) / (0.08 * width))
    return np.maximum(blob, 0).astype(np.float32)


def _write(data: bytes) -> DecodedImage:
    return decode(data, "application/dicom")


def _with(path: Path | str, **changes: object) -> bytes:
    """The file with some values replaced, invalid ones included (no validation)."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        tag = tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _capture(image: DecodedImage, *items: Explained) -> list[Dataset]:
    parts = capture_series(image, list(items) or [Explained(_blob(image.height, image.width),
                                                            CAPTION)],
                           software_version="0.1.0")
    return [pydicom.dcmread(io.BytesIO(p)) for p in parts]


def test_render_is_the_overlay_above_a_caption_panel() -> None:
    image = _write(PHANTOM.read_bytes())
    heat = _blob(image.height, image.width)
    picture = Canvas(image, image.pixels).overlay(heat, False, image.height, image.width,
                                                  rgb=True)
    rgb = render(picture, CAPTION)
    assert rgb.dtype == np.uint8 and rgb.shape[1:] == (image.width, 3)
    assert rgb.shape[0] > image.height
    np.testing.assert_array_equal(rgb[: image.height], picture)
    expected = reference.overlay(reference.strength(heat, image.height, image.width),
                                 image.pixels)
    assert np.abs(picture.astype(int) - expected).max() <= 1
    grey = np.round(image.pixels * 255)
    zero = heat == 0
    assert zero.mean() > 0.5
    for channel in range(3):
        np.testing.assert_allclose(rgb[: image.height][zero][:, channel], grey[zero], atol=0.5)
    panel = rgb[image.height :].reshape(-1, 3).astype(int)
    assert len(np.unique(panel, axis=0)) > 50
    assert ((panel[:, 0] > 200) & (panel[:, 1] < 60) & (panel[:, 2] < 60)).any(), "red end"
    assert ((panel[:, 2] > 150) & (panel[:, 0] < 40) & (panel[:, 1] < 40)).any(), "blue end"
    assert (panel.min(axis=1) > 200).sum() > 20, "white caption text"


def test_capture_draws_a_map_of_its_own_grid_upsampled_once() -> None:
    image = _write(PHANTOM.read_bytes())
    cam = _blob(16, 16)
    (sc,) = _capture(image, Explained(cam, CAPTION))
    picture = sc.pixel_array[: image.height]
    expected = reference.overlay(reference.strength(cam, image.height, image.width),
                                 image.pixels)
    assert np.abs(picture.astype(int) - expected).max() <= 1


def test_capture_joins_the_source_study_in_a_new_series() -> None:
    source = pydicom.dcmread(PHANTOM)
    image = _write(PHANTOM.read_bytes())
    (sc,) = _capture(image)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID not in (source.SOPInstanceUID, sc.SeriesInstanceUID)
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sc.get(keyword) == source.get(keyword), keyword
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert "ReferencedFrameNumber" not in ref
    assert sc.PatientOrientation == source.PatientOrientation
    assert (sc.Modality, sc.Manufacturer, sc.SeriesDescription) == (
        "OT", "medexplain", "medexplain gradcam Nodule")
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert sc.BurnedInAnnotation == "NO"
    assert (sc.Columns, sc.Rows > source.Rows) == (source.Columns, True)


def test_one_series_per_method_with_its_own_number_and_description() -> None:
    image = _write(PHANTOM.read_bytes())
    heat = _blob(image.height, image.width)
    crm = Caption("crm", None, None, "demo-cxr", "1", "0.1.0")
    effusion = replace(CAPTION, label="Pleural Effusion")
    a, b, c = _capture(image, Explained(heat, CAPTION), Explained(heat, crm),
                       Explained(heat, effusion))
    assert a.SeriesInstanceUID == c.SeriesInstanceUID != b.SeriesInstanceUID
    assert len({a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID}) == 3
    assert [(x.SeriesNumber, x.InstanceNumber) for x in (a, b, c)] == [
        (9913, 1), (9911, 1), (9913, 2)]
    assert a.SeriesDescription == c.SeriesDescription == "medexplain gradcam Nodule,Pleural Effusion"
    assert b.SeriesDescription == "medexplain crm all"
    assert "crm explanation of all classes" in b.DerivationDescription


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_has_its_own_series_number(method: str) -> None:
    numbers = {m: series_number(SERIES_BASE, [m]) for m in METHODS}
    assert len(set(numbers.values())) == len(METHODS)
    assert numbers[method] == 9911 + list(METHODS).index(method)
    assert series_number(SERIES_BASE, [method, method]) == numbers[method]
    assert series_number(SERIES_BASE, [method, "crm" if method != "crm" else "gradcam"]) == 9910


@pytest.mark.parametrize(("name", "frame", "referenced"), [
    ("emri_small.dcm", 3, 4),  # MR Image Storage, a multi-frame class
    # Two frames under Secondary Capture Image Storage, a single-frame class: Referenced
    # Frame Number is not allowed there (dciodvfy's Error), so none is named.
    ("SC_rgb_2frame.dcm", 1, None),
])
def test_multi_frame_source_is_referenced_by_frame(name: str, frame: int,
                                                   referenced: int | None) -> None:
    path = get_testdata_file(name, download=False)
    assert path is not None
    image = decode(Path(path).read_bytes(), "application/dicom", frame=frame)
    assert int(image.meta["frames"]) > 1
    (part,) = capture_series(image, [Explained(_blob(image.height, image.width), CAPTION)],
                             software_version="0.1.0", frame=frame)
    sc = pydicom.dcmread(io.BytesIO(part))
    assert sc.SourceImageSequence[0].get("ReferencedFrameNumber") == referenced
    assert sc.StudyInstanceUID == pydicom.dcmread(path).StudyInstanceUID


def test_values_are_copied_without_validation_or_warnings(
        recwarn: pytest.WarningsRecorder) -> None:
    # Invalid values (a date that is no date, a code string in lower case, an over-long
    # ID) are the source's business: copied as they are, and never quoted in a warning.
    data = _with(PHANTOM, PatientBirthDate="CANARY-BD", PatientSex="canary",
                 PatientID="CANARY-ID" * 10, PatientName="CANARY-NAME")
    parts = capture_series(_write(data), [Explained(np.ones((256, 256)), CAPTION)],
                           software_version="0.1.0")
    assert not [str(w.message) for w in recwarn]
    sc = pydicom.dcmread(io.BytesIO(parts[0]))
    values = [sc[k].value for k in ("PatientBirthDate", "PatientSex", "PatientID")]
    assert values == ["CANARY-BD", "canary", "CANARY-ID" * 10]


def test_non_ascii_names_are_kept() -> None:
    data = _with(PHANTOM, SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    (sc,) = _capture(_write(data))
    assert sc.SpecificCharacterSet == "ISO_IR 192"
    assert str(sc.PatientName) == "Müller^Jürgen"


def test_unknown_orientation_is_left_empty() -> None:
    data = _with(PHANTOM, PatientOrientation="X\\Y")
    (sc,) = _capture(_write(data))
    assert "PatientOrientation" in sc and not sc.PatientOrientation


def test_only_dicom_with_valid_uids_is_capturable() -> None:
    assert is_capturable(_write(PHANTOM.read_bytes()))
    png = decode((DATA / "phantoms" / "normal.png").read_bytes(), "image/png")
    assert png.source is None and not is_capturable(png)
    assert not is_capturable(_write(_with(PHANTOM, StudyInstanceUID="not a uid")))
    with pytest.raises(ValueError, match="no DICOM source study"):
        capture_series(png, [], software_version="0")


def test_source_header_has_no_pixel_data_and_stays_out_of_repr() -> None:
    image = _write(PHANTOM.read_bytes())
    assert image.source is not None
    assert "PixelData" not in image.source and "PatientName" in image.source
    assert "PHANTOM" not in repr(image)


@pytest.mark.parametrize("name", ["phantom", "RG1_J2KR.dcm"])
def test_dicom3tools_finds_no_errors(tmp_path: Path, name: str) -> None:
    path = PHANTOM if name == "phantom" else get_testdata_file(name, download=False)
    assert path is not None
    image = _write(Path(path).read_bytes())
    capture = capture_series(image, [Explained(_blob(image.height, image.width), CAPTION)],
                             software_version="0.1.0")[0]
    report = dciodvfy(capture, tmp_path, "sc.dcm")
    assert "SCImage" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    dump = dcmdump(tmp_path / "sc.dcm")
    if dump is not None:
        assert dump.returncode == 0, dump.stderr
        assert "SecondaryCaptureImageStorage" in dump.stdout


def test_too_tall_for_a_capture_is_not_acceptable() -> None:
    tall = DecodedImage(pixels=np.zeros((65500, 4), np.float32), format="dicom",
                        meta=_write(PHANTOM.read_bytes()).meta,
                        source=_write(PHANTOM.read_bytes()).source)
    with pytest.raises(NotAcceptable, match="65535"):
        capture_series(tall, [Explained(np.zeros((65500, 4)), CAPTION)], software_version="0")


def test_oblique_orientation_is_kept() -> None:
    # "PF" is legal DICOM (PS3.3 C.7.6.1.1.1) but no value highdicom's SCImage takes: it
    # raised ValueError (a 500), and is now set after highdicom's checks.
    data = _with(PHANTOM, PatientOrientation="PF\\L")
    (sc,) = _capture(_write(data))
    assert list(sc.PatientOrientation) == ["PF", "L"]

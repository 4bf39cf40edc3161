"""POST /explain?dicom=sr: the scores and regions as a DICOM Structured Report (TID 1500)."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import Comprehensive3DSRStorage

from service.imaging import decode
from service.methods import METHODS
from service.models.spec import LabelCode
from service.outputs.secondary_capture import PATIENT_STUDY_KEYWORDS
from service.outputs.structured_report import (
    SCHEME,
    Finding,
    Region,
    Report,
    rectangle,
    structured_report,
)
from tests.api.conftest import (
    DATA,
    MODELS,
    assert_problem,
    multipart_parts,
    phantom_bytes,
    post_dicom,
    read_dicom,
)
from tests.api.test_privacy import (  # noqa: F401  (sink is a fixture)
    Sink,
    _assert_clean,
    _invalid_values,
    _valid,
    sink,
)
from tests.dicom_tools import dciodvfy

DICOM = "application/dicom"
MULTIPART = 'multipart/related; type="application/dicom"'
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"
PARAMS = {"methods": "gradcam,crm,crm_combined", "classes": "Nodule,Cardiomegaly"}


_post, _read = post_dicom, read_dicom

# The demo model's label codes, as its model.toml writes them.
DEMO_CODES = tomllib.loads((MODELS / "demo-cxr" / "model.toml").read_text())["codes"]


def _srread(data: bytes) -> highdicom.sr.Comprehensive3DSR:
    return highdicom.sr.srread(io.BytesIO(data))  # type: ignore[return-value]


def _report(sr: highdicom.sr.Comprehensive3DSR) -> highdicom.sr.MeasurementReport:
    return highdicom.sr.MeasurementReport.from_sequence(sr.content, is_root=True)


def _groups(sr: highdicom.sr.Comprehensive3DSR) -> list:  # type: ignore[type-arg]
    return _report(sr).get_planar_roi_measurement_groups()  # type: ignore[no-any-return]


def _texts(group) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The group's TEXT items (Algorithm Name, Algorithm Version, ...) by concept name."""
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
            for item in group[0].ContentSequence if item.ValueType == "TEXT"}


def _measurement(group, meaning: str):  # type: ignore[no-untyped-def]
    found = [m for m in group.get_measurements() if m.name.meaning == meaning]
    return found[0] if found else None


def test_sr_holds_every_region_with_the_json_scores(client: TestClient) -> None:
    data = PHANTOM.read_bytes()
    source = _read(data)
    expected = _post(client, data, None, **PARAMS).json()
    r = _post(client, data, DICOM, dicom="sr", **PARAMS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM
    assert r.headers["vary"] == "Accept"

    ds = _read(r.content)
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID not in (source.SOPInstanceUID, ds.SeriesInstanceUID)
    # The methods name the series (shortened to fit LO), the demo model says it is not
    # for diagnosis; a report of several methods is series 9930.
    assert ds.SeriesDescription == ("medexplain findings gradcam,c... - demo model, not for "
                                    "diagnosis")
    assert len(ds.SeriesDescription) == 64
    assert ds.SeriesNumber == 9930
    one = _read(_post(client, data, DICOM, dicom="sr", methods="crm_combined").content)
    assert one.SeriesDescription == "medexplain findings crm_combined - demo model, not for diagnosis"
    assert one.SeriesNumber == 9931 + list(METHODS).index("crm_combined")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # Evidence: the source instance, in its series of the same study.
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == source.SOPClassUID

    sr = _srread(r.content)
    groups = _groups(sr)
    regions = [(e, region) for e in expected["explanations"] for region in e["regions"]]
    assert len(regions) >= len(expected["explanations"]) == 5  # crm_combined: one
    assert len(groups) == len(regions)
    scores = {p["index"]: p["score"] for p in expected["predictions"]}
    for group, (explanation, region) in zip(groups, regions, strict=True):
        roi = group.roi
        assert roi is not None and roi.graphic_type == highdicom.sr.GraphicTypeValues.POLYLINE
        x0, y0, x1, y1 = region["box"]
        # Pixel edges: the box numbers themselves, as (column, row), closed.
        np.testing.assert_array_equal(
            roi.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        np.testing.assert_array_equal(roi.value, rectangle(region["box"]))
        reference = roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert "ReferencedFrameNumber" not in reference  # single-frame source

        label = explanation["label"]
        if label is None:
            assert (group.finding_type.value, group.finding_type.scheme_designator,
                    group.finding_type.meaning) == ("all", SCHEME, "all classes")
        else:  # the model's code for the label (model.toml [codes], read here by tomllib)
            code = DEMO_CODES[label]
            assert (group.finding_type.value, group.finding_type.scheme_designator,
                    group.finding_type.meaning) == (code["value"], code["scheme"],
                                                    code["meaning"])
        assert group.method.value == explanation["method"]
        assert group.method.scheme_designator == SCHEME
        texts = _texts(group)
        assert texts["Algorithm Name"] == expected["model"]["name"]
        assert texts["Algorithm Version"] == expected["model"]["version"]

        score = _measurement(group, "score")
        if explanation["index"] is None:
            assert score is None
        else:
            assert float(score.value) == scores[explanation["index"]]
            assert score.unit.value == "1" and score.unit.scheme_designator == "UCUM"
        peak = _measurement(group, "peak score")
        assert float(peak.value) == region["score"]
        assert peak.unit.value == "1"


def test_sr_algorithm_identification(client: TestClient) -> None:
    r = _post(client, PHANTOM.read_bytes(), DICOM, dicom="sr", methods="gradcam")
    assert r.status_code == 200, r.text
    models = client.get("/models").json()
    default = next(m for m in models["models"] if m["name"] == models["default"])
    ds = _read(r.content)
    assert ds.Manufacturer == "medexplain"
    assert ds.ManufacturerModelName == default["name"]
    (group,) = _groups(_srread(r.content))  # the phantom's nodule: one region
    texts = _texts(group)
    assert texts["Algorithm Name"] == default["name"]
    assert texts["Algorithm Version"] == default["version"]
    # Measurements name the algorithm too (TID 300 row "Algorithm Name").
    for measurement in group.get_measurements():
        names = [item.TextValue for item in measurement[0].ContentSequence
                 if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"]
        assert names == [default["name"]]


def test_multipart_sr_is_one_part(client: TestClient) -> None:
    data = PHANTOM.read_bytes()
    r = _post(client, data, MULTIPART, dicom="sr", **PARAMS)
    assert r.status_code == 200, r.text
    (part,) = multipart_parts(r)
    assert _read(part).SOPClassUID == Comprehensive3DSRStorage


def test_sr_needs_a_dicom_upload_and_a_known_object(client: TestClient) -> None:
    png = phantom_bytes("normal.png")
    r = client.post("/explain", content=png, params={"dicom": "sr"},
                    headers={"content-type": "image/png", "accept": DICOM})
    body = assert_problem(r, 406, "not_acceptable")
    assert "this upload is png" in str(body["detail"])
    # JSON ignores the parameter.
    r = _post(client, PHANTOM.read_bytes(), None, dicom="sr", methods="gradcam")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert_problem(_post(client, PHANTOM.read_bytes(), DICOM, dicom="pdf"), 422,
                   "invalid_parameter")
    # sc stays the default.
    r = _post(client, PHANTOM.read_bytes(), DICOM, dicom="sc", methods="gradcam")
    assert _read(r.content).Modality == "OT"


def test_region_coordinates_and_region_less_findings() -> None:
    image = decode(PHANTOM.read_bytes(), DICOM)
    data = structured_report(
        image,
        [Finding("gradcam", "Nodule", 0.25, [Region((0, 0, 1, 1), 1.0)]),
         Finding("crm", "Cardiomegaly", 0.5, [])],
        Report("m", "2", "0", not_for_diagnosis=False))
    sr = _srread(data)
    assert _read(data).SeriesDescription == "medexplain findings gradcam,crm"
    assert _read(data).SeriesNumber == 9930  # several methods
    (group,) = _groups(sr)
    # The top-left pixel alone: its edges, around its centre (0.5, 0.5).
    np.testing.assert_array_equal(group.roi.value, [[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]])
    (image_level,) = _report(sr).get_image_measurement_groups()
    assert image_level.finding_type.meaning == "Cardiomegaly"
    assert image_level.finding_type.scheme_designator == SCHEME  # no code given: local
    assert float(_measurement(image_level, "score").value) == 0.5


def test_a_label_with_a_code_is_reported_as_that_concept() -> None:
    image = decode(PHANTOM.read_bytes(), DICOM)
    code = LabelCode("SCT", "287272002", "Cardiomegaly")
    sr = _srread(structured_report(
        image, [Finding("gradcam", "Big heart", 0.5, [Region((0, 0, 1, 1), 1.0)], code),
                Finding("crm", "Big heart", 0.5, [], code)],
        Report("m", "2", "0")))
    (group,) = _groups(sr)
    (image_level,) = _report(sr).get_image_measurement_groups()
    for found in (group.finding_type, image_level.finding_type):
        assert (found.value, found.scheme_designator, found.meaning) == (
            "287272002", "SCT", "Cardiomegaly")
    assert group.method.scheme_designator == SCHEME  # methods stay local


def test_dciodvfy_accepts_the_sr(client: TestClient, tmp_path: Path) -> None:
    r = _post(client, PHANTOM.read_bytes(), DICOM, dicom="sr", **PARAMS)
    assert r.status_code == 200, r.text
    report = dciodvfy(r.content, tmp_path, "sr.dcm")
    assert "Comprehensive3DSR" in report
    assert not [line for line in report.splitlines() if "Error" in line], report


@pytest.mark.parametrize("make", [_valid, _invalid_values])
@pytest.mark.parametrize("accept", [DICOM, MULTIPART])
def test_no_patient_data_in_logs_while_building_an_sr(
        client: TestClient, sink: Sink,  # noqa: F811
        capfd: pytest.CaptureFixture[str], make, accept: str) -> None:  # type: ignore[no-untyped-def]
    data = make()
    r = _post(client, data, accept, dicom="sr", **PARAMS)
    assert r.status_code == 200, r.text
    assert b"QZXCANARY" in r.content  # the patient's name is in the report itself
    captured = capfd.readouterr()
    _assert_clean(sink.records, "a log record")
    _assert_clean(sink.warnings, "a warning")
    _assert_clean([captured.out, captured.err], "stdout/stderr")


def _with_class(sop_class: str) -> bytes:
    ds = pydicom.dcmread(PHANTOM)
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_a_retired_sop_class_gets_406_not_a_500(client: TestClient) -> None:
    # The retired Ultrasound Image Storage (pydicom-data's color-pl.dcm has it): highdicom
    # checks an image region's source against the standard's IOD of its class, and raised
    # KeyError for one it does not have.
    data = _with_class("1.2.840.10008.5.1.4.1.1.6")
    body = assert_problem(_post(client, data, DICOM, dicom="sr", methods="gradcam"), 406,
                          "not_acceptable")
    assert "not a retired or private one" in str(body["detail"])
    # The capture needs no IOD of the source, and JSON none at all.
    assert _post(client, data, DICOM, dicom="sc", methods="gradcam").status_code == 200
    assert _post(client, data, None, dicom="sr", methods="gradcam").status_code == 200


def test_frames_of_a_single_frame_class_are_not_referenced(tmp_path: Path) -> None:
    # Two frames under Secondary Capture Image Storage, a single-frame class: Referenced
    # Frame Number is not allowed there (dciodvfy's Error), so the reference names none.
    path = get_testdata_file("SC_rgb_2frame.dcm", download=False)
    assert path is not None
    image = decode(Path(path).read_bytes(), DICOM, frame=1)
    assert image.meta["frames"] == 2
    data = structured_report(image, [Finding("gradcam", "Nodule", 0.25,
                                             [Region((0, 0, 2, 2), 1.0)])],
                             Report("m", "2", "0", not_for_diagnosis=False), frame=1)
    (group,) = _groups(_srread(data))
    assert "ReferencedFrameNumber" not in group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    report = dciodvfy(data, tmp_path, "sr.dcm")
    assert not [line for line in report.splitlines() if "Error" in line], report

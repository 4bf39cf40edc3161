"""POST /explain answering DICOM: content negotiation and the Secondary Captures it returns."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import SecondaryCaptureImageStorage

from service.api.negotiation import negotiate
from service.imaging import decode
from service.methods import METHODS
from service.outputs.base import Packaging
from service.outputs.secondary_capture import PATIENT_STUDY_KEYWORDS
from tests.api.conftest import (
    DATA,
    assert_problem,
    explanations_computed,
    multipart_parts,
    phantom_bytes,
    post_dicom,
    read_dicom,
)
from tests.dicom_tools import dciodvfy, dcmdump, sr_values
from tests.outputs import reference as drawing

DICOM = "application/dicom"
MULTIPART = 'multipart/related; type="application/dicom"'
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"


_post, _read = post_dicom, read_dicom


def _npy(data: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)


def test_accept_dicom_gives_a_secondary_capture_in_the_source_study(client: TestClient) -> None:
    data = PHANTOM.read_bytes()
    source = _read(data)
    params = {"methods": "gradcam", "classes": "Nodule"}
    r = _post(client, data, DICOM, **params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM
    assert r.headers["vary"] == "Accept"
    sc = _read(r.content)

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert sc.get(keyword) == source.get(keyword), keyword
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID not in (source.SOPInstanceUID, sc.SeriesInstanceUID)
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert sc.SeriesDescription == "medexplain gradcam Nodule"
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)

    # The image part is the overlay of the same map the JSON answer gives (on its own grid),
    # on the decoded image; where the map is zero it is the grey image itself.
    json = _post(client, data, None, heatmap="npy", size="feature", **params).json()
    cam = _npy(json["explanations"][0]["heatmap"]["data"])
    image = decode(data, DICOM)
    rgb = sc.pixel_array
    assert rgb.shape == (rgb.shape[0], source.Columns, 3) and rgb.shape[0] > source.Rows
    picture = rgb[: source.Rows]
    levels = drawing.strength(cam, source.Rows, source.Columns)
    assert np.abs(picture.astype(int) - drawing.overlay(levels, image.pixels)).max() <= 1
    heat = levels.astype(np.float32)
    zero = levels == 0
    grey = np.round(image.pixels * 255)
    if zero.any():
        for channel in range(3):
            np.testing.assert_allclose(picture[zero][:, channel], grey[zero], atol=0.5)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert len(set(picture[peak].tolist())) > 1, "the map's peak is coloured"

    # The caption panel: text and a colour bar, far from a flat strip.
    panel = rgb[source.Rows :].reshape(-1, 3).astype(int)
    assert len(np.unique(panel, axis=0)) > 50
    assert ((panel[:, 0] > 200) & (panel[:, 1] < 60) & (panel[:, 2] < 60)).any()
    assert ((panel[:, 2] > 150) & (panel[:, 0] < 40) & (panel[:, 1] < 40)).any()


def test_multipart_gives_one_capture_per_explanation(client: TestClient) -> None:
    data = PHANTOM.read_bytes()
    params = {"methods": "gradcam,crm", "classes": "Nodule,Cardiomegaly"}
    explanations = _post(client, data, None, **params).json()["explanations"]
    r = _post(client, data, MULTIPART, **params)
    assert r.status_code == 200, r.text
    captures = [_read(part) for part in multipart_parts(r)]
    assert len(captures) == len(explanations) == 4
    source = _read(data)
    assert {sc.StudyInstanceUID for sc in captures} == {source.StudyInstanceUID}
    # One series per method: its own UID, number and description.
    by_method = {e["method"]: sc.SeriesInstanceUID for sc, e in zip(captures, explanations)}
    assert len(set(by_method.values())) == 2 and source.SeriesInstanceUID not in by_method.values()
    assert len({sc.SOPInstanceUID for sc in captures}) == 4
    methods = [e["method"] for e in explanations]
    assert [(sc.SeriesNumber, sc.InstanceNumber) for sc in captures] == [
        (9911 + list(METHODS).index(m), methods[: i + 1].count(m)) for i, m in enumerate(methods)]
    for sc, e in zip(captures, explanations, strict=True):
        labels = ",".join(dict.fromkeys(x["label"] for x in explanations
                                        if x["method"] == e["method"]))
        assert sc.SeriesDescription == f"medexplain {e['method']} {labels}"
    for sc, e in zip(captures, explanations, strict=True):
        assert f"{e['method']} explanation of {e['label']}" in sc.DerivationDescription
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_captures_and_a_report_from_one_request(client: TestClient) -> None:
    """dicom=sc,sr: the captures, then the report, computed once; each as dicom=sc and
    dicom=sr answer alone. Only multipart/related carries several objects."""
    data = PHANTOM.read_bytes()
    params = {"methods": "gradcam,crm", "classes": "Nodule"}
    before = explanations_computed(client)
    r = _post(client, data, MULTIPART, dicom="sc,sr", **params)
    assert r.status_code == 200, r.text
    assert explanations_computed(client) - before == 2, "each method ran once for both objects"
    parts = [_read(part) for part in multipart_parts(r)]
    captures = [_read(p) for p in multipart_parts(_post(client, data, MULTIPART, **params))]
    report = _read(_post(client, data, DICOM, dicom="sr", **params).content)
    assert [d.Modality for d in parts] == ["OT", "OT", "SR"]
    for got, want in zip(parts, [*captures, report], strict=True):
        assert (got.SOPClassUID, got.SeriesNumber, got.SeriesDescription) == (
            want.SOPClassUID, want.SeriesNumber, want.SeriesDescription)
    for got, want in zip(parts, captures):
        np.testing.assert_array_equal(got.pixel_array, want.pixel_array)
    assert sr_values(parts[2]) == sr_values(report) != []
    # Reversed, in that order; a name given twice counts once.
    again = _post(client, data, MULTIPART, dicom="sr,sc,sr", **params)
    assert [_read(p).Modality for p in multipart_parts(again)] == ["SR", "OT", "OT"]
    # application/dicom is one object: refused, unless multipart/related is acceptable too.
    body = assert_problem(_post(client, data, DICOM, dicom="sc,sr", **params), 406,
                          "not_acceptable")
    assert body["detail"] == ("dicom=sc,sr answers several DICOM objects and application/dicom "
                              f"holds one: accept {MULTIPART}")
    either = _post(client, data, f"{DICOM}, {MULTIPART};q=0.5", dicom="sc,sr", **params)
    assert len(multipart_parts(either)) == 3
    for accept, status in ((DICOM, 406), ("*/*", 200)):
        r = client.post("/explain/dicom", content=data, params={"dicom": "sc,sr", **params},
                        headers={"content-type": DICOM, "accept": accept})
        assert r.status_code == status, r.text
    assert len(multipart_parts(r)) == 3


def test_real_compressed_radiograph(client: TestClient) -> None:
    path = get_testdata_file("RG1_J2KR.dcm", download=False)
    assert path is not None
    data = Path(path).read_bytes()
    r = _post(client, data, DICOM, methods="crm_combined")
    assert r.status_code == 200, r.text
    sc, source = _read(r.content), _read(data)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientName == source.PatientName == "CompressedSamples^RG1"
    assert sc.StudyDescription == source.StudyDescription == "THORAX"  # a PACS lists it
    assert sc.PatientOrientation == source.PatientOrientation
    assert sc.pixel_array.shape[1:] == (source.Columns, 3)
    assert sc.SeriesDescription == "medexplain crm_combined all"


@pytest.mark.parametrize("accept", [None, "", "*/*", "application/json", "application/*",
                                    "application/json, application/dicom",
                                    "text/html, application/json;q=0.1"])
def test_json_stays_the_default(client: TestClient, accept: str | None) -> None:
    r = _post(client, PHANTOM.read_bytes(), accept, methods="gradcam")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["vary"] == "Accept"
    assert r.json()["explanations"]


@pytest.mark.parametrize("accept", ["text/html", "image/png, text/*",
                                    # JPEG 2000 (lossy): a syntax not written
                                    "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.91",
                                    "application/dicom; transfer-syntax=bogus",
                                    'multipart/related; type="image/jpeg"',
                                    "application/json;q=0, application/dicom;q=0"])
def test_unsatisfiable_accept_is_406(client: TestClient, accept: str) -> None:
    body = assert_problem(_post(client, PHANTOM.read_bytes(), accept), 406, "not_acceptable")
    assert "application/dicom" in str(body["detail"])
    # Refused before the body is read: an empty body gives 406, not 400.
    assert_problem(_post(client, b"", accept), 406, "not_acceptable")


def test_dicom_output_needs_a_dicom_upload(client: TestClient) -> None:
    png = phantom_bytes("normal.png")
    r = client.post("/explain", content=png, headers={"content-type": "image/png",
                                                      "accept": DICOM})
    body = assert_problem(r, 406, "not_acceptable")
    assert "this upload is png" in str(body["detail"])
    # With JSON acceptable too, a PNG gets JSON.
    r = client.post("/explain", content=png, headers={"content-type": "image/png",
                                                      "accept": f"{DICOM}, */*;q=0.1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("accept", "dicom", "expected"),
    [
        (None, True, Packaging.JSON),
        ("*/*", True, Packaging.JSON),
        ("application/dicom", True, Packaging.DICOM),
        ("application/dicom", False, None),
        ("application/dicom; transfer-syntax=*", True, Packaging.DICOM),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", True, Packaging.DICOM),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90", True, Packaging.DICOM),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.4.91", True, None),
        ('multipart/related; type="application/dicom"', True, Packaging.MULTIPART),
        ("multipart/related", True, Packaging.MULTIPART),
        ("multipart/*", True, Packaging.MULTIPART),
        ("multipart/related; type=application/dicom+json", True, None),
        ("application/dicom;q=0.5, application/json;q=0.4", True, Packaging.DICOM),
        ("application/dicom;q=0.5, application/json;q=0.4", False, Packaging.JSON),
        ("application/dicom, */*;q=0.1", True, Packaging.DICOM),
        ("*/*;q=0.1, multipart/related;q=0.2", True, Packaging.MULTIPART),
        ("application/dicom, application/json", True, Packaging.JSON),
        ("application/*;q=0.5, application/json;q=0", True, Packaging.DICOM),
        ("text/html", True, None),
        ("application/dicom;q=abc, text/html", True, None),
        ("garbage", True, None),
    ],
)
def test_negotiate(accept: str | None, dicom: bool, expected: Packaging | None) -> None:
    """The best packaging allowed, when DICOM is possible (dicom) or not."""
    allowed = [o.packaging for o in negotiate(accept) if dicom or o.packaging is Packaging.JSON]
    assert (allowed[0] if allowed else None) is expected


def test_dicom3tools_and_dcmtk_accept_the_capture(client: TestClient, tmp_path: Path) -> None:
    r = _post(client, PHANTOM.read_bytes(), DICOM, methods="gradcam")
    assert r.status_code == 200, r.text
    report = dciodvfy(r.content, tmp_path, "sc.dcm")
    assert "SCImage" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
    dump = dcmdump(tmp_path / "sc.dcm")
    if dump is not None:
        assert dump.returncode == 0, dump.stderr
        assert "SecondaryCaptureImageStorage" in dump.stdout

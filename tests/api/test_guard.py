"""The model's guard over HTTP: a DICOM the model is not meant for gets 422
``dicom_not_accepted`` from /explain and /predict, in every answer format."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from tests.api.conftest import DATA, assert_problem


def _pydicom_data(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the installed pydicom-data"
    return Path(path).read_bytes()


@pytest.mark.parametrize("route", ["/explain", "/predict"])
@pytest.mark.parametrize("accept", ["application/json", "application/dicom"])
def test_a_ct_slice_is_refused_by_the_chest_model(client: TestClient, route: str,
                                                  accept: str) -> None:
    r = client.post(route, content=_pydicom_data("CT_small.dcm"),
                    headers={"content-type": "application/dicom", "accept": accept})
    body = assert_problem(r, 422, "dicom_not_accepted")
    assert body["detail"] == ("model demo-cxr is not for this image: Modality is CT; the "
                              "model accepts CR, DX")


def test_an_extremity_radiograph_is_refused_a_chest_one_explained(client: TestClient) -> None:
    r = client.post("/explain", files={"file": ("rg3.dcm", _pydicom_data("RG3_UNCR.dcm"),
                                                "application/dicom")})
    body = assert_problem(r, 422, "dicom_not_accepted")
    assert body["detail"].endswith("BodyPartExamined is EXTREMITY; the model accepts CHEST")
    ok = client.post("/predict", content=(DATA / "dicom" / "phantom_nodule.dcm").read_bytes(),
                     headers={"content-type": "application/dicom"})
    assert ok.status_code == 200, ok.text


def test_the_same_ct_slice_is_scored_by_a_model_without_rules(
        any_dicom_client: TestClient) -> None:
    r = any_dicom_client.post("/predict", content=_pydicom_data("CT_small.dcm"),
                              headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 4


def test_the_rules_are_published(client: TestClient) -> None:
    info = client.get("/models/demo-cxr").json()
    assert info["accepts"] == {"modalities": ["CR", "DX"], "body_parts": ["CHEST"],
                               "view_positions": [],
                               "presentation_intents": ["FOR PRESENTATION"]}


@pytest.mark.parametrize("route", ["/explain", "/predict"])
def test_a_dx_for_processing_is_refused_the_same_for_presentation_answered(
        client: TestClient, route: str) -> None:
    """The raw detector values of a DX "FOR PROCESSING" image are not a radiograph as the
    network was trained on them: refused from the header, whatever the pixels."""
    ds = pydicom.dcmread(DATA / "dicom" / "phantom_nodule.dcm")
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert client.post(route, content=_bytes(ds),
                       headers={"content-type": "application/dicom"}).status_code == 200
    ds.PresentationIntentType = "FOR PROCESSING"
    r = client.post(route, content=_bytes(ds), headers={"content-type": "application/dicom"})
    body = assert_problem(r, 422, "dicom_not_accepted")
    assert body["detail"] == ("model demo-cxr is not for this image: PresentationIntentType "
                              "is FOR PROCESSING; the model accepts FOR PRESENTATION")


def _bytes(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_an_image_not_for_the_model_is_refused_as_such_whatever_its_size(
        client: TestClient, any_dicom_client: TestClient) -> None:
    """The service's own capture of a real radiograph sent back (a PACS forwards every
    object of the study): "not for this model", not "too large", which a sender retries."""
    capture = client.post("/explain", content=_pydicom_data("RG1_UNCR.dcm"),
                          headers={"content-type": "application/dicom",
                                   "accept": "application/dicom"})
    assert capture.status_code == 200, capture.text
    r = client.post("/explain", content=capture.content,
                    headers={"content-type": "application/dicom"})
    body = assert_problem(r, 422, "dicom_not_accepted")
    assert body["detail"] == ("model demo-cxr is not for this image: Modality is OT; the "
                              "model accepts CR, DX")
    # Where no rule refuses it, its size is what stops it.
    r = any_dicom_client.post("/explain", content=capture.content,
                              headers={"content-type": "application/dicom"})
    assert_problem(r, 413, "decode_budget_exceeded")

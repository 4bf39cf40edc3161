"""A real PACS round trip: Orthanc + the Python-plugin bridge + medexplain over loopback.

Orthanc (Debian packages ``orthanc`` and ``orthanc-python``; ``.ci/run`` installs them) runs
with ``deploy/orthanc/orthanc.json`` on a free loopback port, a temporary storage folder and
the DICOM server off; the service runs as ``medexplain serve`` in a subprocess. Radiographs
uploaded through Orthanc's REST API come back as Secondary Captures (and, when the
bridge's query asks, a Structured Report) in their own study.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage

from service.imaging import decode
from service.outputs.secondary_capture import PATIENT_STUDY_KEYWORDS
from tests.api.conftest import multipart_parts
from tests.orthanc_tools import (
    DEPLOY,
    ROOT,
    free_port,
    get_json,
    request,
    require_orthanc,
    stop,
    wait_until_up,
)
from tests.orthanc_tools import orthanc as run_orthanc
from tests.outputs import reference as drawing

ROUND_TRIP_TIMEOUT_S = 60.0

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def _orthanc_installed() -> None:
    require_orthanc()


def _request_with(url: str, data: bytes, headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``medexplain serve`` on a free loopback port, with its log file."""
    if not (ROOT / "models" / "demo-cxr" / "model.onnx").exists():
        pytest.fail("models/demo-cxr/model.onnx is missing (tools/train_demo_model.py)")
    port = free_port()
    log = tmp_path_factory.mktemp("medexplain") / "service.log"
    env = {**os.environ, "MEDEXPLAIN_THREADS": "1", "MEDEXPLAIN_LOG_LEVEL": "debug"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/readyz", process, log)
        yield url, log
    finally:
        stop(process)


@pytest.fixture(scope="module")
def orthanc(service: tuple[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Orthanc with the bridge pointed at the service, on a free loopback port."""
    config = {"Name": "medexplain-test", "DicomServerEnabled": False,
              "PythonScript": str(DEPLOY / "medexplain_bridge.py")}
    env = {**os.environ, "MEDEXPLAIN_URL": service[0], "PYTHONDONTWRITEBYTECODE": "1"}
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), config, env) as running:
        yield running


def _radiographs() -> list[tuple[str, bytes]]:
    rg1 = get_testdata_file("RG1_UNCR.dcm", download=False)
    assert rg1 is not None
    return [("phantom", (ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm").read_bytes()),
            ("RG1_UNCR", Path(rg1).read_bytes())]


def _captures(orthanc_url: str, study: str) -> list[str]:
    """Instance IDs of the Secondary Captures in a study."""
    found = []
    for series in get_json(f"{orthanc_url}/studies/{study}/series"):
        if series["MainDicomTags"].get("Modality") == "OT":
            found += series["Instances"]
    return found


@pytest.mark.parametrize("name", ["phantom", "RG1_UNCR"])
def test_a_stored_radiograph_comes_back_explained(orthanc: tuple[str, Path],
                                                  service: tuple[str, Path], name: str) -> None:
    url, orthanc_log = orthanc
    data = dict(_radiographs())[name]
    source = pydicom.dcmread(io.BytesIO(data))
    # What the service's JSON answer gives for the bridge's request: one capture each.
    explained = json.loads(_request_with(
        f"{service[0]}/explain?methods=gradcam&heatmap=npy&size=feature", data,
        {"Content-Type": "application/dicom", "Accept": "application/json"}))["explanations"]
    started = time.monotonic()
    stored = json.loads(request(f"{url}/instances", data))
    assert stored["Status"] in ("Success", "AlreadyStored")
    study = stored["ParentStudy"]

    deadline = started + ROUND_TRIP_TIMEOUT_S
    captures: list[str] = []
    while len(captures) < len(explained) and time.monotonic() < deadline:
        time.sleep(0.25)
        captures = _captures(url, study)
    assert len(captures) == len(explained), (
        f"{len(captures)} of {len(explained)} Secondary Captures after "
        f"{ROUND_TRIP_TIMEOUT_S} s:\n{orthanc_log.read_text()[-3000:]}")

    scs = sorted((pydicom.dcmread(io.BytesIO(request(f"{url}/instances/{c}/file")))
                  for c in captures), key=lambda d: int(d.InstanceNumber))
    image = decode(data, "application/dicom").pixels
    labels = ",".join(e["label"] for e in explained)
    for sc, explanation in zip(scs, explained, strict=True):
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID
        assert sc.SOPInstanceUID != source.SOPInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        for keyword in PATIENT_STUDY_KEYWORDS:
            assert sc.get(keyword) == source.get(keyword), keyword
        assert sc.SeriesDescription == f"medexplain gradcam {labels}"
        assert f"gradcam explanation of {explanation['label']}" in sc.DerivationDescription

        # Pixels: the image part is the colour overlay of the map the JSON answer gives,
        # on the decoded radiograph; where the map is zero it is the grey radiograph itself.
        cam = np.load(io.BytesIO(base64.b64decode(explanation["heatmap"]["data"])))
        picture = sc.pixel_array[: source.Rows]
        levels = drawing.strength(cam, source.Rows, source.Columns)
        # float32 upsampling against the float64 reference can round a level differently,
        # and adjacent JET colours differ by up to 4: one blend step of 0.45 of that, plus
        # rounding.
        assert np.abs(picture.astype(int) - drawing.overlay(levels, image)).max() <= 2
        heat = levels / 255
        grey = np.round(image * 255)
        for channel in range(3):
            assert np.abs(picture[..., channel][heat == 0]
                          - grey[heat == 0]).max(initial=0) <= 0.5
        grey_pixels = (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])
        assert not grey_pixels[heat > 0.5].any(), "coloured where the map is"

    # The bridge skipped its own output: one series more than the source, no more, even a
    # moment later.
    time.sleep(2)
    series = get_json(f"{url}/studies/{study}/series")
    assert len(series) == 2
    assert sorted(_captures(url, study)) == sorted(captures)

    # Neither the bridge nor the service logged patient data.
    bridge = [line for line in orthanc_log.read_text().splitlines() if "medexplain" in line]
    assert any(f"-> {len(captures)} object(s) stored: " in line
               and all(c in line for c in captures) for line in bridge), bridge
    served = service[1].read_text()
    for keyword in ("PatientName", "PatientID", "AccessionNumber"):
        value = str(source.get(keyword) or "")
        if value:
            assert not [line for line in bridge if value in line], keyword
            assert value not in served, keyword


@pytest.fixture(scope="module")
def orthanc_with_reports(service: tuple[str, Path],
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second Orthanc whose bridge asks for the captures, in JPEG-LS, the report, the
    presentation state and the segmentation."""
    config = {"Name": "medexplain-test-sr", "DicomServerEnabled": False,
              "PythonScript": str(DEPLOY / "medexplain_bridge.py")}
    env = {**os.environ, "MEDEXPLAIN_URL": service[0], "PYTHONDONTWRITEBYTECODE": "1",
           "MEDEXPLAIN_BRIDGE_QUERY": "methods=gradcam&dicom=sc,sr,gsps,seg",
           "MEDEXPLAIN_BRIDGE_TRANSFER_SYNTAX": JPEGLSLossless}
    with run_orthanc(tmp_path_factory.mktemp("orthanc-sr"), config, env) as running:
        yield running


def _explained_by_the_service(service_url: str, data: bytes) -> list[np.ndarray]:
    """The captures' pixels the service answers uncompressed for the bridge's query."""
    answer = httpx.post(f"{service_url}/explain", params={"methods": "gradcam"}, content=data,
                        timeout=120, headers={
                            "content-type": "application/dicom",
                            "accept": 'multipart/related; type="application/dicom"'})
    return [pydicom.dcmread(io.BytesIO(part)).pixel_array for part in multipart_parts(answer)]


def test_the_bridge_stores_captures_and_the_report(
        orthanc_with_reports: tuple[str, Path], service: tuple[str, Path]) -> None:
    """dicom=sc,sr,gsps,seg in the bridge's query: every kind of object comes back into the
    study, from one request, and none is explained in turn (the segmentation has pixels)."""
    url, orthanc_log = orthanc_with_reports
    service_url = service[0]
    data = (ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm").read_bytes()
    source = pydicom.dcmread(io.BytesIO(data))
    stored = json.loads(request(f"{url}/instances", data))
    study = stored["ParentStudy"]
    deadline = time.monotonic() + ROUND_TRIP_TIMEOUT_S
    modalities: list[str] = []
    kinds = ["DX", "OT", "PR", "SEG", "SR"]
    while sorted(modalities) != kinds and time.monotonic() < deadline:
        time.sleep(0.25)
        modalities = [s["MainDicomTags"].get("Modality", "")
                      for s in get_json(f"{url}/studies/{study}/series")]
    assert sorted(modalities) == kinds, orthanc_log.read_text()[-3000:]
    (report_series,) = [s for s in get_json(f"{url}/studies/{study}/series")
                        if s["MainDicomTags"].get("Modality") == "SR"]
    (report_id,) = report_series["Instances"]
    report = pydicom.dcmread(io.BytesIO(request(f"{url}/instances/{report_id}/file")))
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == source.SOPInstanceUID
    # The captures as asked, JPEG-LS, which Orthanc decodes to the service's own pixels.
    (captures,) = [s for s in get_json(f"{url}/studies/{study}/series")
                   if s["MainDicomTags"].get("Modality") == "OT"]
    uncompressed = _explained_by_the_service(service_url, data)
    for instance, expected in zip(captures["Instances"], uncompressed, strict=True):
        capture = pydicom.dcmread(io.BytesIO(request(f"{url}/instances/{instance}/file")))
        assert capture.file_meta.TransferSyntaxUID == JPEGLSLossless
        decoded = np.load(io.BytesIO(request(f"{url}/instances/{instance}/numpy")))
        np.testing.assert_array_equal(decoded.reshape(expected.shape), expected)
    time.sleep(2)  # nothing more: the bridge skips its own objects
    assert len(get_json(f"{url}/studies/{study}/series")) == len(kinds)
    assert any("-> 4 object(s) stored: " in line and report_id in line
               for line in orthanc_log.read_text().splitlines()), orthanc_log.read_text()[-3000:]


def test_an_instance_outside_the_model_rules_is_skipped(orthanc: tuple[str, Path],
                                                        service: tuple[str, Path]) -> None:
    url, orthanc_log = orthanc
    ct = get_testdata_file("CT_small.dcm", download=False)
    assert ct is not None
    stored = json.loads(request(f"{url}/instances", Path(ct).read_bytes()))
    assert stored["Status"] in ("Success", "AlreadyStored")
    line = f"instance {stored['ID']} skipped: outside the model's modalities"
    deadline = time.monotonic() + ROUND_TRIP_TIMEOUT_S
    while line not in orthanc_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert line in orthanc_log.read_text(), orthanc_log.read_text()[-3000:]
    # Skipped before it was posted: the service never saw it, and the study holds only it.
    assert "dicom_not_accepted" not in service[1].read_text()
    assert len(get_json(f"{url}/studies/{stored['ParentStudy']}/series")) == 1

    # A chest DX of the detector's raw values (FOR PROCESSING), in a study of its own.
    raw = pydicom.dcmread(ROOT / "tests" / "data" / "dicom" / "phantom_nodule.dcm")
    raw.PresentationIntentType = "FOR PROCESSING"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(raw, keyword, pydicom.uid.generate_uid())
    raw.file_meta.MediaStorageSOPInstanceUID = raw.SOPInstanceUID
    body = io.BytesIO()
    raw.save_as(body, enforce_file_format=True)
    stored = json.loads(request(f"{url}/instances", body.getvalue()))
    line = f"instance {stored['ID']} skipped: outside the model's presentation_intents"
    deadline = time.monotonic() + ROUND_TRIP_TIMEOUT_S
    while line not in orthanc_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert line in orthanc_log.read_text(), orthanc_log.read_text()[-3000:]
    assert len(get_json(f"{url}/studies/{stored['ParentStudy']}/series")) == 1

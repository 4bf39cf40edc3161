"""The C-STORE SCP end to end: DCMTK's ``storescu`` sends real radiographs to the service's
SCP, the results arrive in Orthanc (Debian, loopback, its DICOM port on) by C-STORE or by
STOW-RS through Orthanc's DICOMweb plugin, and are read back from Orthanc's REST API.

One Orthanc serves the module. Each test sends files with fresh Study/Series/SOP UIDs
(copies written to the test's temporary folder), so each finds only its own results.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS, explanations_computed, multipart_parts
from tests.dicom_tools import dcmtk, fresh_copy
from tests.orthanc_tools import (
    PLUGINS,
    free_port,
    get_json,
    orthanc,
    request,
    study_instances,
)

pytestmark = [pytest.mark.slow]

STORESCU = dcmtk("storescu")
ORTHANC_AET = "ORTHANC"
SENDER = "MODALITY1"
MULTIPART = 'multipart/related; type="application/dicom"'


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Orthanc with its DICOM server and DICOMweb on: (REST URL, DICOM port)."""
    dicom_port = free_port()
    config = {"Name": "medexplain-dimse-test", "DicomServerEnabled": True,
              "DicomAet": ORTHANC_AET, "DicomPort": dicom_port,
              # Orthanc takes C-STOREs from any AE title (DicomAlwaysAllowStore).
              "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True,
              "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with orthanc(tmp_path_factory.mktemp("orthanc"), config) as (url, _log):
        yield url, dicom_port


def _app(settings: Settings) -> Iterator[tuple[TestClient, int]]:
    with TestClient(create_app(settings)) as client:
        yield client, settings.dicom_port  # type: ignore[misc]


@pytest.fixture(scope="module")
def by_cstore(pacs: tuple[str, int]) -> Iterator[tuple[TestClient, int]]:
    """The service with its SCP on, SC, SR, GSPS and SEG sent to Orthanc by C-STORE, one
    caller allowed."""
    yield from _app(Settings(
        models=MODELS, threads=1, dicom_port=free_port(), dicom_allowed_callers=(SENDER,),
        dicom_destination=f"{ORTHANC_AET}@127.0.0.1:{pacs[1]}",
        dicom_outputs=("sc", "sr", "gsps", "seg"),
        dicom_query="methods=gradcam"))


@pytest.fixture(scope="module")
def by_stow(pacs: tuple[str, int]) -> Iterator[tuple[TestClient, int]]:
    """The service with its SCP on, captures sent to Orthanc's DICOMweb by STOW-RS."""
    yield from _app(Settings(
        models=MODELS, threads=1, dicom_port=free_port(),
        dicom_stow_url=f"{pacs[0]}/dicom-web", dicom_outputs=("sc",),
        dicom_query="methods=crm_combined"))


def _storescu(port: int, files: list[Path], calling: str = SENDER,
              *options: str) -> subprocess.CompletedProcess[str]:
    assert STORESCU is not None, ("DCMTK is not installed: `bash scripts/system-deps.sh` "
                                  "(run by `make test`) installs dcmtk")
    # -xv proposes JPEG 2000 lossless besides the uncompressed syntaxes.
    return subprocess.run([STORESCU, "-v", "-aet", calling, "-aec", "MEDEXPLAIN", "-xv",
                           *options, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=300, check=False)


def _scp_counts(client: TestClient) -> Counter[str]:
    """The SCP's counters on /metrics: C-STOREs by status and outcome, deliveries by
    destination and outcome, rejected associations by reason."""
    keys = {"medexplain_dicom_stores_total": ("store", "status", "outcome"),
            "medexplain_dicom_deliveries_total": ("delivery", "destination", "outcome"),
            "medexplain_dicom_associations_rejected_total": ("rejected", "reason")}
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in keys:
                kind, *labels = keys[sample.name]
                counts[" ".join([kind, *(sample.labels[k] for k in labels)])] += sample.value
    return counts


def _pydicom_data(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in the installed pydicom-data"
    return Path(path)


def _explained_over_http(client: TestClient, data: bytes, **params: str) -> list[pydicom.Dataset]:
    r = client.post("/explain", content=data, params=params,
                    headers={"content-type": "application/dicom", "accept": MULTIPART})
    assert r.status_code == 200, r.text
    return [pydicom.dcmread(io.BytesIO(part)) for part in multipart_parts(r)]


def test_stored_radiographs_come_back_as_captures_and_a_report_in_theirstudy_instances(
        pacs: tuple[str, int], by_cstore: tuple[TestClient, int], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    client, port = by_cstore
    caplog.set_level(logging.DEBUG)
    sent = [fresh_copy(_pydicom_data("RG1_UNCR.dcm"), tmp_path),
            fresh_copy(DATA / "dicom" / "phantom_nodule.dcm", tmp_path)]
    before = explanations_computed(client)
    result = _storescu(port, [path for path, _ in sent])
    assert result.returncode == 0, result.stdout + result.stderr
    # One explanation per image for its captures, its report, its presentation state and
    # its segmentation (dicom=sc,sr,gsps,seg).
    assert explanations_computed(client) - before == 2
    done = [r.getMessage() for r in caplog.records if r.name == "service.dimse.scp"]
    assert len(done) == 2 and all(
        re.fullmatch(rf"C-STORE from {SENDER}: 0x0000 explained: \d object\(s\) to "
                     rf"{ORTHANC_AET}@127.0.0.1:{pacs[1]} \(\d+\.\d s\)", m) for m in done), done
    # Nothing about the patient, and no UID, reaches the log.
    for _, source in sent:
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID"):
            value = str(source.get(keyword) or "")
            assert not value or value not in caplog.text, keyword
    for path, source in sent:
        arrived = study_instances(pacs[0], source.StudyInstanceUID)
        captures = [d for d in arrived if d.SOPClassUID == SecondaryCaptureImageStorage]
        reports = [d for d in arrived if d.SOPClassUID == Comprehensive3DSRStorage]
        states = [d for d in arrived
                  if d.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage]
        segmentations = [d for d in arrived if d.SOPClassUID == SegmentationStorage]
        # What an HTTP client gets for the same file and parameters, capture for capture.
        expected = _explained_over_http(client, path.read_bytes(), methods="gradcam")
        assert len(captures) == len(expected) >= 1, path.name
        assert len(reports) == len(states) == len(segmentations) == 1, path.name
        captures.sort(key=lambda d: int(d.InstanceNumber))
        for got, want in zip(captures, expected, strict=True):
            assert got.StudyInstanceUID == source.StudyInstanceUID
            assert got.SeriesInstanceUID != source.SeriesInstanceUID
            assert got.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert (got.SeriesNumber, got.SeriesDescription) == (
                want.SeriesNumber, want.SeriesDescription)
            assert got.SeriesNumber == 9913  # gradcam
            np.testing.assert_array_equal(got.pixel_array, want.pixel_array)
        (report,) = reports
        assert report.StudyInstanceUID == source.StudyInstanceUID
        assert report.SeriesNumber == 9913 + 20  # a gradcam-only report
        evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
            .ReferencedSOPInstanceUID == source.SOPInstanceUID
        (state,) = states
        assert (state.StudyInstanceUID, state.Modality, state.SeriesNumber) == (
            source.StudyInstanceUID, "PR", 9913 + 40)  # a gradcam-only presentation state
        assert state.ReferencedSeriesSequence[0].ReferencedImageSequence[0] \
            .ReferencedSOPInstanceUID == source.SOPInstanceUID
        (segmentation,) = segmentations
        assert (segmentation.StudyInstanceUID, segmentation.Modality) == (
            source.StudyInstanceUID, "SEG")
        assert (segmentation.Rows, segmentation.Columns) == (source.Rows, source.Columns)


def test_results_by_stow_rs_to_dicomweb(pacs: tuple[str, int], by_stow: tuple[TestClient, int],
                                        tmp_path: Path) -> None:
    client, port = by_stow
    path, source = fresh_copy(DATA / "dicom" / "phantom_nodule.dcm", tmp_path)
    result = _storescu(port, [path], calling="ANY-SENDER")  # no caller list: any AE title
    assert result.returncode == 0, result.stdout + result.stderr
    (capture,) = study_instances(pacs[0], source.StudyInstanceUID)
    (expected,) = _explained_over_http(client, path.read_bytes(), methods="crm_combined")
    assert capture.SOPClassUID == SecondaryCaptureImageStorage
    assert capture.SeriesNumber == 9912 and capture.SeriesDescription == "medexplain crm_combined all"
    np.testing.assert_array_equal(capture.pixel_array, expected.pixel_array)
    # Orthanc's DICOMweb answers for it too (QIDO-RS), in the source study.
    found = get_json(f"{pacs[0]}/dicom-web/studies/{source.StudyInstanceUID}/series")
    assert [s["0020000E"]["Value"][0] for s in found] == [capture.SeriesInstanceUID]


def test_a_caller_outside_the_list_is_rejected(pacs: tuple[str, int],
                                               by_cstore: tuple[TestClient, int],
                                               tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    client, port = by_cstore
    caplog.set_level(logging.INFO, logger="service.dimse.scp")
    path, source = fresh_copy(DATA / "dicom" / "phantom_nodule.dcm", tmp_path)
    before = _scp_counts(client)
    result = _storescu(port, [path], calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert study_instances(pacs[0], source.StudyInstanceUID) == []
    assert [r.getMessage() for r in caplog.records if r.name == "service.dimse.scp"] == [
        "association from INTRUDER rejected: calling AE title not allowed"]
    assert _scp_counts(client) - before == Counter({"rejected calling_ae_title": 1})


def test_a_bad_file_gets_a_failure_status_and_the_scp_keeps_serving(
        pacs: tuple[str, int], by_cstore: tuple[TestClient, int], tmp_path: Path) -> None:
    client, port = by_cstore
    path, source = fresh_copy(DATA / "dicom" / "phantom_nodule.dcm", tmp_path)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # the header promises more
    ds.save_as(path, enforce_file_format=True)
    good, good_source = fresh_copy(DATA / "dicom" / "phantom_nodule.dcm", tmp_path)
    before = _scp_counts(client)
    result = _storescu(port, [path, good], SENDER, "--no-halt")  # go on after a failure
    output = result.stdout + result.stderr
    # The failed store is 0xC000 (Error: cannot understand); the next one succeeds.
    responses = re.findall(r"Received Store Response \((.*)\)", output)
    assert responses == ["Error: CannotUnderstand", "Success"], output
    assert study_instances(pacs[0], source.StudyInstanceUID) == []
    # Its capture, report, presentation state and segmentation.
    assert len(study_instances(pacs[0], good_source.StudyInstanceUID)) == 4
    assert client.get("/healthz").status_code == 200
    destination = f"{ORTHANC_AET}@127.0.0.1:{pacs[1]}"
    assert _scp_counts(client) - before == Counter({
        "store 0xC000 rejected": 1, "store 0x0000 explained": 1,
        f"delivery {destination} delivered": 1})


def test_a_ct_slice_is_taken_but_not_explained_by_the_chest_model(
        pacs: tuple[str, int], by_cstore: tuple[TestClient, int], tmp_path: Path) -> None:
    client, port = by_cstore
    path, source = fresh_copy(_pydicom_data("CT_small.dcm"), tmp_path)
    before = _scp_counts(client)
    result = _storescu(port, [path])
    assert result.returncode == 0, result.stdout + result.stderr  # a valid object: Success
    assert study_instances(pacs[0], source.StudyInstanceUID) == []
    assert _scp_counts(client) - before == Counter({"store 0x0000 not_explained": 1})
    r = client.post("/explain", content=path.read_bytes(),
                    headers={"content-type": "application/dicom"})
    assert r.status_code == 422 and r.json()["code"] == "dicom_not_accepted"


def test_c_echo_answers(by_cstore: tuple[TestClient, int]) -> None:
    result = subprocess.run([dcmtk("echoscu") or "echoscu", "-aet", SENDER, "-aec", "MEDEXPLAIN", "127.0.0.1",
                             str(by_cstore[1])], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compressed_results_by_stow_rs_are_stored_and_decoded_by_the_pacs(
        pacs: tuple[str, int], tmp_path: Path) -> None:
    """MEDEXPLAIN_DICOM_TRANSFER_SYNTAX=JPEG-LS lossless: Orthanc keeps the capture as sent
    and its own decoder gives back every pixel of the uncompressed capture."""
    settings = Settings(models=MODELS, threads=1, dicom_port=free_port(),
                        dicom_stow_url=f"{pacs[0]}/dicom-web", dicom_outputs=("sc",),
                        dicom_query="methods=crm_combined",
                        dicom_transfer_syntax=JPEGLSLossless)
    for client, port in _app(settings):
        path, source = fresh_copy(DATA / "dicom" / "phantom_nodule.dcm", tmp_path)
        result = _storescu(port, [path], calling="ANY-SENDER")
        assert result.returncode == 0, result.stdout + result.stderr
        (expected,) = _explained_over_http(client, path.read_bytes(), methods="crm_combined")
    (capture,) = study_instances(pacs[0], source.StudyInstanceUID)
    assert capture.file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(capture.pixel_array, expected.pixel_array)
    (hit,) = json.loads(request(f"{pacs[0]}/tools/lookup", capture.SOPInstanceUID.encode()))
    decoded = np.load(io.BytesIO(request(f"{pacs[0]}/instances/{hit['ID']}/numpy")))
    np.testing.assert_array_equal(decoded.reshape(expected.pixel_array.shape),
                                  expected.pixel_array)

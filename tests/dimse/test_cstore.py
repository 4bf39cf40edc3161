"""Results out by C-STORE (service.dimse.cstore) to DCMTK's ``storescp`` as destinations
that are stricter or slower than Orthanc: one that takes Implicit VR Little Endian only,
one that takes no Structured Reports, one that never answers its C-STOREs. Images go in
with DCMTK's ``storescu``, as in test_scp.py.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)

from service.config import Settings
from service.dimse.cstore import UNCOMPRESSED
from service.main import create_app
from tests.api.conftest import DATA, MODELS, metric_sum
from tests.dicom_tools import dcmtk
from tests.orthanc_tools import free_port, wait_for_port

pytestmark = [pytest.mark.slow]

STORESCP = dcmtk("storescp")
STORESCU = dcmtk("storescu")
DESTINATION = "ARCHIVE"

# DCMTK's association configuration (asccfg): Secondary Capture only, uncompressed.
CAPTURES_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CapturesOnly]
PresentationContext1 = SecondaryCaptureImageStorage\\Uncompressed

[[Profiles]]
[CapturesOnly]
PresentationContexts = CapturesOnly
"""


@contextmanager
def _storescp(folder: Path, *options: str) -> Iterator[int]:
    """A storescp writing what it receives into ``folder``; yields its port."""
    assert STORESCP is not None, "DCMTK is not installed: `bash scripts/system-deps.sh`"
    port = free_port()
    process = subprocess.Popen([STORESCP, "-aet", DESTINATION, "-od", str(folder), *options,
                                str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, "storescp")
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


def _send(destination_port: int, caplog: pytest.LogCaptureFixture,
          **settings: object) -> tuple[str, list[str], float, str]:
    """One radiograph through the service (SC and SR out to the destination): storescu's
    output, the SCP's log lines, storescu's seconds and the service's /metrics after."""
    assert STORESCU is not None, "DCMTK is not installed: `bash scripts/system-deps.sh`"
    config = Settings(models=MODELS, threads=1, dicom_port=free_port(),
                      dicom_destination=f"{DESTINATION}@127.0.0.1:{destination_port}",
                      dicom_outputs=("sc", "sr"), **settings)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="service.dimse.scp")
    with TestClient(create_app(config)) as client:
        started = time.monotonic()
        result = subprocess.run([STORESCU, "-v", "-aec", "MEDEXPLAIN", "127.0.0.1",
                                 str(config.dicom_port),
                                 str(DATA / "dicom" / "phantom_nodule.dcm")],
                                capture_output=True, text=True, timeout=120, check=False)
        took = time.monotonic() - started
        metrics = client.get("/metrics").text
    lines = [r.getMessage() for r in caplog.records if r.name == "service.dimse.scp"]
    return result.stdout + result.stderr, lines, took, metrics


def _response(output: str) -> list[str]:
    return re.findall(r"Received Store Response \((.*)\)", output)


def test_a_destination_taking_only_implicit_vr_gets_every_result(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Implicit VR Little Endian is the one syntax every SCP must take (PS3.5 §10.1); only
    Explicit VR was proposed, and such a destination accepted nothing."""
    with _storescp(tmp_path, "+xi") as port:
        output, lines, _, metrics = _send(port, caplog)
    assert _response(output) == ["Success"], output
    assert _dicom_metrics(metrics, port) == {"stores": {("0x0000", "explained"): 1.0},
                                             "deliveries": {"delivered": 1.0}, "timed": 1.0}
    assert len(lines) == 1 and " 0x0000 explained: 2 object(s) to ARCHIVE@" in lines[0], lines
    received = [pydicom.dcmread(path) for path in sorted(tmp_path.iterdir())]
    assert sorted(str(d.SOPClassUID) for d in received) == sorted(
        [SecondaryCaptureImageStorage, Comprehensive3DSRStorage])
    assert {str(d.file_meta.TransferSyntaxUID) for d in received} == {ImplicitVRLittleEndian}


def test_a_destination_refusing_reports_is_a_failure_that_names_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sender is told the image failed (0x0110, not 0xC211 from an exception in the
    handler), the log says which results were refused, and none is sent half-way."""
    config = tmp_path / "storescp.cfg"
    config.write_text(CAPTURES_ONLY)
    received = tmp_path / "received"
    received.mkdir()
    with _storescp(received, "-xf", str(config), "CapturesOnly") as port:
        output, lines, _, metrics = _send(port, caplog)
    assert _response(output) == ["Unknown Status: 0x110"]  # DCMTK has no name for it, output
    assert _dicom_metrics(metrics, port) == {"stores": {("0x0110", "not_delivered"): 1.0},
                                             "deliveries": {"failed": 1.0}, "timed": 1.0}
    assert len(lines) == 1 and re.fullmatch(
        r"C-STORE from STORESCU: 0x0110 not delivered: ARCHIVE@127\.0\.0\.1:\d+ does not take "
        r"Comprehensive 3D SR Storage results \(it refused their presentation context\) "
        r"\(\d+\.\d s\)", lines[0]), lines
    assert list(received.iterdir()) == []


def test_a_destination_that_never_answers_is_cut_at_the_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MEDEXPLAIN_DICOM_TIMEOUT_S bounds explaining and delivering together: a destination
    holding its C-STORE response held the sender for pynetdicom's 30 s default."""
    with _storescp(tmp_path, "--sleep-during", "60") as port:
        output, lines, took, metrics = _send(port, caplog, dicom_timeout_s=4.0)
    assert _dicom_metrics(metrics, port) == {"stores": {("0x0110", "timed_out"): 1.0},
                                             "deliveries": {"timed_out": 1.0}, "timed": 1.0}
    assert _response(output) == ["Unknown Status: 0x110"]  # DCMTK has no name for it, output
    assert len(lines) == 1 and "0x0110 timed out after 4 s" in lines[0], lines
    assert took < 4.0 + 3.0, took  # the budget, plus storescu's own association


def _dicom_metrics(metrics: str, port: int) -> dict[str, object]:
    """The SCP's metrics after one image: its C-STOREs by (status, outcome), the deliveries
    to the storescp on ``port`` by outcome, and how many of them were timed."""
    destination = f"{DESTINATION}@127.0.0.1:{port}"
    samples = [s for family in text_string_to_metric_families(metrics) for s in family.samples]
    return {
        "stores": {(s.labels["status"], s.labels["outcome"]): s.value for s in samples
                   if s.name == "medexplain_dicom_stores_total"},
        "deliveries": {s.labels["outcome"]: s.value for s in samples
                       if s.name == "medexplain_dicom_deliveries_total"
                       and s.labels["destination"] == destination},
        "timed": metric_sum(metrics, "medexplain_dicom_delivery_duration_seconds_count",
                            destination=destination),
    }


def _explain_requests(metrics: str) -> dict[str, float]:
    """POST /explain requests by status code, from /metrics."""
    return {s.labels["code"]: s.value for family in text_string_to_metric_families(metrics)
            for s in family.samples if s.name == "medexplain_http_requests_total"
            and (s.labels["handler"], s.labels["method"]) == ("/explain", "POST")}


def test_an_explanation_over_the_budget_is_a_client_that_hung_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The SCP stops waiting for /explain as an HTTP client does, by hanging up: the request
    is abandoned and counted 499 (client closed); cancelling it counted a 500, a server
    error that was none."""
    with _storescp(tmp_path) as port:
        output, lines, _, metrics = _send(port, caplog, dicom_timeout_s=0.01)
    assert _response(output) == ["Unknown Status: 0x110"], output
    assert len(lines) == 1 and "0x0110 timed out after 0.01 s" in lines[0], lines
    assert _explain_requests(metrics) == {"499": 1.0}, metrics
    # Never delivered: the time ran out in the explanation.
    assert _dicom_metrics(metrics, port) == {"stores": {("0x0110", "timed_out"): 1.0},
                                             "deliveries": {}, "timed": 0.0}
    assert list(tmp_path.iterdir()) == []


def _received(folder: Path) -> dict[str, pydicom.Dataset]:
    """What a storescp wrote, by SOP Class."""
    return {str(d.SOPClassUID): d for d in map(pydicom.dcmread, sorted(folder.iterdir()))}


@pytest.mark.parametrize(("syntax", "prefer"), [(JPEGLSLossless, "+xt"),
                                                (JPEGBaseline8Bit, "+xy")])
def test_compressed_results_go_compressed_where_taken_and_decompressed_where_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, syntax: str, prefer: str) -> None:
    """MEDEXPLAIN_DICOM_TRANSFER_SYNTAX: a destination taking the syntax gets the captures
    in it, one taking only uncompressed ones (storescp's default) gets them decompressed
    (the report has no pixels and goes uncompressed to both)."""
    caplog.set_level(logging.INFO, logger="service.dimse.cstore")
    folders = {name: tmp_path / name for name in ("plain", "taken", "left")}
    for folder in folders.values():
        folder.mkdir()
    with _storescp(folders["plain"]) as port:
        _send(port, caplog)
    for name, options in (("taken", (prefer,)), ("left", ())):
        with _storescp(folders[name], *options) as port:
            output, _, _, _ = _send(port, caplog, dicom_transfer_syntax=syntax)
        assert _response(output) == ["Success"], output
    plain, taken, left = (_received(f) for f in folders.values())
    reference = plain[SecondaryCaptureImageStorage].pixel_array
    assert taken[SecondaryCaptureImageStorage].file_meta.TransferSyntaxUID == syntax
    assert left[SecondaryCaptureImageStorage].file_meta.TransferSyntaxUID in UNCOMPRESSED
    assert left[SecondaryCaptureImageStorage].PhotometricInterpretation == "RGB"
    for received in (taken, left):
        assert received[Comprehensive3DSRStorage].file_meta.TransferSyntaxUID in UNCOMPRESSED
        pixels = received[SecondaryCaptureImageStorage].pixel_array
        if syntax == JPEGBaseline8Bit:  # lossy, and says so wherever it went
            assert received[SecondaryCaptureImageStorage].LossyImageCompression == "01"
            assert np.abs(pixels.astype(np.int16) - reference).mean() < 2.5
        else:
            np.testing.assert_array_equal(pixels, reference)
    said = [r.getMessage() for r in caplog.records if r.name == "service.dimse.cstore"]
    assert said == [(f"ARCHIVE@127.0.0.1:{port} takes no {UID(syntax).name} Secondary "
                     "Capture Image Storage: sent uncompressed")], said


def test_results_past_the_answer_limit_are_a_processing_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MEDEXPLAIN_MAX_ANSWER_BYTES bounds the SCP's results as it bounds any answer: the
    sender is told, the log says why, the destination gets nothing."""
    with _storescp(tmp_path) as port:
        output, lines, _, metrics = _send(port, caplog, max_answer_bytes=64 << 10)
    assert _response(output) == ["Unknown Status: 0x110"], output
    assert len(lines) == 1 and "0x0110 not explained: HTTP 422 answer_too_large" in lines[0], \
        lines
    assert _dicom_metrics(metrics, port) == {"stores": {("0x0110", "failed"): 1.0},
                                             "deliveries": {}, "timed": 0.0}
    assert list(tmp_path.iterdir()) == []

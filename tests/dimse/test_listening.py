"""The SCP's settings and start-up (service.config dicom_*, service.dimse.listening) and
the C-STORE status of each /explain answer (service.dimse.scp.status_of)."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import JPEGLSLossless

from service.config import Settings, ValidationError
from service.dimse.inprocess import Answer
from service.dimse.scp import status_of
from service.errors import DicomServerError
from service.main import create_app
from service.outputs.base import Encoded, multipart_related
from service.outputs.transfer_syntax import DEFAULT, TRANSFER_SYNTAXES
from tests.api.conftest import DATA, MODELS
from tests.dicom_tools import dcmtk
from tests.orthanc_tools import free_port


def test_off_by_default_and_the_documented_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.dicom_port is None
    assert settings.dicom_ae_title == "MEDEXPLAIN"
    assert settings.dicom_allowed_callers == ()  # any caller
    assert settings.dicom_outputs == ("sc",)
    on = Settings.from_env({"MEDEXPLAIN_DICOM_PORT": "11112",
                            "MEDEXPLAIN_DICOM_ALLOWED_CALLERS": "CT1, MODALITY1",
                            "MEDEXPLAIN_DICOM_OUTPUTS": "sc,sr",
                            "MEDEXPLAIN_DICOM_DESTINATION": "PACS@127.0.0.1:104"})
    assert (on.dicom_port, on.dicom_allowed_callers, on.dicom_outputs) == (
        11112, ("CT1", "MODALITY1"), ("sc", "sr"))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("DICOM_AE_TITLE", "A" * 17, "is not an AE title"),
    ("DICOM_ALLOWED_CALLERS", "OK,BAD\\TITLE", "is not an AE title"),
    ("DICOM_DESTINATION", "PACS@127.0.0.1", "dicom_destination must be AET@host:port"),
    ("DICOM_DESTINATION", "PACS@127.0.0.1:70000", "dicom_destination must be AET@host:port"),
    ("DICOM_STOW_URL", "ftp://pacs/dicom-web", "must be an http(s) DICOMweb base URL"),
    ("DICOM_QUERY", "methods=gradcam&dicom=sr", "must not set dicom="),
    ("DICOM_OUTPUTS", "sc,pdf", "dicom_outputs"),
    ("DICOM_PORT", "0", "dicom_port"),
])
def test_bad_settings_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({f"MEDEXPLAIN_{key}": value})


def test_the_scp_listens_only_while_the_app_runs() -> None:
    port = free_port()
    with TestClient(create_app(Settings(models=MODELS, threads=1, dicom_port=port))) as client:
        assert client.get("/healthz").status_code == 200
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_peer_that_connected_and_said_nothing_does_not_break_the_shutdown() -> None:
    """A connection still waiting for its A-ASSOCIATE-RQ when the app stops (a port check,
    a silent peer): the SCP closes it, with no A-ABORT (no event of that state; pynetdicom's
    thread raised InvalidEventError, which the suite's warnings-as-errors turn into a
    failure), and stops within a second."""
    port = free_port()
    with socket.socket() as silent:
        with TestClient(create_app(Settings(models=MODELS, threads=1, dicom_port=port))):
            silent.settimeout(5)
            silent.connect(("127.0.0.1", port))
            time.sleep(0.3)  # the SCP has accepted it and waits for an A-ASSOCIATE-RQ
            started = time.monotonic()
        assert time.monotonic() - started < 1.0
        assert silent.recv(1) == b""  # closed by the SCP, nothing sent


def test_a_taken_port_stops_the_start_up() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(Settings(models=MODELS, threads=1, dicom_port=port))
        with pytest.raises(DicomServerError, match=f"the DICOM port {port} cannot be opened"), \
                TestClient(app):
            pass


def _problem(status: int, code: str) -> Answer:
    return Answer(status, "application/problem+json", json.dumps({"code": code}).encode())


@pytest.mark.parametrize(("status", "code", "expected"), [
    (400, "invalid_dicom", 0xC000),  # Error: cannot understand
    (406, "not_acceptable", 0xA900),  # no Study Instance UID for the results to join
    (413, "payload_too_large", 0xA700),  # Refused: out of resources
    (503, "overloaded", 0xA700),
    (422, "dicom_not_accepted", 0x0000),  # valid, not for this model: taken
    (415, "dicom_without_pixels", 0x0000),
    (422, "unknown_method", 0x0110),  # a configuration fault: processing failure
    (401, "unauthorized", 0x0110),
    (500, "internal_error", 0x0110),
])
def test_status_of_each_answer(status: int, code: str, expected: int) -> None:
    assert status_of(_problem(status, code)) == expected


def test_the_objects_of_an_answer() -> None:
    parts = [b"DICM-one\r\n--not-the-boundary", b"two"]
    body, boundary = multipart_related([Encoded(parts[0], TRANSFER_SYNTAXES[JPEGLSLossless]),
                                        Encoded(parts[1], DEFAULT)])
    assert body.count(b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.4.80"
                      b"\r\n") == 1
    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    assert Answer(200, media, body).objects() == parts
    assert Answer(200, "application/dicom", b"whole").objects() == [b"whole"]
    assert Answer(200, f"application/dicom; transfer-syntax={JPEGLSLossless}",
                  b"whole").objects() == [b"whole"]
    with pytest.raises(ValueError, match="no DICOM objects"):
        Answer(200, "application/json", b"{}").objects()


def test_with_api_keys_the_scp_calls_explain_as_a_keyed_client(
        caplog: pytest.LogCaptureFixture) -> None:
    storescu = dcmtk("storescu")
    assert storescu is not None, "DCMTK is not installed: `bash scripts/system-deps.sh`"
    port = free_port()
    settings = Settings(models=MODELS, threads=1, dicom_port=port,
                        api_keys=("a-long-enough-api-key",))
    caplog.set_level(logging.INFO, logger="service.dimse.scp")
    with TestClient(create_app(settings)) as client:
        assert client.post("/predict", content=b"x").status_code == 401  # keys are on
        result = subprocess.run([storescu, "-aec", "MEDEXPLAIN", "127.0.0.1", str(port),
                                 str(DATA / "dicom" / "phantom_nodule.dcm")],
                                capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = [r.getMessage() for r in caplog.records if r.name == "service.dimse.scp"]
    assert re.fullmatch(r"C-STORE from STORESCU: 0x0000 explained: 1 object\(s\) to nowhere "
                        r"\(\d+\.\d s\)", message), message

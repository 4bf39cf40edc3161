"""Patient data never reaches logs, warnings, metrics or error bodies.

Uploads carry a canary in PatientName, PatientID, PatientBirthDate, AccessionNumber (and
PatientSex, StudyID, ReferringPhysicianName), and in the values the decoder itself reads
(UIDs, Window Center): valid values, invalid ones (pydicom's value validation
quotes invalid values in its warnings and log records), and files that take every error
path the decoder and the routes have. Every log record of every logger at DEBUG, every
warning, everything written to stdout/stderr, every error body and the /metrics text are
searched for the canary. Query strings, paths and API keys carry it too (they may be echoed
to the client that sent them, never logged); unexpected errors carry it in their message;
and a real ``medexplain serve`` process, with JSON logs at DEBUG, is searched the same way:
its service log, access log, uvicorn's own lines and everything on its stdout and stderr.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filewriter import dcmwrite
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian

from service import logs
from service.config import Settings
from service.main import create_app
from tests.api.conftest import DATA, MODELS, ROOT

CANARY = "QZXCANARY"
# A date canary has to be a date; this one cannot occur in a UID's digits by chance often.
CANARY_DATE = "18670419"
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"


def _dataset(**changes: object) -> pydicom.FileDataset:
    ds = pydicom.dcmread(PHANTOM)
    values: dict[str, object] = {
        "PatientName": f"{CANARY}^Jane", "PatientID": f"{CANARY}-ID",
        "PatientBirthDate": CANARY_DATE, "AccessionNumber": f"A{CANARY}"[:16],
        "StudyID": CANARY[:16], "ReferringPhysicianName": f"{CANARY}^Doc",
    }
    values.update(changes)
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
    return ds


def _bytes(ds: pydicom.Dataset, **encoding: bool) -> bytes:
    buf = io.BytesIO()
    if encoding:  # the file's own encoding, or a bare dataset when it has no File Meta
        dcmwrite(buf, ds, force_encoding=True, **encoding)  # type: ignore[arg-type]
    else:
        dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _valid() -> bytes:
    return _bytes(_dataset())


def _invalid_values() -> bytes:
    # Invalid for their VRs: pydicom's validation would quote each of them.
    return _bytes(_dataset(
        PatientName=f"{CANARY}\x07" * 12, PatientID=f"{CANARY}\\" * 10,
        PatientBirthDate=f"{CANARY}", AccessionNumber=f"{CANARY}\n" * 3,
        PatientSex=CANARY.lower(), StudyDate=CANARY, StudyTime=CANARY,
    ))


def _canary_in_read_values() -> bytes:
    # What the decoder reads itself: pydicom's read validation quoted these (UI twice).
    # (Code strings such as Modality are Defined Terms, which a refusal may name.)
    return _bytes(_dataset(StudyInstanceUID=CANARY, SeriesInstanceUID=f"1.{CANARY}",
                           SOPInstanceUID=CANARY))


def _canary_window() -> bytes:
    # Not a number: float() quotes it in its ValueError, the cause of the 400.
    ds = _dataset()
    tag = Tag(tag_for_keyword("WindowCenter"))
    ds._dict[tag] = RawDataElement(tag, "DS", 10, f"{CANARY} ".encode(), 0, False, True)
    return _bytes(ds)


def _without_pixels() -> bytes:
    ds = _dataset()
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        delattr(ds, keyword)
    return _bytes(ds)


def _unsupported_syntax() -> bytes:
    data = _valid()
    return data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.4.100\x00"[:20], 1)


def _huge() -> bytes:
    return _bytes(_dataset(Rows=60000, Columns=60000))


def _bad_uids() -> bytes:
    # No study to join: DICOM output is refused (406), JSON still works.
    return _bytes(_dataset(StudyInstanceUID="1.2.x", SOPInstanceUID=""))


def _bare_implicit() -> bytes:
    """Implicit VR, without preamble and File Meta: parsed with force=True."""
    ds = _dataset()
    del ds.file_meta
    ds.preamble = None
    return _bytes(ds, implicit_vr=True, little_endian=True)


def _big_endian() -> bytes:
    ds = _dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    return _bytes(ds, implicit_vr=False, little_endian=False)


def _short_pixels() -> bytes:
    data = _valid()
    return data[: len(data) - 5000]


def _cut_in_patient_module() -> bytes:
    data = _valid()
    return data[: data.index(f"{CANARY}^Jane".encode()) + len(CANARY) + 2]


def _corrupt_preamble() -> bytes:
    data = bytearray(_valid())
    data[128:132] = b"DICX"
    return bytes(data)


@dataclass
class Sink:
    """Everything the service may have written somewhere."""

    records: list[str] = field(default_factory=list)
    caught: list[warnings.WarningMessage] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [f"{w.category.__name__}: {w.message}" for w in self.caught]


class _Collect(logging.Handler):
    def __init__(self, sink: Sink) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.sink.records.append(f"{record.name}: {text}")


@pytest.fixture
def sink() -> Iterator[Sink]:
    """Every logger at DEBUG, with a recording handler on each, and every warning."""
    out = Sink()
    handler = _Collect(out)
    loggers = [logging.getLogger(name) for name in ["", *logging.root.manager.loggerDict]]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.disabled = False
        logger.addHandler(handler)  # propagate=False loggers included
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out.caught = caught
            yield out
    finally:
        for logger, level, disabled in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.disabled = disabled


def _assert_clean(texts: list[str], where: str) -> None:
    for text in texts:
        assert CANARY.lower() not in text.lower(), f"canary in {where}: {text[:300]}"
        assert CANARY_DATE not in text, f"birth date in {where}: {text[:300]}"


UPLOADS = {
    "valid": (_valid, 200),
    "invalid-values": (_invalid_values, 200),
    "canary-in-read-values": (_canary_in_read_values, 200),
    "canary-in-window": (_canary_window, 400),
    "bare-implicit-vr": (_bare_implicit, 200),
    "big-endian": (_big_endian, 200),
    "without-pixels": (_without_pixels, 415),
    "unsupported-syntax": (_unsupported_syntax, 415),
    "too-many-pixels": (_huge, 413),
    "bad-uids": (_bad_uids, 200),
    "truncated-pixels": (_short_pixels, 400),
    "truncated-in-patient": (_cut_in_patient_module, 400),
    "corrupt-preamble": (_corrupt_preamble, 400),
}

# Parameters and Accept headers that take each route's other error paths with the upload.
VARIANTS = [
    ("/explain", {}, None),
    ("/explain", {"methods": "gradcam,crm"}, 'multipart/related; type="application/dicom"'),
    ("/explain", {"methods": "gradcam"}, "application/dicom"),
    ("/explain", {"methods": "fixations", "dicom": "sc,sr,gsps,seg"},
     'multipart/related; type="application/dicom"'),
    ("/explain", {"classes": "Fracture"}, None),
    ("/explain", {"frame": "7"}, None),
    ("/explain", {"window": "40,400", "methods": "nope"}, None),
    ("/explain", {"size": "feature", "methods": "guided_backprop"}, None),
    ("/explain", {"model": "nope"}, None),
    ("/explain", {}, "text/html"),
    ("/predict", {}, None),
    ("/predict", {"window": "0,0"}, None),
]


@pytest.mark.parametrize("name", list(UPLOADS))
def test_no_patient_data_in_logs_warnings_or_errors(client: TestClient, sink: Sink,
                                                    capfd: pytest.CaptureFixture[str],
                                                    name: str) -> None:
    make, status = UPLOADS[name]
    data = make()
    assert CANARY.encode() in data
    for path, params, accept in VARIANTS:
        headers = {"content-type": "application/dicom"}
        if accept:
            headers["accept"] = accept
        r = client.post(path, content=data, params=params, headers=headers)
        assert r.status_code < 500, r.text
        if r.headers["content-type"].startswith(("application/json",
                                                  "application/problem+json")):
            sink.bodies.append(r.text)
        if not params and path == "/predict":
            assert r.status_code == status, r.text
    # The multipart form, with the canary in the file name too.
    r = client.post("/explain", files={"file": (f"{CANARY}.dcm", data, "application/dicom")},
                    data={"methods": "crm_combined"})
    sink.bodies.append(r.text)
    r = client.post("/explain", content=b"--b\r\n" + data[:300],
                    headers={"content-type": "multipart/form-data; boundary=b"})
    sink.bodies.append(r.text)
    metrics = client.get("/metrics").text
    captured = capfd.readouterr()

    _assert_clean(sink.records, "a log record")
    _assert_clean(sink.warnings, "a warning")
    _assert_clean(sink.bodies, "an error body")
    _assert_clean([metrics], "/metrics")
    _assert_clean([captured.out, captured.err], "stdout/stderr")


def test_the_sink_sees_what_pydicom_says(client: TestClient, sink: Sink) -> None:
    """The fixture works: pydicom's value validation quotes invalid values in a warning
    (raised where the value is set, seen here before anything can handle it) and in a log
    record, whose text the service withholds (the app, made before the sink, installed
    that)."""
    # The service turns value validation off while reading; asked for, it warns and logs.
    DataElement(tag_for_keyword("PatientSex"), "CS", CANARY.lower(), validation_mode=config.WARN)
    assert any(CANARY.lower() in text for text in sink.warnings)
    pydicom_records = [text for text in sink.records if text.startswith("pydicom")]
    assert pydicom_records and all(logs.WITHHELD in text for text in pydicom_records)
    _assert_clean(pydicom_records, "a pydicom record")


# Query strings and paths: each value may come back in that client's own error body, but is
# never logged. (X-Request-ID is the exception by design: a plain token the client chose.)
QUERIES = [
    ("/explain", {"model": CANARY}), ("/explain", {"classes": CANARY}),
    ("/explain", {"methods": CANARY}), ("/explain", {"window": CANARY}),
    ("/explain", {"frame": CANARY}), ("/explain", {CANARY: "1"}),
    ("/predict", {"model": CANARY, "frame": "9" * 5000}), ("/predict", {"heatmap": CANARY}),
]


def test_no_query_or_path_value_in_logs(client: TestClient, sink: Sink,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    data = (DATA / "dicom" / "phantom_nodule.dcm").read_bytes()
    for path, params in QUERIES:
        r = client.post(path, content=data, params=params,
                        headers={"content-type": "application/dicom"})
        assert 400 <= r.status_code < 500, r.text
        r = client.post(path, files={"file": ("x.dcm", data, "application/dicom")}, data=params)
        assert 400 <= r.status_code < 500, r.text
    for path in (f"/models/{CANARY}", f"/{CANARY}", f"/models?{CANARY}=1"):
        assert client.get(path).status_code in (200, 404)
    metrics = client.get("/metrics").text
    captured = capfd.readouterr()
    # The test client's own log (httpx) records the URLs it sends; the service's must not.
    service_records = [text for text in sink.records if not text.startswith("httpx")]
    _assert_clean(service_records, "a log record")
    _assert_clean(sink.warnings, "a warning")
    _assert_clean([metrics], "/metrics")
    _assert_clean([captured.out, captured.err], "stdout/stderr")
    access = [text for text in sink.records if text.startswith("medexplain.access")]
    assert any("POST /explain 422" in text for text in access), access
    assert any("GET /models/{name} 404" in text for text in access), access


def _failing_app(settings: Settings):  # type: ignore[no-untyped-def]
    """The service with one more route, which fails the way a bug would."""
    app = create_app(settings)

    @app.get("/fail")
    def fail() -> None:
        try:
            {}[CANARY]
        except KeyError as exc:
            raise RuntimeError(f"could not handle {CANARY}") from exc

    return app


def test_unexpected_errors_are_logged_without_their_message(
        settings: Settings, sink: Sink, capfd: pytest.CaptureFixture[str]) -> None:
    with TestClient(_failing_app(settings)) as failing:
        r = failing.get("/fail", headers={"x-request-id": "req-42"})
    assert r.status_code == 500
    assert r.json()["code"] == "internal_error"
    assert r.headers["x-request-id"] == "req-42"
    _assert_clean([r.text], "the 500 body")
    _assert_clean(sink.records, "a log record")
    _assert_clean([*capfd.readouterr()], "stdout/stderr")
    assert any(text.startswith("medexplain.errors: unhandled RuntimeError at ")
               for text in sink.records)
    assert any("GET /fail 500" in text for text in sink.records)


def test_an_unexpected_error_keeps_the_keep_alive_connection(settings: Settings) -> None:
    """Contained in the app, the error never reaches uvicorn, which would log its text and
    close the connection under the client's next pooled request."""
    import http.client
    import threading

    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_failing_app(settings), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for path, status in (("/fail", 500), ("/healthz", 200), ("/fail", 500),
                             ("/healthz", 200)):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status == status
            assert response.getheader("connection") != "close"
        assert connection.sock is not None  # the same socket served all four
        connection.close()
    finally:
        server.should_exit = True
        thread.join(30)


def test_formatted_tracebacks_keep_types_and_frames_but_no_message() -> None:
    try:
        try:
            {}[CANARY]
        except KeyError as exc:
            raise RuntimeError(f"could not handle {CANARY}") from exc
    except RuntimeError:
        record = logging.LogRecord("medexplain", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    record.request_id = "r1"
    text = logs.TextFormatter().format(record)
    line = json.loads(logs.JsonFormatter().format(record))
    for shown in (text, line["traceback"]):
        _assert_clean([shown], "a formatted traceback")
        assert "builtins.KeyError" in shown and "builtins.RuntimeError" in shown
        assert shown.index("KeyError") < shown.index("direct cause") < shown.index("Runtime")
        assert "in test_formatted_tracebacks_keep_types_and_frames_but_no_message" in shown
    assert line["message"] == "failed" and line["request_id"] == "r1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


KEY = f"{CANARY}-secret-key-0001"


def _serve(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], int, Path, Path]:
    port = _free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEDEXPLAIN_")}
    environ.update(PYTHONPATH=str(ROOT), MEDEXPLAIN_MODELS=str(MODELS), MEDEXPLAIN_THREADS="1",
                   **env)
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                                    str(port)], cwd=ROOT, env=environ, stdout=stdout,
                                   stderr=stderr)
    return process, port, out, err


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.read()
        return int(error.code)


def test_a_real_server_logs_nothing_from_uploads_queries_or_keys(tmp_path: Path) -> None:
    process, port, out, err = _serve(tmp_path, MEDEXPLAIN_LOG_FORMAT="json",
                                     MEDEXPLAIN_LOG_LEVEL="debug", MEDEXPLAIN_API_KEYS=KEY)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, err.read_text()
            try:
                if _request(port, "GET", "/healthz") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.3)
        auth = {"authorization": f"Bearer {KEY}", "content-type": "application/dicom"}
        assert _request(port, "POST", "/predict", _valid(),
                        {**auth, "authorization": f"Bearer {CANARY}-wrong-key-00"}) == 401
        for name in ("valid", "invalid-values", "canary-in-read-values", "canary-in-window",
                     "too-many-pixels", "truncated-in-patient"):
            make, status = UPLOADS[name]
            assert _request(port, "POST", "/predict?model=demo-cxr&window=", make(),
                            auth) == status
        assert _request(port, "POST", f"/explain?classes={CANARY}&methods=gradcam", _valid(),
                        auth) == 422
        assert _request(port, "GET", f"/models/{CANARY}?{CANARY}=1",
                        headers={"x-api-key": KEY}) == 404
        # Bytes that are no HTTP at all: uvicorn logs why (its exception quotes the line).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(f"GET /{CANARY} HTTP/1.1\r\n{CANARY} no colon\r\n\r\n".encode())
            raw.recv(4096)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    stdout, stderr = out.read_text(), err.read_text()
    _assert_clean([stdout, stderr], "the server's stdout/stderr")
    assert "demo-cxr" in stderr  # the log is there (JSON at DEBUG), only clean
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "medexplain.access"]
    assert {(line["route"], line["status"]) for line in access} >= {
        ("/predict", 401), ("/predict", 200), ("/predict", 413), ("/explain", 422),
        ("/models/{name}", 404)}
    assert all(len(line["request_id"]) == 32 for line in access)
    assert any("Invalid HTTP request" in line["message"] for line in lines)


def test_bad_api_keys_are_not_printed(tmp_path: Path) -> None:
    process, _, out, err = _serve(tmp_path, MEDEXPLAIN_API_KEYS=f"{CANARY},{KEY}")
    try:
        assert process.wait(60) == 2
    finally:
        if process.poll() is None:  # it started after all: stop it
            process.kill()
            process.wait()
    stderr = err.read_text()
    assert "API keys must be at least 16 characters long" in stderr
    _assert_clean([out.read_text(), stderr], "the server's stdout/stderr")

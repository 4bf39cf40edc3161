"""Orthanc -> medexplain bridge, run by Orthanc's Python plugin.

Every instance Orthanc stores is posted to medexplain's ``POST /explain`` with
``Accept: application/dicom``; the Secondary Capture that comes back (same study, new
series) is stored into Orthanc. Instances that are Secondary Captures, or whose
Manufacturer is ``medexplain``, are skipped, so the bridge never explains its own output.

The work happens on one worker thread: Orthanc's change callback only enqueues the
instance ID, because calling the REST API from inside the callback can deadlock Orthanc.

Settings (environment variables of the Orthanc process):
    MEDEXPLAIN_URL              the service, default http://127.0.0.1:8000
    MEDEXPLAIN_BRIDGE_QUERY     query string for /explain, default ``methods=gradcam``
    MEDEXPLAIN_BRIDGE_TIMEOUT   seconds per /explain call, default 120
    MEDEXPLAIN_API_KEY          sent as X-API-Key when the service requires keys

Logs name Orthanc instance IDs (hashes of UIDs), HTTP statuses and problem codes only,
never patient data. Only the Python standard library is used: Orthanc embeds the system
Python, not a virtual environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request

import orthanc  # provided by the plugin, not installable

SERVICE_URL = os.environ.get("MEDEXPLAIN_URL", "http://127.0.0.1:8000").rstrip("/")
QUERY = os.environ.get("MEDEXPLAIN_BRIDGE_QUERY", "methods=gradcam")
TIMEOUT_S = float(os.environ.get("MEDEXPLAIN_BRIDGE_TIMEOUT", "120"))
API_KEY = os.environ.get("MEDEXPLAIN_API_KEY", "")

# Secondary Capture Image Storage and its multi-frame variants: never explained.
SKIPPED_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
})
OWN_MANUFACTURER = "medexplain"
# The service may start after Orthanc or be briefly overloaded (503): retry with backoff.
ATTEMPTS = 5
QUEUE_SIZE = 10_000

_jobs: queue.Queue[str | None] = queue.Queue(maxsize=QUEUE_SIZE)
_worker: threading.Thread | None = None


def _log(message: str) -> None:
    orthanc.LogWarning(f"medexplain bridge: {message}")


def _rest_text(uri: str) -> str | None:
    """A small REST answer as text; None when the resource does not exist."""
    try:
        return bytes(orthanc.RestApiGet(uri)).decode("ascii", "replace").strip(" \x00")
    except orthanc.OrthancException:
        return None


def _is_skipped(instance_id: str) -> bool:
    sop_class = _rest_text(f"/instances/{instance_id}/metadata/SopClassUid")
    if sop_class in SKIPPED_SOP_CLASSES:
        return True
    return _rest_text(f"/instances/{instance_id}/content/0008-0070") == OWN_MANUFACTURER


def _problem_code(error: urllib.error.HTTPError) -> str:
    """The stable ``code`` of a problem+json answer (never its detail)."""
    try:
        return str(json.loads(error.read(65536)).get("code", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _explain(instance_id: str, dicom: bytes) -> bytes | None:
    url = f"{SERVICE_URL}/explain" + (f"?{QUERY}" if QUERY else "")
    headers = {"Content-Type": "application/dicom", "Accept": "application/dicom"}
    if API_KEY:
        headers["X-API-Key"] = API_KEY
    for attempt in range(1, ATTEMPTS + 1):
        request = urllib.request.Request(url, data=dicom, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            code = _problem_code(error)
            if error.code == 503 and attempt < ATTEMPTS:
                time.sleep(min(float(error.headers.get("Retry-After") or 1), 30.0))
                continue
            _log(f"instance {instance_id} not explained: HTTP {error.code} {code}")
            return None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if attempt < ATTEMPTS:
                time.sleep(2 ** (attempt - 1))
                continue
            reason = getattr(error, "reason", error)
            _log(f"instance {instance_id} not explained: {SERVICE_URL} unreachable ({reason})")
            return None
    return None


def process(instance_id: str) -> None:
    """Explain one stored instance and store the Secondary Capture back."""
    if _is_skipped(instance_id):
        return
    dicom = bytes(orthanc.RestApiGet(f"/instances/{instance_id}/file"))
    started = time.monotonic()
    capture = _explain(instance_id, dicom)
    if capture is None:
        return
    stored = json.loads(orthanc.RestApiPost("/instances", capture))
    _log(f"instance {instance_id} -> secondary capture {stored.get('ID')} "
         f"({time.monotonic() - started:.1f} s)")


def _work() -> None:
    while True:
        instance_id = _jobs.get()
        if instance_id is None:
            return
        try:
            process(instance_id)
        # One bad instance must not stop the bridge for every later one; only the type is
        # logged, as a message could quote data.
        except Exception as error:  # noqa: BLE001
            _log(f"instance {instance_id} failed: {type(error).__name__}")


def on_change(change_type: int, level: int, resource_id: str) -> None:
    global _worker
    if change_type == orthanc.ChangeType.NEW_INSTANCE:
        try:
            _jobs.put_nowait(resource_id)
        except queue.Full:
            _log(f"queue full ({QUEUE_SIZE}); instance {resource_id} not explained")
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        _worker = threading.Thread(target=_work, name="medexplain-bridge", daemon=True)
        _worker.start()
        _log(f"explaining new instances with {SERVICE_URL}")
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED and _worker is not None:
        with contextlib.suppress(queue.Full):  # else the daemon thread ends with Orthanc
            _jobs.put_nowait(None)
        _worker.join(timeout=5)


orthanc.RegisterOnChangeCallback(on_change)

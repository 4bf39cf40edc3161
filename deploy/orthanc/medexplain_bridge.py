"""Orthanc -> medexplain bridge, run by Orthanc's Python plugin.

Every instance Orthanc stores is posted to medexplain's ``POST /explain`` with
``Accept: multipart/related; type="application/dicom"``; every object that comes back (a
Secondary Capture per explanation, the Structured Report with ``dicom=sc,sr`` or
``dicom=sr`` in the query, the presentation state and the segmentation with ``gsps`` and
``seg`` among them; same study, new series) is stored into Orthanc. Instances that are Secondary Captures, or whose
Manufacturer is ``medexplain``, are skipped, so the bridge never explains its own output.
Instances outside the model's accepted modalities / body parts / view positions (its
``accepts`` in ``GET /models/{name}``, read once) are skipped too, with the same rules as the
service: Modality must be listed, Body Part Examined and View Position when present. The
service checks again and answers 422 ``dicom_not_accepted``, logged as a skip.

The work happens on one worker thread: Orthanc's change callback only enqueues the
instance ID, because calling the REST API from inside the callback can deadlock Orthanc.

Settings (environment variables of the Orthanc process):
    MEDEXPLAIN_URL              the service, default http://127.0.0.1:8000
    MEDEXPLAIN_BRIDGE_QUERY     query string for /explain, default ``methods=gradcam``
    MEDEXPLAIN_BRIDGE_TIMEOUT   seconds per /explain call, default 120
    MEDEXPLAIN_BRIDGE_TRANSFER_SYNTAX
                                transfer syntax of the captures' pixels (the Accept header's
                                transfer-syntax parameter), e.g. 1.2.840.10008.1.2.4.80 for
                                JPEG-LS lossless; default uncompressed
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
import urllib.parse
import urllib.request

import orthanc  # provided by the plugin, not installable

SERVICE_URL = os.environ.get("MEDEXPLAIN_URL", "http://127.0.0.1:8000").rstrip("/")
QUERY = os.environ.get("MEDEXPLAIN_BRIDGE_QUERY", "methods=gradcam")
TIMEOUT_S = float(os.environ.get("MEDEXPLAIN_BRIDGE_TIMEOUT", "120"))
API_KEY = os.environ.get("MEDEXPLAIN_API_KEY", "")
TRANSFER_SYNTAX = os.environ.get("MEDEXPLAIN_BRIDGE_TRANSFER_SYNTAX", "").strip()

# Secondary Capture Image Storage and its multi-frame variants: never explained.
SKIPPED_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
})
OWN_MANUFACTURER = "medexplain"
MULTIPART = 'multipart/related; type="application/dicom"'
# The service may start after Orthanc or be briefly overloaded (503): retry with backoff.
ATTEMPTS = 5
QUEUE_SIZE = 10_000

# model.toml [accepts] keys -> the Orthanc tag each restricts; Modality must be present.
RULE_TAGS = {"modalities": "0008-0060", "body_parts": "0018-0015", "view_positions": "0018-5101",
             "presentation_intents": "0008-0068"}

_jobs: queue.Queue[str | None] = queue.Queue(maxsize=QUEUE_SIZE)
_rules: dict[str, list[str]] | None = None
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


def _model_rules() -> dict[str, list[str]]:
    """The served model's ``accepts``, fetched once; empty while the service is unreachable
    (the service then still refuses what its model is not for)."""
    global _rules
    if _rules is not None:
        return _rules
    model = urllib.parse.parse_qs(QUERY).get("model", [""])[0]
    url = f"{SERVICE_URL}/models" + (f"/{urllib.parse.quote(model)}" if model else "")
    request = urllib.request.Request(url, headers={"X-API-Key": API_KEY} if API_KEY else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError):
        return {}
    if not model:  # GET /models: the default model's entry
        body = next((m for m in body.get("models", []) if m.get("default")), {})
    _rules = {k: list(v) for k, v in (body.get("accepts") or {}).items() if k in RULE_TAGS}
    return _rules


def _not_for_the_model(instance_id: str) -> str | None:
    """The attribute that puts an instance outside the model's rules; None when inside."""
    for key, allowed in _model_rules().items():
        if not allowed:
            continue
        tag = RULE_TAGS[key]
        value = (_rest_text(f"/instances/{instance_id}/content/{tag}") or "").upper()
        if not value and key != "modalities":
            continue
        if value not in allowed:
            return key
    return None


def _problem_code(error: urllib.error.HTTPError) -> str:
    """The stable ``code`` of a problem+json answer (never its detail)."""
    try:
        return str(json.loads(error.read(65536)).get("code", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def _parts(body: bytes, content_type: str) -> list[bytes]:
    """The objects of a multipart/related answer (RFC 2387): each part is its headers, a
    blank line and the object; the service picks a boundary that is in no object."""
    boundary = next((p.strip().split("=", 1)[1].strip('"') for p in content_type.split(";")
                     if p.strip().lower().startswith("boundary=")), None)
    if not boundary:
        raise ValueError("a multipart answer without a boundary")
    delimiter = b"\r\n--" + boundary.encode("ascii")
    body = b"\r\n" + body  # the first delimiter then looks like the others
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        _headers, separator, payload = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a multipart part without headers")
        parts.append(payload)
    return parts


def _explain(instance_id: str, dicom: bytes) -> list[bytes] | None:
    url = f"{SERVICE_URL}/explain" + (f"?{QUERY}" if QUERY else "")
    accept = f"{MULTIPART}; transfer-syntax={TRANSFER_SYNTAX}" if TRANSFER_SYNTAX else MULTIPART
    headers = {"Content-Type": "application/dicom", "Accept": accept}
    if API_KEY:
        headers["X-API-Key"] = API_KEY
    for attempt in range(1, ATTEMPTS + 1):
        request = urllib.request.Request(url, data=dicom, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return _parts(bytes(response.read()), response.headers["Content-Type"] or "")
        except urllib.error.HTTPError as error:
            code = _problem_code(error)
            if code == "dicom_not_accepted":
                _log(f"instance {instance_id} skipped: not for the model ({code})")
                return None
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
    """Explain one stored instance and store the objects that come back."""
    if _is_skipped(instance_id):
        return
    outside = _not_for_the_model(instance_id)
    if outside is not None:
        _log(f"instance {instance_id} skipped: outside the model's {outside}")
        return
    dicom = bytes(orthanc.RestApiGet(f"/instances/{instance_id}/file"))
    started = time.monotonic()
    objects = _explain(instance_id, dicom)
    if objects is None:
        return
    stored = [json.loads(orthanc.RestApiPost("/instances", o)).get("ID") for o in objects]
    _log(f"instance {instance_id} -> {len(stored)} object(s) stored: {', '.join(stored)} "
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

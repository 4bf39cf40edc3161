"""End-to-end HTTP latency of the service on a real-size radiograph, several checkouts at once.

    .venv/bin/python tools/bench_http.py [--server LABEL=CHECKOUT_DIR ...] [--rounds 7]
        [--port-base 8600] [--threads 2] [--tls LABEL ...] [--out results.json] [--markdown]
    .venv/bin/python tools/bench_http.py --server http=. --server https=. --tls https
    .venv/bin/python tools/bench_http.py --requests dicom --rounds 5

What it measures: for each request in ``REQUESTS`` (``/predict`` and ``/explain`` variants on
pydicom-data's computed radiograph ``RG1_UNCR.dcm``, 1841x1955 16-bit MONOCHROME1, sent as
a raw ``application/dicom`` body, plus the web demo's multipart upload of a 2800x3000 grey
PNG made from the same pixels), the client-side wall time from sending the request to
reading the last byte of the answer, over one persistent keep-alive connection to a
``medexplain serve`` process on 127.0.0.1. Each ``--server`` is a checkout of this
repository started as its own process with the same settings (``MEDEXPLAIN_THREADS``, by
default 2; any other ``MEDEXPLAIN_*`` variable of the caller's environment is dropped), and
the child imports that checkout's ``service`` package, whatever is installed.

How it is run: every server gets two untimed warm-up passes of every request; then, for each
round, each request is sent once to each server, the order of the servers and of the
requests rotated every round, so that slow drifts of the machine hit every checkout alike
and no request always follows the same one. The connection is
re-opened, untimed, when the server has closed it while idle. ``--tls LABEL`` serves that
server over HTTPS (MEDEXPLAIN_TLS_CERTFILE / KEYFILE, a throwaway certificate from a trustme
CA, a test dependency) and reaches it with a client that verifies it; the same checkout
under two labels, one of them ``--tls``, measures what TLS adds.

How to read it: medians over the rounds, per server and request: wall ms (what a client
waits), ÷ predict (that median over the same server's ``/predict`` median: the cost of an
explanation in forward passes plus I/O, comparable across machines), render ms (the
server's own ``timings_ms.render``: encoding heatmaps and overlays) and response bytes.
Between checkouts, compare rows of the same request; differences of a few percent are
within run-to-run noise on a shared machine. A benchmark, not a test: it asserts nothing
about the numbers. Non-200 answers are listed with their status and the start of the body.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import select
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DICOM_FILE = "RG1_UNCR.dcm"
DEMO_PNG_SIZE = (2800, 3000)  # width, height of the web demo's upload

ALL_METHODS = "gradcam,crm,crm_combined,guided_backprop,guided_gradcam,fixations"
FOUR_METHODS = "gradcam,crm,guided_gradcam,fixations"


@dataclass(frozen=True)
class Request:
    """One benchmarked request.

    ``body`` names a payload of ``make_payloads``: ``"dicom"`` sends the radiograph as a raw
    ``application/dicom`` body with ``query`` as the query string; ``"demo_png"`` sends a
    multipart/form-data ``file`` part (the 2800x3000 PNG) with ``form`` as its other fields.
    """

    name: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    body: str = "dicom"
    form: dict[str, str] = field(default_factory=dict)
    accept: str = "application/json"


# The requests, in the order they are sent and reported; the first one is the reference of
# the "÷ predict" column (keep /predict first).
REQUESTS: list[Request] = [
    Request("predict", "/predict"),
    Request("gradcam 1 class png original", "/explain",
            {"methods": "gradcam", "classes": "0", "heatmap": "png", "size": "original"}),
    Request("default", "/explain"),
    Request("gradcam npy (default size)", "/explain",
            {"methods": "gradcam", "classes": "0", "heatmap": "npy"}),
    Request("gradcam overlay (default size)", "/explain",
            {"methods": "gradcam", "classes": "0", "heatmap": "overlay"}),
    Request("4 methods x 2 classes overlay (default size)", "/explain",
            {"methods": FOUR_METHODS, "classes": "0,1", "heatmap": "overlay"}),
    Request("4 methods x 2 classes overlay original", "/explain",
            {"methods": FOUR_METHODS, "classes": "0,1", "heatmap": "overlay",
             "size": "original"}),
    Request("web demo: 2800x3000 PNG, all methods, overlay", "/explain", body="demo_png",
            form={"methods": ALL_METHODS, "heatmap": "overlay"}),
]

# --requests dicom: DICOM answers in each transfer syntax the service writes (the Accept
# header's transfer-syntax parameter): one capture, and the captures of 4 methods x 2
# classes, one per map, as multipart/related; then the same 8 maps as one Structured
# Report, one presentation state and one segmentation (no transfer syntax to choose: the
# first two have no pixels, the last 1-bit frames written uncompressed).
_SYNTAXES = {"explicit": "1.2.840.10008.1.2.1", "jpeg-ls": "1.2.840.10008.1.2.4.80",
             "j2k lossless": "1.2.840.10008.1.2.4.90", "rle": "1.2.840.10008.1.2.5",
             "baseline jpeg": "1.2.840.10008.1.2.4.50"}
DICOM_REQUESTS: list[Request] = [
    Request("predict", "/predict"),
    *(Request(f"1 capture, {name}", "/explain", {"methods": "gradcam", "classes": "0"},
              accept=f"application/dicom; transfer-syntax={uid}")
      for name, uid in _SYNTAXES.items()),
    *(Request(f"8 captures, {name}", "/explain", {"methods": FOUR_METHODS, "classes": "0,1"},
              accept=f'multipart/related; type="application/dicom"; transfer-syntax={uid}')
      for name, uid in _SYNTAXES.items()),
    *(Request(f"8 maps, {name}", "/explain",
              {"methods": FOUR_METHODS, "classes": "0,1", "dicom": dicom},
              accept="application/dicom")
      for name, dicom in (("1 SR", "sr"), ("1 GSPS", "gsps"), ("1 SEG", "seg"))),
]
REQUEST_SETS = {"json": REQUESTS, "dicom": DICOM_REQUESTS}

WARMUP_PASSES = 2
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 15.0
ERROR_BODY_CHARS = 200
LOG_TAIL_CHARS = 20_000  # of each server's output, kept in --out
IMPORT_MARK = "bench_http: service imported from "

# The child: put the checkout first on sys.path (the environment may hold an editable
# install of another checkout), check that its own service package is the one imported,
# say where from, then run the ordinary command line.
CHILD_CODE = f"""\
import sys
checkout = sys.argv.pop(1)
sys.path.insert(0, checkout)
import pathlib
import service
where = pathlib.Path(service.__file__).resolve()
print({IMPORT_MARK!r} + str(where), file=sys.stderr, flush=True)
if not where.is_relative_to(pathlib.Path(checkout).resolve()):
    sys.exit("service comes from " + str(where) + ", not from " + checkout)
from service.cli import main
sys.argv[0] = "medexplain"
raise SystemExit(main())
"""


@dataclass
class Server:
    """A checkout served by a child process on one loopback port."""

    label: str
    checkout: Path
    port: int
    revision: str = ""
    service_file: str = ""
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    connection: http.client.HTTPConnection | None = None
    reconnects: int = 0
    log: str = ""
    # --tls: the client context that verifies it, and the server's certificate and key.
    tls: ssl.SSLContext | None = None
    tls_files: tuple[Path, Path] | None = None

    def open(self, timeout: float) -> http.client.HTTPConnection:
        if self.tls is None:
            return http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        return http.client.HTTPSConnection(HOST, self.port, timeout=timeout, context=self.tls)


@dataclass
class Sample:
    """One timed (or warm-up) exchange."""

    server: str
    request: str
    round: int
    status: int
    wall_ms: float
    bytes: int
    render_ms: float | None = None
    decode_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None


# --- payloads -------------------------------------------------------------------------------


def radiograph_path() -> Path:
    """The pydicom-data copy of ``RG1_UNCR.dcm`` (no download)."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(DICOM_FILE, download=False)
    if found is None:
        sys.exit(f"{DICOM_FILE} is not in the installed pydicom-data (pip install pydicom-data)")
    return Path(str(found))


def window_to_uint8(pixels: Any, center: float | None, width: float | None,
                    monochrome1: bool) -> Any:
    """Stored pixels → 8-bit grey with the given window (min-max without one), white = dense.

    MONOCHROME1 (low values bright) is inverted so that the result reads as MONOCHROME2.
    """
    import numpy as np

    values = np.asarray(pixels, dtype=np.float64)
    if center is None or width is None or width <= 1:
        low, high = float(values.min()), float(values.max())
    else:
        low, high = center - width / 2.0, center + width / 2.0
    scaled = (values - low) / max(high - low, 1e-9)
    grey = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return 255 - grey if monochrome1 else grey


def _first(value: Any) -> float | None:
    """A DICOM window value (possibly multi-valued) as one float, or None."""
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) \
            else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def demo_png(dicom_path: Path, size: tuple[int, int] = DEMO_PNG_SIZE) -> bytes:
    """The radiograph windowed to 8 bit, resized to ``size`` (width, height), as a grey PNG."""
    import cv2
    import pydicom

    ds = pydicom.dcmread(dicom_path)
    grey = window_to_uint8(ds.pixel_array, _first(ds.get("WindowCenter")),
                           _first(ds.get("WindowWidth")),
                           ds.PhotometricInterpretation == "MONOCHROME1")
    resized = cv2.resize(grey, size, interpolation=cv2.INTER_LINEAR)
    ok, encoded = cv2.imencode(".png", resized)
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return encoded.tobytes()


def multipart(fields: dict[str, str], filename: str, content: bytes,
              content_type: str, boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and one ``file`` part; (body, header)."""
    boundary = boundary or f"bench-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
                 + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def make_payloads(requests: list[Request]) -> dict[str, tuple[bytes, str]]:
    """(body, Content-Type) of every request, by request name; the PNG is made only if used."""
    dicom_path = radiograph_path()
    dicom = dicom_path.read_bytes()
    png: bytes | None = None
    payloads: dict[str, tuple[bytes, str]] = {}
    for req in requests:
        if req.body == "dicom":
            payloads[req.name] = (dicom, "application/dicom")
        elif req.body == "demo_png":
            if png is None:
                png = demo_png(dicom_path)
            payloads[req.name] = multipart(req.form, "radiograph.png", png, "image/png")
        else:
            raise ValueError(f"request {req.name!r}: unknown body {req.body!r}")
    return payloads


def target(req: Request) -> str:
    """The request's path with its query string."""
    from urllib.parse import urlencode

    return f"{req.path}?{urlencode(req.query, safe=',')}" if req.query else req.path


# --- servers --------------------------------------------------------------------------------


def parse_server(text: str) -> tuple[str, Path]:
    """``LABEL=CHECKOUT_DIR`` → (label, resolved folder holding a ``service`` package)."""
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=CHECKOUT_DIR, got {text!r}")
    path = Path(folder).expanduser().resolve()
    if not (path / "service" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"{folder} has no service/cli.py")
    return label, path


def git_revision(checkout: Path) -> str:
    """Short commit of the checkout, ``+dirty`` with uncommitted changes; '' outside git."""
    try:
        rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev.strip() + ("+dirty" if dirty.strip() else "")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server will: a closed connection's TIME_WAIT does not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def child_env(threads: int) -> dict[str, str]:
    """The caller's environment without its ``MEDEXPLAIN_*`` settings, plus the thread count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDEXPLAIN_")}
    env["MEDEXPLAIN_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(server: Server, env: dict[str, str], log_dir: Path) -> None:
    """Start ``medexplain serve`` of the server's checkout; output goes to a log file."""
    if not port_is_free(server.port):
        raise RuntimeError(f"port {server.port} is in use (pick another --port-base)")
    server.log_path = log_dir / f"{server.port}.log"
    if server.tls_files is not None:
        env = {**env, "MEDEXPLAIN_TLS_CERTFILE": str(server.tls_files[0]),
               "MEDEXPLAIN_TLS_KEYFILE": str(server.tls_files[1])}
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-c", CHILD_CODE, str(server.checkout), "serve",
             "--host", HOST, "--port", str(server.port)],
            cwd=server.checkout, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)


def log_tail(server: Server, chars: int = 2000) -> str:
    """The end of the server's log."""
    if server.log_path is None or not server.log_path.exists():
        return ""
    return server.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]


def imported_from(server: Server) -> str:
    """Where the child says its ``service`` package comes from ('' until it has said)."""
    for line in log_tail(server, 1_000_000).splitlines():
        if line.startswith(IMPORT_MARK):
            return line[len(IMPORT_MARK):].strip()
    return ""


def wait_ready(server: Server, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll GET /readyz until 200; seconds it took. Raises if the child dies or times out."""
    start = time.monotonic()
    deadline = start + timeout_s
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            raise RuntimeError(f"server {server.label} exited with {server.process.returncode}:"
                               f"\n{log_tail(server)}")
        conn = server.open(timeout=5)
        try:
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.5)
    raise RuntimeError(f"server {server.label} not ready after {timeout_s:.0f} s:\n"
                       f"{log_tail(server)}")


def stop_server(server: Server) -> None:
    """Close the connection; SIGTERM the child, SIGKILL it if it has not exited in time."""
    if server.connection is not None:
        server.connection.close()
        server.connection = None
    proc = server.process
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


# --- requests -------------------------------------------------------------------------------


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """Whether the idle connection's socket is gone or was closed by the server."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK; an idle server only says goodbye
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def connection(server: Server) -> http.client.HTTPConnection:
    """The server's keep-alive connection, (re)opened, untimed, when needed."""
    conn = server.connection
    if conn is not None and not _closed_by_peer(conn):
        return conn
    if conn is not None:
        conn.close()
        server.reconnects += 1
    conn = server.open(timeout=REQUEST_TIMEOUT_S)
    conn.connect()
    server.connection = conn
    return conn


def timings(body: bytes, content_type: str) -> dict[str, float | None]:
    """``timings_ms.render/decode/total`` of a JSON answer; None where absent or not JSON."""
    found: dict[str, float | None] = {"render": None, "decode": None, "total": None}
    if "json" not in content_type:
        return found
    try:
        values = json.loads(body).get("timings_ms") or {}
    except (ValueError, AttributeError):
        return found
    for key in found:
        value = values.get(key) if isinstance(values, dict) else None
        found[key] = float(value) if isinstance(value, int | float) else None
    return found


def send(server: Server, req: Request, payload: tuple[bytes, str], round_: int) -> Sample:
    """Send ``req`` once over the server's connection; time from send to the last byte."""
    body, content_type = payload
    headers = {"Content-Type": content_type, "Accept": req.accept, "Connection": "keep-alive"}
    for attempt in range(2):  # one retry on a connection the server dropped at send time
        conn = connection(server)
        start = time.perf_counter()
        try:
            conn.request("POST", target(req), body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            conn.close()
            server.connection = None
            if attempt == 0:
                continue
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            server.connection = None
            return Sample(server.label, req.name, round_, 0,
                          (time.perf_counter() - start) * 1e3, 0, error=repr(exc))
        wall = (time.perf_counter() - start) * 1e3
        if response.will_close:
            conn.close()
            server.connection = None
        found = timings(data, response.getheader("Content-Type", ""))
        error = None
        if response.status != 200:
            error = data.decode("utf-8", errors="replace")[:ERROR_BODY_CHARS]
        return Sample(server.label, req.name, round_, response.status, wall, len(data),
                      found["render"], found["decode"], found["total"], error)
    raise AssertionError("unreachable")


def send_safely(server: Server, req: Request, payload: tuple[bytes, str], round_: int) -> Sample:
    """``send``, with a lost connection reported as status 0 instead of raised."""
    try:
        return send(server, req, payload, round_)
    except (OSError, http.client.HTTPException) as exc:
        return Sample(server.label, req.name, round_, 0, 0.0, 0, error=repr(exc))


def rotated(items: list[T], round_: int) -> list[T]:
    """``items`` rotated left by ``round_`` places."""
    if not items:
        return []
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def run_rounds(servers: list[Server], requests: list[Request],
               payloads: dict[str, tuple[bytes, str]], rounds: int,
               progress: bool = True) -> tuple[list[Sample], list[float]]:
    """Warm-up passes, then the interleaved rounds; (timed samples, seconds per round)."""
    for server in servers:
        for pass_ in range(WARMUP_PASSES):
            for req in requests:
                sample = send_safely(server, req, payloads[req.name], -1 - pass_)
                if progress and sample.status != 200 and pass_ == 0:
                    print(f"warm-up {server.label} / {req.name}: HTTP {sample.status} "
                          f"{sample.error}", file=sys.stderr)
        if progress:
            print(f"warmed up {server.label}", file=sys.stderr)
    samples: list[Sample] = []
    round_seconds: list[float] = []
    for round_ in range(rounds):
        start = time.monotonic()
        order = rotated(servers, round_)
        # Requests rotate too: a request sent after a long one (a server idle for seconds)
        # runs colder, and that must not always be the same request, least of all predict.
        for req in rotated(requests, round_):
            for server in order:
                samples.append(send_safely(server, req, payloads[req.name], round_))
        round_seconds.append(time.monotonic() - start)
        if progress:
            print(f"round {round_ + 1}/{rounds}: {round_seconds[-1]:.1f} s", file=sys.stderr)
    return samples, round_seconds


# --- summary --------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    """Median of the non-None values; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(samples: list[Sample], servers: list[str],
              requests: list[str]) -> list[dict[str, Any]]:
    """Medians of the 200 answers per server and request, with ÷ predict and the errors."""
    rows: list[dict[str, Any]] = []
    reference: dict[str, float | None] = {}
    for server in servers:
        for name in requests:
            mine = [s for s in samples if s.server == server and s.request == name]
            ok = [s for s in mine if s.status == 200]
            wall = _median([s.wall_ms for s in ok])
            if name == requests[0]:
                reference[server] = wall
            ref = reference.get(server)
            failed = [s for s in mine if s.status != 200]
            rows.append({
                "server": server,
                "request": name,
                "n": len(ok),
                "wall_ms": wall,
                "ratio_to_predict": wall / ref if wall is not None and ref else None,
                "render_ms": _median([s.render_ms for s in ok]),
                "decode_ms": _median([s.decode_ms for s in ok]),
                "total_ms": _median([s.total_ms for s in ok]),
                "bytes": _median([float(s.bytes) for s in ok]),
                "errors": [{"round": s.round, "status": s.status, "body": s.error}
                           for s in failed],
            })
    return rows


def _fmt(value: float | None, digits: int = 0) -> str:
    """A number for the table; '–' for None."""
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The medians as a markdown table, grouped by request, then the errors if any."""
    lines = ["| request | server | wall ms | ÷ predict | render ms | bytes |",
             "|---|---|---:|---:|---:|---:|"]
    order = list(dict.fromkeys(r["request"] for r in rows))
    for name in order:
        for row in (r for r in rows if r["request"] == name):
            if row["n"] == 0 and row["errors"]:
                wall = f"HTTP {row['errors'][0]['status']}"
            else:
                wall = _fmt(row["wall_ms"])
            ratio = "–" if row["ratio_to_predict"] is None else f"{row['ratio_to_predict']:.1f}"
            lines.append(f"| {name} | {row['server']} | {wall} | {ratio} | "
                         f"{_fmt(row['render_ms'])} | {_fmt(row['bytes'])} |")
    notes: list[str] = []
    for row in rows:
        grouped: dict[tuple[int, str], list[int]] = {}
        for err in row["errors"]:
            grouped.setdefault((err["status"], err["body"] or ""), []).append(err["round"])
        for (status, body), rounds in grouped.items():
            which = ", ".join(map(str, rounds))
            notes.append(f"- {row['server']} / {row['request']} (round{'s' * (len(rounds) > 1)} "
                         f"{which}): HTTP {status}: {body.replace(chr(10), ' ')}")
    if notes:
        lines += ["", "Non-200 answers (timed rounds):", *notes]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """CPU model, core counts and the versions that matter for the numbers."""
    import cv2
    import numpy as np
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu": cpu, "nproc": usable or os.cpu_count(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__}


def header(info: dict[str, Any], command: str, servers: list[Server],
           threads: int, rounds: int, round_seconds: list[float]) -> str:
    """The lines printed above the table: machine, versions, command line, servers."""
    per_round = statistics.median(round_seconds) if round_seconds else 0.0
    lines = [(f"Machine: {info['cpu']}, nproc {info['nproc']}; Python {info['python']}, "
              f"onnxruntime {info['onnxruntime']}, numpy {info['numpy']}, "
              f"opencv {info['opencv']}"),
             f"Command: `{command}`",
             (f"MEDEXPLAIN_THREADS={threads}; {rounds} round(s) after {WARMUP_PASSES} warm-up "
              f"passes; median round {per_round:.1f} s with {len(servers)} server(s)")]
    for server in servers:
        lines.append(f"- {server.label}{' (HTTPS)' if server.tls else ''}: "
                     f"{server.revision or 'no git'}, "
                     f"service from {server.service_file}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", type=parse_server, default=[],
                        metavar="LABEL=CHECKOUT_DIR",
                        help="a checkout to serve and measure (repeatable; default: "
                             "current=this repository)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--requests", choices=list(REQUEST_SETS), default="json",
                        help="json: the JSON answers (default); dicom: DICOM answers in "
                             "each transfer syntax")
    parser.add_argument("--port-base", type=int, default=8600,
                        help="first port; server i listens on port-base + i")
    parser.add_argument("--threads", type=int, default=2,
                        help="MEDEXPLAIN_THREADS of every server (default 2)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S,
                        help="seconds to wait for GET /readyz (default 180)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file for every sample and the medians")
    parser.add_argument("--tls", action="append", default=[], metavar="LABEL",
                        help="serve this server over HTTPS (repeatable)")
    parser.add_argument("--markdown", action="store_true",
                        help="print only the markdown (header and table), no progress")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    labels = [label for label, _ in args.server]
    if len(set(labels)) != len(labels):
        parser.error("server labels must be unique")
    if not args.server:
        args.server = [("current", ROOT)]
    unknown = set(args.tls) - {label for label, _ in args.server}
    if unknown:
        parser.error(f"--tls names no server: {', '.join(sorted(unknown))}")
    return args


def certificates(folder: Path) -> tuple[ssl.SSLContext, tuple[Path, Path]]:
    """A throwaway CA's certificate for 127.0.0.1: (a client context trusting it only,
    (certificate file, key file))."""
    try:
        import trustme
    except ImportError:
        sys.exit("--tls needs trustme (a test dependency: pip install -e '.[test]')")
    ca = trustme.CA()
    issued = ca.issue_cert(HOST)
    cert, key = folder / "server.crt", folder / "server.key"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    return ssl.create_default_context(cadata=ca.cert_pem.bytes().decode()), (cert, key)


def main(argv: list[str] | None = None) -> int:
    """Start the servers, run the rounds, print (and write) the results, stop the servers."""
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv]) if argv is None \
        else shlex.join(["python", "tools/bench_http.py", *argv])
    servers = [Server(label, path, args.port_base + i, revision=git_revision(path))
               for i, (label, path) in enumerate(args.server)]
    requests = REQUEST_SETS[args.requests]
    payloads = make_payloads(requests)
    info = machine()
    progress = not args.markdown
    env = child_env(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_http-") as log_dir:
            if args.tls:
                context, files = certificates(Path(log_dir))
                for server in servers:
                    if server.label in args.tls:
                        server.tls, server.tls_files = context, files
            try:
                for server in servers:
                    start_server(server, env, Path(log_dir))
                for server in servers:
                    seconds = wait_ready(server, args.ready_timeout)
                    server.service_file = imported_from(server)
                    if progress:
                        print(f"{server.label} ready on port {server.port} in {seconds:.1f} s; "
                              f"service from {server.service_file}", file=sys.stderr)
                samples, round_seconds = run_rounds(servers, requests, payloads, args.rounds,
                                                    progress)
            finally:
                for server in servers:
                    stop_server(server)
                    server.log = log_tail(server, LOG_TAIL_CHARS)
    except RuntimeError as exc:
        print(f"bench_http: {exc}", file=sys.stderr)
        return 1
    labels = [s.label for s in servers]
    rows = summarize(samples, labels, [r.name for r in requests])
    if progress:
        for server in servers:
            if any(r["errors"] for r in rows if r["server"] == server.label):
                print(f"--- end of {server.label}'s log (non-200 answers) ---\n"
                      f"{server.log[-3000:]}", file=sys.stderr)
    print(header(info, command, servers, args.threads, args.rounds, round_seconds))
    print()
    print(markdown_table(rows))
    if args.out is not None:
        result = {
            "command": command, "machine": info, "threads": args.threads,
            "rounds": args.rounds, "warmup_passes": WARMUP_PASSES,
            "round_seconds": round_seconds,
            "servers": [{"label": s.label, "checkout": str(s.checkout), "port": s.port,
                         "tls": s.tls is not None,
                         "revision": s.revision, "service_file": s.service_file,
                         "reconnects": s.reconnects, "log_tail": s.log} for s in servers],
            "requests": [asdict(r) for r in requests],
            "medians": rows,
            "samples": [asdict(s) for s in samples],
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if progress:
            print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

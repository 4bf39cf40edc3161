"""What a careless client or an attacker does to a live server, each as a function that
returns what it measured. The regression tests assert on these numbers;
``tools/edge_attacks.py`` prints them for any source tree (before → after)."""

from __future__ import annotations

import gzip
import select
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tests.api.live import Live, closed_by_peer, read_response, request_head

MIB = 2**20


def reset_peak(live: Live) -> None:
    """Reset the server's VmHWM (peak RSS) to its current RSS (Linux clear_refs)."""
    with open(f"/proc/{live.pid}/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Uploads:
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: int = 0  # 503 answers carrying Retry-After
    rss_before_mib: float = 0.0
    peak_mib: float = 0.0
    seconds: float = 0.0

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.rss_before_mib


def _multipart(data: bytes, boundary: str = "edge-test-boundary") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; "
            f"filename=\"x.dcm\"\r\ncontent-type: application/dicom\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def _upload(live: Live, path: str, body: bytes, headers: dict[str, str],
            start: threading.Barrier, out: list[tuple[int, dict[str, str]]]) -> None:
    """Send the headers, then the body in 1 MiB pieces, stopping as soon as the server
    answers (an early 503/413 closes the connection)."""
    try:
        with live.connect(timeout=120) as s:
            start.wait()
            s.sendall(request_head("POST", path, {**headers,
                                                  "content-length": str(len(body))}))
            view = memoryview(body)
            for offset in range(0, len(body), MIB):
                if select.select([s], [], [], 0)[0]:
                    break  # answered before the whole body: stop sending
                try:
                    s.sendall(view[offset:offset + MIB])
                except (BrokenPipeError, ConnectionResetError):
                    break
            status, headers, _ = read_response(s)
            out.append((status, headers))
    except (ConnectionError, OSError) as exc:
        out.append((-1, {"error": type(exc).__name__}))


def concurrent_uploads(live: Live, *, clients: int = 16, size: int = 60 * MIB,
                       multipart: bool = False, gzipped: bool = False,
                       path: str = "/predict") -> Uploads:
    """``clients`` uploads of ``size`` bytes at once to ``path`` (not an image: each
    admitted one is read whole, then refused 400), with the server's peak RSS while they
    run; ``gzipped``: each sent as ``Content-Encoding: gzip`` (60 MB of zeros are 60 kB of
    gzip)."""
    body, content_type = (_multipart(b"\0" * size) if multipart
                          else (b"\0" * size, "application/dicom"))
    headers = {"content-type": content_type}
    if gzipped:
        body, headers["content-encoding"] = gzip.compress(body, compresslevel=1), "gzip"
    result = Uploads(rss_before_mib=live.memory_kib("VmRSS") / 1024)
    reset_peak(live)
    answers: list[tuple[int, dict[str, str]]] = []
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=_upload, args=(live, path, body, headers, barrier,
                                                      answers)) for _ in range(clients)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    result.seconds = time.monotonic() - begin
    result.peak_mib = live.memory_kib("VmHWM") / 1024
    for status, headers in answers:
        result.statuses[status] += 1
        result.retry_after += status == 503 and "retry-after" in headers
    return result


@dataclass
class Stall:
    upload_status: int = 0
    upload_seconds: float = 0.0
    healthz_max_s: float = 0.0
    healthz_count: int = 0


def empty_parts(live: Live, *, size: int = 57 * MIB, wait: float = 30.0) -> Stall:
    """A multipart body of ``size`` bytes of empty parts, while /healthz is polled (each
    poll waits ``wait`` s at most)."""
    boundary = "b"
    part = b"--b\r\ncontent-disposition: form-data; name=\"x\"\r\n\r\n\r\n"
    body = part * (size // len(part)) + b"--b--\r\n"
    result = Stall()
    done = threading.Event()

    def upload() -> None:
        begin = time.monotonic()
        with live.connect(timeout=120) as s:
            s.sendall(request_head("POST", "/predict", {
                "content-type": f"multipart/form-data; boundary={boundary}",
                "content-length": str(len(body))}))
            try:
                s.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                result.upload_status = read_response(s)[0]
            except ConnectionError:
                result.upload_status = -1
        result.upload_seconds = time.monotonic() - begin
        done.set()

    thread = threading.Thread(target=upload)
    thread.start()
    while not done.is_set():
        begin = time.monotonic()
        try:
            live.get("/healthz", timeout=wait)
        except TimeoutError:
            pass  # counted as the whole wait
        result.healthz_max_s = max(result.healthz_max_s, time.monotonic() - begin)
        result.healthz_count += 1
        time.sleep(0.05)
    thread.join()
    return result


def slow_heads(live: Live, *, clients: int = 20, wait: float = 10.0) -> list[float]:
    """``clients`` connections dripping a request head at 1 byte/s: how long each stayed
    open (``wait`` when the server kept it that long)."""
    head = request_head("GET", "/healthz", {"x-pad": "y" * 200})
    lifetimes: list[float] = []

    def drip() -> None:
        begin = time.monotonic()
        with live.connect() as s:
            for byte in head:
                if time.monotonic() - begin > wait:
                    break
                try:
                    s.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([s], [], [], 1.0)[0] and closed_by_peer(s, 1.0):
                    break
        lifetimes.append(min(time.monotonic() - begin, wait))

    threads = [threading.Thread(target=drip) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lifetimes


def silent_connection(live: Live, *, wait: float = 10.0) -> float:
    """A connection that sends nothing: seconds until the server closes it (or ``wait``)."""
    begin = time.monotonic()
    with live.connect() as s:
        closed = closed_by_peer(s, wait)
    return time.monotonic() - begin if closed else wait


def idle_keep_alive(live: Live, *, wait: float = 10.0) -> float:
    """A kept-alive connection left idle after one answer: seconds until it is closed."""
    with live.connect() as s:
        s.sendall(request_head("GET", "/healthz", {}))
        assert read_response(s)[0] == 200
        begin = time.monotonic()
        closed = closed_by_peer(s, wait)
    return time.monotonic() - begin if closed else wait


def slow_body(live: Live, *, wait: float = 10.0) -> tuple[int, float]:
    """Full headers, then a body at 1 byte/s: (status, seconds until the answer)."""
    begin = time.monotonic()
    with live.connect() as s:
        s.sendall(request_head("POST", "/predict", {"content-type": "image/png",
                                                     "content-length": "10000"}))
        while time.monotonic() - begin < wait:
            try:
                s.sendall(b"\0")
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([s], [], [], 1.0)[0]:
                return read_response(s)[0], time.monotonic() - begin
    return 0, wait


def after_too_large(live: Live, *, declared: int = 3 * 10**9, budget: int = 512 * MIB,
                    wait: float = 20.0) -> tuple[int, int, float]:
    """Declare ``declared`` bytes and keep sending after the 413: (status, bytes the server
    took before it closed the connection, seconds). ``budget`` bounds what is sent."""
    begin = time.monotonic()
    sent = 0
    status = 0
    with live.connect() as s:
        s.sendall(request_head("POST", "/predict", {"content-type": "application/dicom",
                                                     "content-length": str(declared)}))
        status = read_response(s)[0]
        chunk = b"\0" * MIB
        s.settimeout(5)
        while sent < budget and time.monotonic() - begin < wait:
            try:
                sent += s.send(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
    return status, sent, time.monotonic() - begin


__all__ = ["MIB", "Stall", "Uploads", "after_too_large", "concurrent_uploads", "empty_parts",
           "idle_keep_alive", "reset_peak", "silent_connection", "slow_body", "slow_heads"]

"""A real ``medexplain serve`` in a subprocess, for what only a real server shows (timeouts,
connections, signals, the process's memory), and raw-socket helpers to talk to it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.api.conftest import ROOT
from tests.orthanc_tools import free_port


@dataclass
class Live:
    """A running server: its process and address."""

    process: subprocess.Popen[bytes]
    port: int
    tls: ssl.SSLContext | None = None  # a client context, for a server with TLS on

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self, timeout: float = 30.0) -> socket.socket:
        """A connection to the server; over TLS when the server has it on."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls is None:
            return s
        return self.tls.wrap_socket(s, server_hostname="127.0.0.1")

    def memory_kib(self, field: str) -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak so far) of the server process, in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        with self.connect(timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            return read_response(s)


@contextmanager
def live_server(root: Path = ROOT, tls: ssl.SSLContext | None = None,
                **env: str) -> Iterator[Live]:
    """``medexplain serve`` of the source tree ``root`` on a free loopback port with
    ``MEDEXPLAIN_<KEY>`` settings; killed (by its pid) when the block ends. ``tls``: the
    client context to reach it with, when the settings turn TLS on."""
    port = free_port()
    environ = {**os.environ, "PYTHONPATH": str(root), "MEDEXPLAIN_THREADS": "1",
               **{f"MEDEXPLAIN_{k.upper()}": v for k, v in env.items()}}
    # Its output goes to a file: a pipe nobody reads would block the server once full.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], cwd=root, env=environ, stdout=log,
            stderr=subprocess.STDOUT)
        live = Live(process, port, tls)
        try:
            _wait_until_up(live, log)
            yield live
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_until_up(live: Live, log: IO[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if live.process.poll() is not None:
            log.seek(0)
            raise RuntimeError("the server exited at start: "
                               + log.read().decode(errors="replace")[-2000:])
        try:
            if live.get("/healthz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {timeout:g} s")
        time.sleep(0.1)


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body) read from ``s``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} bytes of the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``s`` within ``timeout`` s (anything it sends first is
    read and dropped)."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: x"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

"""Orthanc (Debian's ``orthanc`` and its plugins) on loopback, as the tests run it."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "orthanc"
# Debian installs it in sbin, which is not on every user's PATH.
ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
PLUGINS = Path("/usr/share/orthanc/plugins")
START_TIMEOUT_S = 90.0


def require_orthanc() -> str:
    # A real PACS is part of the suite: its absence is a failure, never a silent skip.
    assert ORTHANC is not None, ("Orthanc is not installed: `bash scripts/system-deps.sh` "
                                 "(run by `make test`) installs orthanc and its plugins")
    return ORTHANC


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, data: bytes | None = None, timeout: float = 10.0) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return bytes(response.read())


def get_json(url: str) -> Any:
    return json.loads(request(url))


def study_instances(url: str, study_uid: str) -> list[pydicom.Dataset]:
    """Every instance Orthanc holds in the study with this Study Instance UID."""
    hits = [h for h in json.loads(request(f"{url}/tools/lookup", study_uid.encode()))
            if h["Type"] == "Study"]
    if not hits:
        return []
    instances = get_json(f"{url}/studies/{hits[0]['ID']}/instances")
    return [pydicom.dcmread(io.BytesIO(request(f"{url}/instances/{i['ID']}/file")))
            for i in instances]


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    """Wait up to 10 s for ``process`` (called ``name``) to listen on loopback ``port``."""
    for _ in range(100):
        assert process.poll() is None, f"{name} exited at start"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except ConnectionRefusedError:
            time.sleep(0.1)
    pytest.fail(f"{name} did not start listening on port {port}")


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            request(url, timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    pytest.fail(f"{url} did not come up in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def orthanc(folder: Path, config: Mapping[str, Any],
            env: Mapping[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """Orthanc with ``deploy/orthanc/orthanc.json`` updated by ``config``, on a free loopback
    HTTP port and a temporary storage folder; yields its URL and log file."""
    executable = require_orthanc()
    port = free_port()
    settings = json.loads((DEPLOY / "orthanc.json").read_text())
    settings.update({"HttpPort": port, "StorageDirectory": str(folder / "storage"),
                     "IndexDirectory": str(folder / "storage"), **config})
    assert settings["RemoteAccessAllowed"] is False and settings["AuthenticationEnabled"] is False
    for plugin in settings["Plugins"]:
        assert Path(plugin).exists(), f"{plugin} is missing: `bash scripts/system-deps.sh`"
    (folder / "orthanc.json").write_text(json.dumps(settings, indent=2))
    log = folder / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen([executable, str(folder / "orthanc.json")], cwd=folder,
                                   env=dict(env) if env is not None else None, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/system", process, log)
        yield url, log
    finally:
        stop(process)

"""``medexplain serve`` as a subprocess on a free loopback port, for the tests that speak to
the service with real clients (tritonclient, httpx, a generated client)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.orthanc_tools import ROOT, free_port, stop, wait_until_up

__all__ = ["ROOT", "serve"]


@contextmanager
def serve(log: Path, **env: str) -> Iterator[str]:
    """The service's base URL while it runs; ``env``: extra MEDEXPLAIN_* variables."""
    port = free_port()
    environ = {**os.environ, "MEDEXPLAIN_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port)], cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/readyz", process, log)
        yield url
    finally:
        stop(process)

"""Ray Serve: two replicas on a two-node local cluster answer as the plain server does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.scaleout.ray_cluster import CONCURRENT, ERRORS

ROOT = Path(__file__).resolve().parents[2]
# Two nodes up, two replicas compiling the demo model, 18 requests, everything stopped:
# ~20 s on a quiet 2-core machine; the bound is for a busy one.
TIMEOUT_S = 240


def _in_loopback_namespace(command: list[str]) -> list[str]:
    """``command`` in a network namespace of its own, where only loopback is up.

    Ray binds its control plane to the machine's interface address; in a namespace that
    has only ``lo``, that address is 127.0.0.1. Root gets a plain network namespace
    (``unshare -n``); anyone else one inside a user namespace (``-r``) where they are root.
    """
    for tool in ("unshare", "ip"):
        assert shutil.which(tool), f"{tool} is missing (scripts/system-deps.sh installs it)"
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
    return [*unshare, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """The answer without its stopwatch readings, which differ from run to run."""
    return {k: v for k, v in body.items() if k != "timings_ms"}


def test_two_replicas_on_two_nodes_answer_as_the_plain_server(tmp_path: Path) -> None:
    out = tmp_path / "answers.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.scaleout.ray_cluster", str(out)]
    proc = subprocess.run(_in_loopback_namespace(command), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads(out.read_text(encoding="utf-8"))

    # Two replicas, on two different nodes, and both answered some of the requests.
    assert len(got["nodes"]) == 2
    assert len(set(got["nodes"].values())) == 2
    assert {a["replica"] for a in got["concurrent"]} == set(got["nodes"])

    with TestClient(create_app(Settings(models=ROOT / "models", threads=1))) as plain:
        for call, answer in zip(CONCURRENT + ERRORS, got["concurrent"] + got["errors"],
                                strict=True):
            expected = call.send(plain)
            assert answer["status"] == expected.status_code, (call, answer["body"])
            assert _comparable(answer["body"]) == _comparable(expected.json()), call
            for header in ("content-type", "vary", "retry-after"):
                assert answer["headers"].get(header) == expected.headers.get(header), header
            assert answer["headers"]["x-request-id"]  # Ray's proxy: its only addition
    assert [a["status"] for a in got["concurrent"]] == [200] * len(CONCURRENT)
    assert [a["status"] for a in got["errors"]] == [404, 422]

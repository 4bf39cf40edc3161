"""tools/gpu_check.sh's transport: a wheel cut into parts, carried one part per transfer,
rejoined and checked on the other side (the download and the GPU run need what CI lacks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.sh"


def gpu_check(*args: str, **env: Path | int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}},
                          timeout=60)


@pytest.fixture
def cut(tmp_path: Path) -> tuple[Path, bytes]:
    wheel = tmp_path / "onnxruntime_gpu-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    payload = os.urandom(2500)
    wheel.write_bytes(payload)
    done = gpu_check("split", str(wheel), WHEELS=tmp_path / "here", PART_BYTES=1000)
    assert done.returncode == 0, done.stderr
    assert "3 parts of " + wheel.name in done.stdout
    return tmp_path, payload


def transfer(tmp: Path, folders: list[str], k: int) -> Path:
    """What one transfer brings: the named folders of .whl/ and nothing else of it."""
    there = tmp / f"transfer{k}"
    for folder in folders:
        shutil.copytree(tmp / "here" / folder, there / folder)
    return there


def test_the_parts_carried_one_by_one_rejoin_to_the_wheel(cut: tuple[Path, bytes]) -> None:
    tmp, payload = cut
    parts = tmp / "parts"
    for k, folders in enumerate([["part0"], ["part1"], ["small", "part2"]]):
        done = gpu_check("receive", WHEELS=transfer(tmp, folders, k), PARTS=parts)
        assert done.returncode == 0, done.stderr
    done = gpu_check("assemble", WHEELS=tmp / "transfer2", PARTS=parts)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == payload


def test_a_part_not_received_is_refused(cut: tuple[Path, bytes]) -> None:
    tmp, _ = cut
    parts = tmp / "parts"
    for k, folders in enumerate([["part0"], ["small", "part2"]]):
        gpu_check("receive", WHEELS=transfer(tmp, folders, k), PARTS=parts)
    done = gpu_check("assemble", WHEELS=tmp / "transfer1", PARTS=parts)
    assert done.returncode == 3
    assert "was a part not received?" in done.stderr

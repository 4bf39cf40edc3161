"""Threads from the container's CPU quota when MEDEXPLAIN_THREADS=0 (service.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import cpu_quota, resolve_threads


def _v2(root: Path, groups: dict[str, str]) -> Path:
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for group, cpu_max in groups.items():
        folder = root / group.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cpu.max").write_text(cpu_max + "\n")
    return root


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000", None),  # no limit
    ("200000 100000", 2),  # docker run --cpus 2
    ("150000 100000", 2),  # 1.5 CPUs: two threads, each busy part of the time
    ("50000 100000", 1),  # half a CPU: still one thread
])
def test_cgroup_v2_inside_a_container(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    root = _v2(tmp_path, {"/": cpu_max})
    assert cpu_quota(root, own="0::/\n") == expected
    assert resolve_threads(0, root) == (expected or 0)
    assert resolve_threads(3, root) == 3  # a configured count always wins


def test_cgroup_v2_the_smallest_limit_of_the_group_and_its_ancestors(tmp_path: Path) -> None:
    root = _v2(tmp_path, {"/": "max 100000", "/kubepods": "800000 100000",
                          "/kubepods/pod1/c1": "300000 100000"})
    assert cpu_quota(root, own="0::/kubepods/pod1/c1\n") == 3
    (root / "kubepods" / "pod1" / "c1" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(root, own="0::/kubepods/pod1/c1\n") == 8


@pytest.mark.parametrize(("quota", "period", "expected"), [
    ("-1", "100000", None), ("400000", "100000", 4), ("25000", "100000", 1)])
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, period: str,
                             expected: int | None) -> None:
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (folder / "cpu.cfs_period_us").write_text(period + "\n")
    own = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cpu_quota(tmp_path, own=own) == expected


def test_no_cgroup_file_system_means_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "absent", own="") is None
    assert resolve_threads(0, tmp_path / "absent") == 0
    bad = _v2(tmp_path / "bad", {"/": "garbage"})
    assert cpu_quota(bad, own="0::/\n") is None

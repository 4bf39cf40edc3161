"""Peak resident memory of this process during a block (Linux /proc), for bomb tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


@dataclass
class Peak:
    """How far the process's peak RSS rose above its RSS at the start of the block."""

    growth: int = 0


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def peak_rss() -> Iterator[Peak]:
    """Measure the block's peak RSS growth (filled in when the block ends, raising or not)."""
    # "5" resets the peak (VmHWM) to the current RSS (proc(5), /proc/pid/clear_refs).
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    peak = Peak()
    try:
        yield peak
    finally:
        peak.growth = (_kib("VmHWM") - before) * 1024

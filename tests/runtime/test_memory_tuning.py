"""The allocator tuning: big freed blocks come back without page faults."""

from __future__ import annotations

import resource

import numpy as np

from service.runtime.memory import MMAP_THRESHOLD, keep_freed_memory

SIZE = 20 * 1024 * 1024  # a decoded radiograph's order of size, under MMAP_THRESHOLD


def _faults_touching(size: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(size, dtype=np.uint8)  # touches every page
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_blocks_are_reused_without_page_faults() -> None:
    assert SIZE < MMAP_THRESHOLD
    assert keep_freed_memory()
    _faults_touching(SIZE)
    pages = SIZE // 4096
    assert _faults_touching(SIZE) < pages // 20, "the second block reused the first's pages"

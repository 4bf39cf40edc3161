"""Process-wide allocator tuning for the request path's large, short-lived arrays.

Every request allocates and frees arrays of tens of megabytes: the upload (7 MB for a CR),
its decoded pixels (14 MB as float32), CRM's masked copies (21 MB for the demo model).
glibc serves blocks that large with mmap and unmaps them on free, so the next request's
arrays arrive as fresh pages, each first touch a page fault: measured on RG1_UNCR, a
decode right after an /explain took 14 ms instead of 8.5, and CRM 8.9 ms instead of 5.9.
Keeping such blocks in the heap lets requests reuse the same pages. Blocks above
``MMAP_THRESHOLD`` still come from mmap and go back to the system at once, and free heap
beyond ``TRIM_THRESHOLD`` is returned, so what a process keeps stays bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Final

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the values used here.
_M_TRIM_THRESHOLD: Final[int] = -1
_M_MMAP_THRESHOLD: Final[int] = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD: Final[int] = 32 * 1024 * 1024
TRIM_THRESHOLD: Final[int] = 128 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says; False where it is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("allocator left as it is (no glibc mallopt)")
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("allocator left as it is (mallopt refused)")
    return ok


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc's malloc_trim).

    For the end of a model load: parsing, compiling and opening sessions free hundreds of
    megabytes in blocks below ``MMAP_THRESHOLD`` (protobuf's copies of the weights, the
    serialised graphs), which the heap keeps under ``keep_freed_memory``'s tuning, and
    mostly not at its top, where trimming alone would reach them. Requests' blocks are
    reused from then on as before. False where it is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "release_freed_memory"]

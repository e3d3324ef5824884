"""Return freed tensor memory to the operating system (glibc), so a long CPU run's RSS tracks what it uses.

Why: glibc's malloc serves allocations above its *mmap threshold* with ``mmap`` (given back on
``free``) and smaller ones from heap arenas (kept after ``free``). The threshold starts at 128 KiB
but rises to the size of every large block freed (up to 32 MiB), so after the first training
step almost every activation tensor of a step comes from the arenas. Activations of varying
shapes (niches of different sizes, gene lists of different lengths) then fragment the arenas and
the process keeps the high-water mark of every shape it has seen: ``spatia pretrain`` at the
small preset held ~2 GB between steps of ~1 GB live tensors, and its peak kept rising with steps.

Fixing the threshold (``M_MMAP_THRESHOLD``) turns its dynamic adjustment off: large blocks
always come from ``mmap`` and go back on ``free``; a fixed ``M_TRIM_THRESHOLD`` trims the heap's
top. This is what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set from the
environment; the entry points (``spatia`` CLI, example scripts) call :func:`bound_heap_growth`
so the user need not. Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
# Blocks >= 4 MiB use mmap. At 1 MiB every mid-sized activation was mapped and unmapped each step: the
# demo's generator spent 8x the system time (wall 24.8 vs 16.6 s for 30 steps, sys 13.7 vs 1.7 s) and a
# 12-step small-preset pretraining 22% more wall time (17.9 vs 14.7 s) for a peak 0.27 GB lower (1.38 vs
# 1.65 GB); at 4 MiB both run as fast as glibc's default (14.7 s; generator 15.8 s at 8 MiB) with peak 1.57 GB.
DEFAULT_THRESHOLD_BYTES = 4 << 20
ENV_OPT_OUT = "SPATIA_KEEP_MALLOC"  # set to 1 to leave the allocator as it is

_applied: int | None = None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (it has ``mallopt`` and ``malloc_trim``), else None; looked up
    once per process for both entry points."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc
        return None
    return libc


def _opted_out() -> bool:
    return os.environ.get(ENV_OPT_OUT, "") == "1"


def bound_heap_growth(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold_bytes`` for this process.

    Returns True when applied (glibc on Linux, not opted out with ``SPATIA_KEEP_MALLOC=1``, and
    not already set by ``MALLOC_MMAP_THRESHOLD_`` in the environment). Idempotent.
    """
    global _applied
    if _applied is not None:
        return _applied == threshold_bytes
    libc = _glibc()
    if libc is None or _opted_out():
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user chose; respect it
        return False
    mallopt = libc.mallopt
    ok = mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1 and mallopt(M_TRIM_THRESHOLD, int(threshold_bytes)) == 1
    if ok:
        _applied = int(threshold_bytes)
    else:
        logger.debug("mallopt refused threshold %d", threshold_bytes)
    return ok


def release_free_heap() -> bool:
    """Give freed heap pages back to the operating system now (glibc ``malloc_trim(0)``).

    Why: freed blocks in the middle of an arena stay mapped until the arena is trimmed, so a loop of
    same-sized batches that leaves small long-lived arrays between them (embedding a section, batch by
    batch) kept ~12 KB of freed heap per cell: 0.24 GB at 20,000 cells with :func:`bound_heap_growth`
    applied, all of it returned by one trim. dask.distributed trims worker memory the same way. Returns
    True when trimmed (glibc, not opted out with ``SPATIA_KEEP_MALLOC=1``); a no-op elsewhere.
    """
    libc = _glibc()
    if libc is None or _opted_out():
        return False
    libc.malloc_trim(0)
    return True

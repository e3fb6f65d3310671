"""Process-wide CPU allocator setting for training programs (entry points call it, not the library).

A CPU training step allocates and frees the same few ``[U + I, F]`` buffers (propagation
outputs, their gradients) over and over. glibc's ``malloc`` serves blocks above its mmap
threshold with fresh ``mmap`` pages and gives freed memory back to the kernel past its trim
threshold, so every step pays a page fault per 4 KiB of those buffers: measured on TikTok,
43k faults and about 50 ms per step with the thresholds fixed at their 128 KiB defaults,
against 1.4k faults with :func:`retain_freed_memory`; glibc's adaptive default lies in
between (4k-20k faults per step on baby).

:func:`retain_freed_memory` raises both thresholds so that freed blocks stay in the heap
for reuse. Computation is unchanged; resident memory may stay up to ``trim_threshold``
above what is live. glibc caps the mmap threshold at 32 MiB, so by default
(``heap_only=True``) it also stops serving blocks from ``mmap`` at all (``M_MMAP_MAX = 0``):
larger step buffers (at Elec scale ``[U + I, F]`` tables of 187 MiB) would otherwise be
mapped afresh and faulted in page by page every step (BENCHMARKS.md has the timings). The
price is fragmentation: a freed block in the middle of the heap is kept for reuse rather
than unmapped. The training CLIs call it unless
``CM3_RETAIN_FREED_MEMORY=0``; other platforms and C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

#: Environment variable that turns the setting off (``0``).
RETAIN_ENV = "CM3_RETAIN_FREED_MEMORY"

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
#: glibc's default ``M_MMAP_MAX`` (the number of blocks it may serve from ``mmap`` at once).
_GLIBC_MMAP_MAX = 65536
#: glibc's cap on the mmap threshold for 64-bit processes.
MAX_MMAP_THRESHOLD = 32 * 2**20


def retain_freed_memory(
    mmap_threshold: int = MAX_MMAP_THRESHOLD,
    trim_threshold: int = 2**30,
    top_pad: int = 64 * 2**20,
    heap_only: bool = True,
) -> bool:
    """Ask glibc ``malloc`` to keep freed memory for reuse; ``True`` if it was applied.

    Args:
        mmap_threshold: blocks up to this size come from the heap (glibc caps it at 32 MiB).
        trim_threshold: free memory at the top of the heap kept before returning it.
        top_pad: extra heap requested per growth, so the heap grows in fewer steps.
        heap_only: serve every block from the heap, the larger ones too (``False``: glibc's
            own limit on mapped blocks, so blocks above ``mmap_threshold`` are mapped).

    Returns ``False`` (and changes nothing) off Linux, without glibc, when the variable
    ``CM3_RETAIN_FREED_MEMORY`` is ``0``, or when glibc rejects a value.
    """
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"mmap_threshold must be in (0, {MAX_MMAP_THRESHOLD}], got {mmap_threshold}"
        )
    if trim_threshold < 0 or top_pad < 0:
        raise ValueError("trim_threshold and top_pad must be >= 0")
    if os.environ.get(RETAIN_ENV, "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)),
            (_M_TOP_PAD, min(top_pad, 2**31 - 1)),
            (_M_MMAP_MAX, 0 if heap_only else _GLIBC_MMAP_MAX),
        )
    )
    if ok:
        logger.debug(
            "malloc keeps freed memory (mmap threshold %d, trim threshold %d, heap only %s)",
            mmap_threshold,
            trim_threshold,
            heap_only,
        )
    return ok


__all__ = ["MAX_MMAP_THRESHOLD", "RETAIN_ENV", "retain_freed_memory"]

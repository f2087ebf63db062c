"""Freed step buffers stay in the process's heap instead of going back to the kernel.

A decode step allocates tens of MB that the next step allocates again (at 64 rows the
logits alone are 12.6 MB, and the rows stacked to sample as many). glibc's defaults give
them back to the kernel: a block above the mmap threshold (128 KB at first, raised as such
blocks are freed, to 32 MB at most) is unmapped when freed, and the heap's free top is
trimmed beyond twice that. The next step then faults every page in again: on two cores, 8%
of a compiled step at 64 rows (docs/benchmarks.md). Fixed thresholds keep those buffers:
blocks up to 32 MB (glibc's largest threshold on 64-bit) come from the heap, and up to
1 GiB of free heap is kept, so the footprint is the process's peak, as with a caching
allocator. Other C libraries: unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for the whole process (idempotent); False where the C library
    is not glibc or refused them."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    kept = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not kept:
        logger.warning("glibc refused the heap thresholds: freed step buffers go back to "
                       "the kernel and are faulted in again every step")
    return kept

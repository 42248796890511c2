"""Keeping freed memory for reuse instead of handing it back to the kernel (glibc only; elsewhere a no-op).

glibc serves large allocations with mmap and returns them on free, so a loop that allocates the same large
activations every iteration gets fresh pages each time, which the kernel must fault in and zero. In CNN block
reconstruction (MobileNetV2, batch 32, 2 cores) two thirds of the CPU time went to the kernel; with the mmap and
trim thresholds raised, one iteration over all blocks took 0.99 s instead of 1.44 s (bench/cnn_speed.py). The cost:
memory freed by the run stays with the process until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30     # allocations below 1 GiB come from the heap
TRIM_THRESHOLD = 1 << 31     # and freed heap memory is kept unless 2 GiB sit unused at its top


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if glibc took them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))

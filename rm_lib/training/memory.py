"""Keep the training process's resident memory close to what it uses.

Padding-free batches change shape every step. glibc then serves the large activation buffers from
its heap (its mmap threshold rises after the first big frees), and the heap holes left between
steps are never handed back: resident memory creeps up over an epoch. Pinning the threshold sends
every large buffer to its own mapping, which is returned to the system when freed."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed


def limit_heap_growth() -> bool:
    """Fix glibc's mmap threshold for this process. True when applied (Linux with glibc), else a no-op."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    return applied

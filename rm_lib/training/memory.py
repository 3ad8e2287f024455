"""Keep a CPU training process's resident memory close to what it uses, at little cost in speed.

Padding-free batches change shape every step. glibc serves the activation buffers from its heap,
and the holes they leave between steps are kept: resident memory creeps up over an epoch (0.5 GB
to 3 GB on small batches). Handing the free heap pages back once per optimizer step bounds that.
The earlier remedy, a fixed 128 KiB mmap threshold, sent every buffer to a fresh mapping whose
pages the kernel must fault in and zero on each use: a fifth of the CPU time went to page faults
(BENCHMARKS.md, "with the allocator revisited")."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the heap's free pages to the system (glibc's malloc_trim). True when this libc can;
    elsewhere a no-op that returns False."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

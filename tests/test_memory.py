"""A CPU training step hands its freed heap pages back, so resident memory does not creep over an epoch."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rm_lib.data.tokenstore import write_rows
from rm_lib.training.memory import release_free_memory

from conftest import ROOT

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/statm").exists(),
                                reason="malloc_trim and /proc/self/statm are Linux (glibc) features")


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@glibc_only
def test_freed_heap_holes_go_back_to_the_system() -> None:
    """What a step leaves: many heap blocks freed, a few still held after them (holes glibc keeps)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 * 1024, 3000  # below glibc's mmap threshold: served from the heap
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # resident now
    kept = blocks[15::16]
    for i, block in enumerate(blocks):
        if i % 16 != 15:
            libc.free(block)
    held = resident_bytes()
    try:
        assert release_free_memory() is True
        released = held - resident_bytes()
        # 2,812 freed blocks of 64 KiB (176 MiB); each hole gives back its whole pages
        assert released > 120 * 2**20, f"only {released / 2**20:.0f} MiB released"
    finally:
        for block in kept:
            libc.free(block)


def test_a_libc_without_malloc_trim_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from rm_lib.training import memory

    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_memory() is False


@pytest.mark.integration
def test_the_allocator_benchmark_runs_each_policy_in_its_own_process(tmp_path, minilm_path) -> None:
    rng = random.Random(0)
    rows = [{"input_ids_chosen": [101, *(rng.randrange(1000, 30000) for _ in range(rng.randrange(10, 60))), 102],
             "input_ids_rejected": [101, *(rng.randrange(1000, 30000) for _ in range(rng.randrange(10, 60))), 102]}
            for _ in range(80)]
    (tmp_path / "work" / "hh").mkdir(parents=True)
    write_rows(tmp_path / "work" / "hh" / "bench_train.parquet", rows)
    env = {**os.environ, "RM_BENCH_WORK": str(tmp_path / "work"), "RM_BENCH_LOG": str(tmp_path / "results.jsonl")}
    done = subprocess.run([sys.executable, "benchmarks/bench_allocator.py", "--case", "hh", "--policy", "trim",
                           "--policy", "mmap-128k"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| hh | trim |" in done.stdout and "| hh | mmap-128k |" in done.stdout
    [logged] = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["policy"] for r in logged["results"]] == ["trim", "mmap-128k"]
    for result in logged["results"]:  # 80 pairs in batches of 16: five steps, two of them warm-up
        assert result["steps"] == 3 and result["tokens_per_s"] > 0 and result["peak_rss_mib"] > 0

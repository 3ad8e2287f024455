"""The benchmarks' shared log: every run appended to benchmarks/results.jsonl with its command."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results.jsonl"


def results_path() -> Path:
    """RM_BENCH_LOG where it is set when a run is logged (so a caller may set it after import), else
    benchmarks/results.jsonl."""
    return Path(os.environ.get("RM_BENCH_LOG") or DEFAULT)


def append(script: str, argv: list[str] | None, payload: dict) -> None:
    command = " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    with results_path().open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"command": command, "time": time.strftime("%Y-%m-%d %H:%M"), **payload}) + "\n")

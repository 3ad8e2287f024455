"""The benchmarks' shared log: every run appended to benchmarks/results.jsonl with its command."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(os.environ.get("RM_BENCH_LOG") or Path(__file__).resolve().parent / "results.jsonl")


def append(script: str, argv: list[str] | None, payload: dict) -> None:
    command = " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"command": command, "time": time.strftime("%Y-%m-%d %H:%M"), **payload}) + "\n")

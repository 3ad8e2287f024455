"""A large local source for the data steps' time and memory: the AlpacaEval pairs repeated, each repeat's
prompts made distinct by a "(variant k)" prefix so the seeded split still holds out whole prompts.

    python benchmarks/make_large_source.py --pairs 60000 --out /tmp/large.jsonl.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca-eval-prefs.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with gzip.open(DATA, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    with gzip.open(args.out, "wt", encoding="utf-8") as out:
        for i in range(args.pairs):
            row = dict(rows[i % len(rows)])
            row["prompt"] = f"(variant {i // len(rows)}) {row['prompt']}"
            out.write(json.dumps(row) + "\n")
    print(f"{args.pairs} pairs -> {args.out}")


if __name__ == "__main__":
    main()

"""Quality: what the shipped defaults reach on held-out real pairs, and what length-debiased training
(`train.length_debias`) changes, with the length baselines beside every accuracy.

Each run is the project's own pipeline (download -> tokenize -> filter -> train -> evaluate) in its
own folder under benchmarks/.work/quality, on a file of ../shared/data with the project's seeded
split by prompt; only the train split is cut to --max-train-pairs (seeded), so every run of a
case is scored on the same held-out pairs.

    python benchmarks/bench_quality.py --case alpaca --case hh

prints a table and appends the results (with the command) to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CASES = {"hh": DATA / "hh-rlhf-harmless.jsonl.gz", "alpaca": DATA / "alpaca-eval-prefs.jsonl.gz"}
WORK = ROOT / "benchmarks" / ".work" / "quality"
FIGURES = ("accuracy", "longer_wins_baseline", "shorter_wins_baseline", "prefers_longer",
           "reward_length_correlation", "calibration_ece")


def overrides(args: argparse.Namespace, case: str, debias: bool) -> list[str]:
    """params.yaml's defaults (model, learning rate, batch size, one epoch) unless an option says otherwise."""
    chosen = [f"download.source={CASES[case]}", f"download.max_rows={args.max_rows}",
              f"filter.max_token_length={args.max_length}", f"filter.max_prompt_token_length={args.max_length - 1}",
              f"train.length_debias={str(debias).lower()}", "train.save_steps=100000", "train.wandb_mode=disabled",
              "train.logging_steps=20", "evaluate.num_print_samples=0"]
    if args.learning_rate is not None:
        chosen.append(f"train.learning_rate={args.learning_rate}")
    if args.batch_size is not None:
        chosen.append(f"train.batch_size={args.batch_size}")
    if getattr(args, "num_epochs", None) is not None:
        chosen.append(f"train.num_epochs={args.num_epochs}")
    if debias and args.length_debias_weight is not None:
        chosen.append(f"train.length_debias_weight={args.length_debias_weight}")
    return chosen


def cut_train_split(layout, limit: int | None, seed: int = 0) -> None:
    """A seeded subset of the filtered train pairs (the test pairs stay whole); the manifest is
    rewritten to match, so the model records the data it really saw."""
    from rm_lib.data.tokenstore import read_rows, write_rows
    from rm_lib.files import read_json, tree_sha256, write_json

    rows = read_rows(layout.filtered / "train.parquet")
    if limit and len(rows) > limit:
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        write_rows(layout.filtered / "train.parquet", [rows[i] for i in keep])
        manifest = read_json(layout.filtered / "manifest.json")
        manifest["kept"]["train"] = limit
        manifest["content_hash"] = tree_sha256(layout.filtered, ["train.parquet", "test.parquet"])
        write_json(layout.filtered / "manifest.json", manifest)


def run_case(args: argparse.Namespace, case: str, debias: bool) -> dict:
    from rm_lib import steps
    from rm_lib.layout import Layout
    from rm_lib.settings import load_params

    variant = f"debias{args.length_debias_weight if args.length_debias_weight is not None else ''}" if debias \
        else "plain"
    if args.num_epochs is not None:
        variant += f"-epochs{args.num_epochs:g}"
    layout = Layout(WORK / f"{case}-{variant}-{args.max_train_pairs or 'all'}")
    params = load_params(None, overrides(args, case, debias))
    started = time.perf_counter()
    for name in ("download", "tokenize", "filter"):
        print(steps.run(name, params, layout).summary(), flush=True)
    cut_train_split(layout, args.max_train_pairs)
    for name in ("train", "evaluate"):  # the steps' own modules: the chain check would refuse the cut split
        print(steps.module(name).run(params, layout).summary(), flush=True)
    report = json.loads((layout.evaluation / "report.json").read_text())
    train_pairs = json.loads((layout.filtered / "manifest.json").read_text())["kept"]["train"]
    return {"case": case, "length_debias": debias, "length_debias_weight": params.train.length_debias_weight,
            "num_epochs": params.train.num_epochs,
            "train_pairs": train_pairs, "test_pairs": report["pairs"],
            "wall_s": round(time.perf_counter() - started, 1), **{k: report[k] for k in FIGURES}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), required=True)
    parser.add_argument("--max-rows", type=int, default=4000, help="source rows read (alpaca has 20,000)")
    parser.add_argument("--max-train-pairs", type=int, default=800, help="0: the whole train split")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: params.yaml's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml's")
    parser.add_argument("--num-epochs", type=float, default=None, help="default: params.yaml's")
    parser.add_argument("--length-debias-weight", type=float, default=None, help="default: params.yaml's")
    parser.add_argument("--no-plain", action="store_true", help="only the length-debiased runs")
    parser.add_argument("--no-debias", action="store_true", help="only the plain runs")
    args = parser.parse_args(argv)
    for path in (CASES[c] for c in args.case):
        if not path.exists():
            sys.exit(f"{path} is absent: the real preference data lives in ../shared/data beside the project")
    variants = [d for d in (False, True) if not (d and args.no_debias) and not (not d and args.no_plain)]
    rows = [run_case(args, case, debias) for case in args.case for debias in variants]
    print("\n| case | length_debias | " + " | ".join(FIGURES) + " |")
    print("|---|---|" + "---|" * len(FIGURES))
    for r in rows:
        print(f"| {r['case']} | {r['length_debias']} | "
              + " | ".join("n/a" if r[k] is None else f"{r[k]:.4f}" for k in FIGURES) + " |")
    record.append("bench_quality.py", argv, {"runs": rows})


if __name__ == "__main__":
    main()

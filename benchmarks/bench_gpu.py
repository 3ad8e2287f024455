"""The GPU benchmark, one command: rm_lib's trainer against TRL's RewardTrainer on a Pythia-1B-shaped
decoder (bf16, max length 1024) on both shared data sets, on this machine's GPU.

    pip install torch -e ".[bench]"       # a CUDA build of torch, the project and TRL
    python benchmarks/bench_gpu.py        # writes benchmarks/results/gpu-<device>.json

It runs, each trainer in its own process: the flex_attention gradient check (gpu_check.py); ours
and TRL at its defaults on hh-rlhf and alpaca-eval; TRL with gradient checkpointing off; ours with
per-sequence packing on hh-rlhf (the gain of shared prompts). The JSON holds the device, versions,
commands, every run's figures and the targets of the GPU issue checked against them.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import bench_train
import gpu_check

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def versions() -> dict:
    import importlib.metadata as metadata

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "trl", "accelerate"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def summarize(ours: dict, trl_default: dict, trl_no_gc: dict, shared_vs_per_sequence: tuple[dict, dict] | None) -> dict:
    """Ratios and the targets: >= 3x TRL's real tokens/s (both TRL settings), MFU >= 40%, peak GPU
    memory <= TRL's at defaults, accuracy within one point."""
    cases = {}
    for case, mine in ours.items():
        default, no_gc = trl_default[case], trl_no_gc[case]
        cases[case] = {
            "ours": mine, "trl_default": default, "trl_no_checkpointing": no_gc,
            "tokens_per_s_vs_trl_default": mine["tokens_per_s"] / default["tokens_per_s"],
            "tokens_per_s_vs_trl_no_checkpointing": mine["tokens_per_s"] / no_gc["tokens_per_s"],
            "peak_gpu_vs_trl_default": mine["peak_gpu_mib"] / default["peak_gpu_mib"],
            "accuracy_points_vs_trl_default": 100 * (mine["accuracy"] - default["accuracy"]),
        }
        c = cases[case]
        c["targets"] = {"3x_trl_default": c["tokens_per_s_vs_trl_default"] >= 3,
                        "3x_trl_no_checkpointing": c["tokens_per_s_vs_trl_no_checkpointing"] >= 3,
                        "mfu_40": (mine.get("mfu") or 0) >= 0.40,
                        "memory_at_most_trl": c["peak_gpu_vs_trl_default"] <= 1,
                        "accuracy_within_1_point": round(abs(c["accuracy_points_vs_trl_default"]), 6) <= 1}
    if shared_vs_per_sequence is not None and "hh" in ours:  # the two runs of one invocation, side by side
        shared, per_sequence = shared_vs_per_sequence
        cases["hh"]["shared_prompt_pairs_per_s_gain"] = shared["pairs_per_s"] / per_sequence["pairs_per_s"]
        cases["hh"]["shared_prompt_run"], cases["hh"]["per_sequence_run"] = shared, per_sequence
    return cases


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / ".work" / "pythia-1b-shape")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train-pairs", type=int, default=None)
    parser.add_argument("--max-test-pairs", type=int, default=None)
    parser.add_argument("--skip-check", action="store_true", help="do not run gpu_check.py first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (the CPU benchmark is bench_train.py)")
    device = torch.cuda.get_device_name()
    check = None if args.skip_check else gpu_check.check()
    if check is not None and not all(r["ok"] for r in check.values()):
        sys.exit(f"bench_gpu: the flex_attention path disagrees with padded batches: {json.dumps(check)}")
    if not (args.model / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "pythia_1b_shape.py"), str(args.model)], check=True)
    common = ["--model", str(args.model), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
              *(["--max-train-pairs", str(args.max_train_pairs)] if args.max_train_pairs else []),
              *(["--max-test-pairs", str(args.max_test_pairs)] if args.max_test_pairs else [])]
    commands = {"versus_trl_default": ["--case", "hh", "--case", "alpaca", *common],
                "versus_trl_no_checkpointing": ["--case", "hh", "--case", "alpaca", *common,
                                                "--trl-gradient-checkpointing", "off"],
                "versus_per_sequence": ["--case", "hh", *common, "--versus", "per-sequence"]}
    runs = {name: bench_train.main(argv) for name, argv in commands.items()}

    def pick(run: dict, trainer: str) -> dict:
        return {r["case"]: r for r in run["results"] if r["trainer"] == trainer}

    ours = pick(runs["versus_trl_default"], "ours")
    versus = runs["versus_per_sequence"]
    cases = summarize(ours, pick(runs["versus_trl_default"], "trl"), pick(runs["versus_trl_no_checkpointing"], "trl"),
                      (pick(versus, "ours")["hh"], pick(versus, "ours, per-sequence")["hh"]))
    payload = {"device": device, "versions": versions(), "gpu_check": check,
               "commands": {k: "python benchmarks/bench_train.py " + " ".join(v) for k, v in commands.items()},
               "cases": cases}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}.json"
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for case, c in cases.items():
        print(f"{case}: {c['tokens_per_s_vs_trl_default']:.2f}x TRL (defaults), "
              f"{c['tokens_per_s_vs_trl_no_checkpointing']:.2f}x TRL (no checkpointing), "
              f"MFU {(c['ours'].get('mfu') or 0):.1%}, memory {c['peak_gpu_vs_trl_default']:.2f}x, "
              f"accuracy {c['accuracy_points_vs_trl_default']:+.1f} points; targets {c['targets']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

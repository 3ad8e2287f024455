"""Training throughput: rm_lib's trainer against TRL's RewardTrainer, one after the other, in one run.

Both train the same model on the same token ids (our download -> tokenize -> filter output), with
the same max length, batch size, learning rate and schedule, epochs and seed, each in its own
process so peak memory is its own; both are then scored by the same evaluation code on the same
held-out pairs (ties count as wrong).

    python benchmarks/bench_train.py --case hh --case alpaca --max-train-pairs 1200

prints a table and appends the results (with the command) to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # --data names another folder holding the same files
FILES = {"hh": "hh-rlhf-harmless.jsonl.gz", "alpaca": "alpaca-eval-prefs.jsonl.gz"}
WORK = Path(os.environ.get("RM_BENCH_WORK") or ROOT / "benchmarks" / ".work")  # prepared data, models, results


def settings(args: argparse.Namespace, case: str) -> list[str]:
    """The one set of settings both trainers get."""
    return [f"model.name_or_path={args.model}", f"download.source={Path(args.data) / FILES[case]}",
            "download.seed=42",
            f"filter.max_token_length={args.max_length}", f"filter.max_prompt_token_length={args.max_length - 1}",
            f"train.batch_size={args.batch_size}", f"train.learning_rate={args.learning_rate}",
            f"train.num_epochs={args.epochs}", f"train.seed={args.seed}", "train.lr_scheduler=linear",
            "train.warmup_ratio=0.05", "train.max_grad_norm=1.0", "train.logging_steps=10", "train.save_steps=100000",
            "train.wandb_mode=disabled", f"train.padding_free={str(args.padding_free).lower()}",
            f"train.shared_prompt={str(args.shared_prompt).lower()}"]


# --- data, prepared once per case ---------------------------------------------------------------

def prepare(args: argparse.Namespace, case: str) -> Path:
    """download -> tokenize -> filter with rm_lib, then a seeded subset of train and test pairs."""
    from rm_lib.data.tokenstore import read_rows, write_rows
    from rm_lib.layout import Layout
    from rm_lib.settings import load_params
    from rm_lib.steps import download, tokenize
    from rm_lib.steps import filter as filter_step

    work = WORK / case
    layout = Layout(work)
    params = load_params(None, settings(args, case))
    for step in (download, tokenize, filter_step):
        print(step.run(params, layout).summary(), flush=True)
    rng = random.Random(0)
    for split, limit in (("train", args.max_train_pairs), ("test", args.max_test_pairs)):
        rows = read_rows(layout.filtered / f"{split}.parquet")
        if limit and len(rows) > limit:
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), limit))]
        write_rows(work / f"bench_{split}.parquet", rows)
    return work


# --- one trainer, in a child process ------------------------------------------------------------

# Dense bf16 tensor-core peaks, FLOP/s, by the model in torch's device name; --peak-tflops overrides.
# The first that names a whole word of it counts, so the PCIe and NVL cards (lower clocks and power)
# come before the SXM ones that share their number, and A10G (an A10 cut down) is not an A10.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
              "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "A10": 125e12}


def training_flops_per_token(model_dir: Path, mean_length: float) -> float | None:
    """6 N (forward and backward over the non-embedding weights) + 12 L d T (attention scores and
    their use, T the sequence's own length): the usual count behind model FLOPs utilisation."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    inner = getattr(config, "intermediate_size", None)
    if not (layers and hidden and inner):
        return None
    weights = layers * (4 * hidden * hidden + 2 * hidden * inner)  # attention projections and the MLP
    return 6 * weights + 12 * layers * hidden * mean_length


def computed_tokens(rows: list[dict], args: argparse.Namespace, model_dir: Path) -> int:
    """Tokens a forward runs on: with shared prompts on a decoder, each pair's shared prefix once."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from rm_lib.model.packing import shared_prefix

    total = sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows)
    decoder = AutoConfig.from_pretrained(model_dir).model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if args.trainer == "ours" and args.padding_free and args.shared_prompt and decoder:
        total -= sum(shared_prefix(r["input_ids_chosen"], r["input_ids_rejected"]) for r in rows)
    return total


def peak_of(device_name: str) -> tuple[str, float] | None:
    """The PEAK_FLOPS entry for a device name, e.g. "NVIDIA H100 PCIe": (its key, its FLOP/s); None if unknown."""
    return next(((key, flops) for key, flops in PEAK_FLOPS.items()
                 if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE)), None)


def device_peak_flops(override_tflops: float | None) -> tuple[float | None, str | None]:
    """The peak MFU divides by, and where it came from (--peak-tflops, or the PEAK_FLOPS key)."""
    import torch

    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    found = peak_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    return (found[1], found[0]) if found else (None, None)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_ours(args: argparse.Namespace, case: str, work: Path) -> dict:
    from rm_lib.layout import Layout
    from rm_lib.settings import load_params
    from rm_lib.steps import train

    layout, prepared = Layout(work / "ours"), Layout(work)
    layout.filtered.mkdir(parents=True, exist_ok=True)
    for name in ("pairs", "tokenized"):  # what the train step reads besides the filtered rows
        link = getattr(layout, name)
        if not link.is_symlink():
            link.symlink_to(getattr(prepared, name))
    for split in ("train", "test"):
        link = layout.filtered / f"{split}.parquet"
        link.unlink(missing_ok=True)
        link.symlink_to(work / f"bench_{split}.parquet")
    (layout.filtered / "manifest.json").write_text((prepared.filtered / "manifest.json").read_text())
    for stale in (layout.checkpoints, layout.train_logs):  # a fresh run, never a resumed one
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    # never resumed nor normalised: no last checkpoint (weights, AdamW state, their SHA-256) and no scoring
    # of the training pairs for reward stats: device time outside the measured training that TRL does not spend
    result = train.run(load_params(None, [*settings(args, case), *args.ours_setting]), layout,
                       final_checkpoint=False, reward_stats=False)
    # the device plan's choices and predicted peak GPU memory, beside the peak the run measures
    return {"wall_s": result.wall_s, "model_dir": str(layout.model), "device_plan": result.device_plan,
            **from_log(layout)}


WARM_UP_STEPS = 10  # optimizer steps left out of the steady-state throughput (one logging window)


def from_log(layout) -> dict:
    """The mean padding, and the tokens/s from the first log at or after step WARM_UP_STEPS
    (compilation, allocator warm-up before it) to the last: each later window's tokens/s times its
    length, over their total length."""
    rows = [json.loads(line) for line in (layout.train_logs / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "padding_fraction" in r]
    steady = None
    later = [r for r in windows if r["step"] >= WARM_UP_STEPS]
    if len(later) > 1 and all("elapsed_s" in r for r in later):
        spans = [(b["elapsed_s"] - a["elapsed_s"], b["tokens_per_s"]) for a, b in zip(later, later[1:])]
        seconds = sum(span for span, _ in spans)
        steady = sum(span * rate for span, rate in spans) / seconds if seconds > 0 else None
    return {"padded_fraction": sum(r["padding_fraction"] for r in windows) / max(len(windows), 1),
            "steady_tokens_per_s": steady, "steps": windows[-1]["step"] if windows else 0}


def train_trl(args: argparse.Namespace, case: str, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from rm_lib.data.tokenstore import read_rows
    from rm_lib.model.modeling import load_reward_model, load_tokenizer

    rows = read_rows(work / "bench_train.parquet")
    columns = {"chosen_ids": [r["input_ids_chosen"] for r in rows],
               "rejected_ids": [r["input_ids_rejected"] for r in rows]}
    if any(r.get("margin") is not None for r in rows):  # our trainer uses the margin when the data has one
        columns["margin"] = [float(r.get("margin") or 0.0) for r in rows]
    tokenizer = load_tokenizer(args.model)
    torch.manual_seed(args.seed)
    model = load_reward_model(args.model, pad_token_id=tokenizer.pad_token_id)
    batch_tokens: list[int] = []  # real tokens of each batch, in the order the steps take them
    batch_widths: list[int] = []  # tokens each batch computes, padding included
    step_ends: dict[int, float] = {}

    class StepClock(TrainerCallback):  # when step ten and the last end: the steady-state window, as ours has it
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (WARM_UP_STEPS, state.max_steps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # the step's kernels done, as ours reads its log values
                step_ends[state.global_step] = time.perf_counter()

    class CountingCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch_tokens.append(int(batch["attention_mask"].sum()))
            batch_widths.append(batch["attention_mask"].numel())
            return batch

    config = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
                          learning_rate=args.learning_rate, num_train_epochs=args.epochs, seed=args.seed,
                          lr_scheduler_type="linear", warmup_steps=0.05, max_grad_norm=1.0, weight_decay=0.0,
                          max_length=args.max_length, logging_steps=10, save_strategy="no", report_to="none",
                          use_cpu=not torch.cuda.is_available(),  # bf16 where ours uses it too (mixed_precision auto)
                          bf16=args.trl_bf16 or (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                          dataloader_num_workers=0,
                          disable_dropout=True,
                          **({} if args.trl_gradient_checkpointing == "default"
                             else {"gradient_checkpointing": args.trl_gradient_checkpointing == "on"}))
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_dict(columns),
                            processing_class=tokenizer,
                            data_collator=CountingCollator(pad_token_id=tokenizer.pad_token_id),
                            callbacks=[StepClock()])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    # Steps after the first ten, from the end of step ten to the end of the last: the loader may
    # collate a batch ahead, so the tokens are those of the batches past the first ten, counted in our
    # count of the pairs' tokens (TRL may add end tokens).
    steady = None
    last = max(step_ends, default=0)
    if last > WARM_UP_STEPS and WARM_UP_STEPS in step_ends and sum(batch_tokens):
        ours_count = sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows) * args.epochs
        share = sum(batch_tokens[WARM_UP_STEPS:]) / sum(batch_tokens)
        steady = share * ours_count / (step_ends[last] - step_ends[WARM_UP_STEPS])
    out = work / "trl" / "model"
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"wall_s": wall, "model_dir": str(out), "padded_fraction": 1 - sum(batch_tokens) / max(sum(batch_widths), 1),
            "steady_tokens_per_s": steady, "steps": trainer.state.global_step}


def child(args: argparse.Namespace) -> None:
    import torch

    from rm_lib.data.tokenstore import read_rows
    from rm_lib.steps.evaluate import evaluate_folder

    work = WORK / args.case
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = (train_ours if args.trainer == "ours" else train_trl)(args, args.case, work)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    peak_train = peak_rss_mib()  # training's own peak; the evaluation below is the same code for both
    train_rows = read_rows(work / "bench_train.parquet")
    test_rows = read_rows(work / "bench_test.parquet")
    metrics, r_chosen, r_rejected = evaluate_folder(Path(result["model_dir"]), test_rows, batch_size=32, buckets=1)
    real = sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in train_rows) * args.epochs
    record = {"trainer": args.trainer, "case": args.case, "pairs": len(train_rows) * args.epochs,
              "real_tokens": real, "wall_s": result["wall_s"], "tokens_per_s": real / result["wall_s"],
              "pairs_per_s": len(train_rows) * args.epochs / result["wall_s"],
              "steady_tokens_per_s": result["steady_tokens_per_s"], "steps": result["steps"],
              "padded_fraction": result["padded_fraction"], "peak_rss_mib": peak_train,
              "peak_rss_with_evaluation_mib": peak_rss_mib(),
              "peak_gpu_mib": peak_gpu, "accuracy": metrics["accuracy"], "test_pairs": len(test_rows),
              # held-out pair by pair, 1 where the chosen answer scored higher: the accuracies of two runs
              # are compared on the same pairs (`accuracy_difference`)
              "wins": "".join("1" if c > r else "0" for c, r in zip(r_chosen, r_rejected)),
              "longer_wins": metrics["longer_wins_baseline"], "shorter_wins": metrics["shorter_wins_baseline"],
              "device_plan": result.get("device_plan")}
    lengths = [len(r[k]) for r in train_rows for k in ("input_ids_chosen", "input_ids_rejected")]
    per_token = training_flops_per_token(Path(result["model_dir"]), sum(lengths) / len(lengths))
    peak, peak_from = device_peak_flops(args.peak_tflops)
    record["peak_tflops"], record["peak_from"] = (peak / 1e12 if peak else None), peak_from
    # MFU counts the tokens computed: a shared prompt once
    computed = computed_tokens(train_rows, args, Path(result["model_dir"])) * args.epochs
    record["computed_tokens_per_s"] = computed / result["wall_s"]
    record["mfu"] = per_token * record["computed_tokens_per_s"] / peak if per_token and peak else None
    steady = record["steady_tokens_per_s"]
    record["steady_mfu"] = (per_token * steady * computed / real / peak
                            if per_token and peak and steady and real else None)
    record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None  # beside the peak used
    Path(args.result).write_text(json.dumps(record))


# --- the parent: both trainers, a table ---------------------------------------------------------

def run_child(args: argparse.Namespace, case: str, trainer: str, timeout: float | None = None) -> dict:
    """One trainer in its own process; subprocess.TimeoutExpired (the process killed) past `timeout` s."""
    out = WORK / case / f"result-{trainer}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", "--trainer", trainer, "--case", case, "--result", str(out),
               *passthrough(args)]
    subprocess.run(command, check=True, timeout=timeout,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                        "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


def progress(case: str, trainer: str, since: float) -> dict:
    """How far our trainer's run of `case`, begun at `since` (time.time()), got, from its training log:
    the last logged step and its elapsed seconds (nothing for TRL, whose log stays in its process). A
    log older than the run is an earlier run's, so it counts as nothing logged."""
    from rm_lib.layout import Layout

    log = Layout(WORK / case / "ours").live_log  # the run's log as it goes
    if trainer != "ours":
        return {}
    if not log.exists() or log.stat().st_mtime < since:
        return {"last_logged_step": None}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    logged = [r for r in rows if "elapsed_s" in r]
    return {"last_logged_step": logged[-1]["step"], "elapsed_s_at_it": logged[-1]["elapsed_s"]} if logged else \
        {"last_logged_step": None}


def passthrough(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--data", str(args.data), "--max-length", str(args.max_length),
            "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--epochs", str(args.epochs), "--seed", str(args.seed),
            "--padding-free" if args.padding_free else "--no-padding-free",
            "--shared-prompt" if args.shared_prompt else "--no-shared-prompt",
            "--trl-gradient-checkpointing", args.trl_gradient_checkpointing,
            *(["--trl-bf16"] if args.trl_bf16 else []),
            *(f"--ours-setting={setting}" for setting in args.ours_setting),
            *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])]


def table(rows: list[dict]) -> str:
    gpu = any(r.get("peak_gpu_mib") for r in rows)
    head = ("case", "trainer", "pairs", "real tok/s", "past step 10", "pairs/s", "padded", "peak RSS MiB",
            "with evaluation", "wall s",
            "accuracy",
            *(("peak GPU MiB", "MFU") if gpu else ()))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        steady = r.get("steady_tokens_per_s")
        cells = [r["case"], r["trainer"], r["pairs"], f"{r['tokens_per_s']:.0f}",
                 f"{steady:.0f}" if steady else "n/a", f"{r['pairs_per_s']:.2f}",
                 f"{r['padded_fraction']:.1%}", f"{r['peak_rss_mib']:.0f}",
                 f"{r['peak_rss_with_evaluation_mib']:.0f}" if r.get("peak_rss_with_evaluation_mib") else "n/a",
                 f"{r['wall_s']:.0f}",
                 f"{r['accuracy']:.4f}"]
        if gpu:
            cells += [f"{r['peak_gpu_mib']:.0f}", f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def accuracy_difference(mine: dict, other: dict) -> tuple[float, float | None]:
    """Points of held-out accuracy `mine` has over `other`, and the standard error of that difference
    over their test pairs, paired (both runs scored the same pairs): None without both runs' wins.
    On 390 pairs one model's accuracy alone has a standard error of 2.5 points; the paired one is
    smaller where the two models agree on most pairs, and says whether a point of difference is seen."""
    points = 100 * (mine["accuracy"] - other["accuracy"])
    a, b = mine.get("wins"), other.get("wins")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return points, None
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return points, 100 * math.sqrt(variance / len(diffs))


def ratios(ours: dict, trl: dict) -> dict:
    points, standard_error = accuracy_difference(ours, trl)
    return {"case": ours["case"], "tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
            "peak_rss": ours["peak_rss_mib"] / trl["peak_rss_mib"],
            "accuracy_points": points, "accuracy_points_standard_error": standard_error}


def shown_difference(points: float, standard_error: float | None) -> str:
    return f"{points:+.1f} points" + (f" (paired standard error {standard_error:.1f})"
                                      if standard_error is not None else "")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(FILES), help="default: every case")
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, default=DATA, help="the folder holding the cases' files")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-train-pairs", type=int, default=None, help="seeded subset of the filtered train split")
    parser.add_argument("--max-test-pairs", type=int, default=None)
    parser.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--shared-prompt", action=argparse.BooleanOptionalAction, default=True,
                        help="train.shared_prompt (causal decoders): each pair's prompt computed once")
    parser.add_argument("--versus", choices=("trl", "per-sequence"), default="trl",
                        help="the second run: TRL's RewardTrainer, or ours packing every sequence apart "
                             "(train.shared_prompt=false), for the gain of shared prompts")
    parser.add_argument("--ours-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for our trainer alone, e.g. train.gradient_checkpointing=true")
    parser.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default",
                        help="TRL's gradient_checkpointing: its RewardConfig default, or set")
    parser.add_argument("--trl-bf16", action="store_true",
                        help="TRL in bf16 on a CPU too (as ours with --ours-setting=train.mixed_precision=bf16); "
                             "on a GPU both train in bf16 anyway")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (default: known GPUs by name)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trainer", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_data(args: argparse.Namespace, cases: list[str]) -> None:
    missing = [str(args.data / FILES[c]) for c in cases if not (args.data / FILES[c]).exists()]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} absent: the real preference data lives in ../shared/data "
                 "(or the folder --data names)")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.child:
        args.case = args.case[0]
        child(args)
        return None
    cases = args.case or sorted(FILES)
    check_data(args, cases)
    results, summary = [], []
    for case in cases:
        prepare(args, case)
        ours = run_child(args, case, "ours")
        if args.versus == "trl":
            other = run_child(args, case, "trl")
        else:
            other = run_child(argparse.Namespace(**{**vars(args), "shared_prompt": False}), case, "ours")
            other["trainer"] = "ours, per-sequence"
        results += [ours, other]
        summary.append(ratios(ours, other))
    print("\n" + table(results) + "\n")
    for s in summary:
        print(f"{s['case']}: ours/{args.versus} real tokens/s {s['tokens_per_s']:.2f}x, "
              f"peak RSS {s['peak_rss']:.2f}x, accuracy "
              f"{shown_difference(s['accuracy_points'], s['accuracy_points_standard_error'])}")
    record.append("bench_train.py", argv, {"results": results, "ratios": summary})
    return {"results": results, "ratios": summary}


if __name__ == "__main__":
    main()

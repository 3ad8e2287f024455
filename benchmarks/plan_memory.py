"""What a GPU run of the benchmark asks of the device, worked out on any machine: per data set and
batching, the optimizer steps, the tokens each forward computes (rows padded as the trainer pads
them, shared prompts once) and the peak GPU memory that the trainer's device plan predicts for the
largest forward, with activation checkpointing off and at its most (every layer but the last), and
what the plan itself decides on a GPU with --free-gib free: how many layers it checkpoints. The
model is built from its configuration on the meta device: no weights are read or written.

    python benchmarks/plan_memory.py                      # Pythia-1B shape, max length 1024, both data sets
    python benchmarks/plan_memory.py --batch-tokens 16384 --model benchmarks/.work/small-decoder

The peak is the device plan's own estimate (rm_lib/training/device_plan.py): fp32 weights,
gradients and AdamW moments, plus bf16 activations per token of the largest forward. On an H200
it came within 1% of the measured peak (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import bench_train
import record

HERE = Path(__file__).resolve().parent


def model_shape(model_dir: Path):
    """The device plan's view of the model, from its configuration alone."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rm_lib.training.device_plan import model_shape as shape_of

    config = AutoConfig.from_pretrained(model_dir)
    config.num_labels = 1
    with torch.device("meta"):
        return shape_of(AutoModelForSequenceClassification.from_config(config))


def forward_widths(rows: list[dict], *, batch_size: int, batch_tokens: int | None, seed: int,
                   tokens_per_forward: int | None, pad_token_id: int, shared_prompt: bool) -> list[list[int]]:
    """For each optimizer step of one epoch, the width of each of its forwards: the trainer's batches
    (length-grouped, by pairs or by tokens), cut by the token budget per forward, packed in one row."""
    from rm_lib.model.batching import epoch_batches, token_chunks
    from rm_lib.model.packing import pack_pairs, pack_pairs_shared

    packer = pack_pairs_shared if shared_prompt else pack_pairs
    steps = []
    for batch in epoch_batches(rows, batch_size, seed=seed, epoch=0, group_by_length=True, batch_tokens=batch_tokens):
        chunks = token_chunks([rows[i] for i in batch], tokens_per_forward)
        steps.append([packer(chunk, pad_token_id, one_row=True).input_ids.shape[1] for chunk in chunks])
    return steps


def plan_case(rows: list[dict], shape, free_gib: float, **batching) -> dict:
    from rm_lib.model.packing import largest_batch_tokens
    from rm_lib.training.device_plan import activation_bytes_per_token, plan, state_bytes

    steps = forward_widths(rows, **batching)
    widths = [w for step in steps for w in step]
    widest = max(widths)
    mib = 2**20
    # what the trainer's device plan decides on a GPU with `free_gib` free, from the data's largest batch
    largest = largest_batch_tokens(rows, pairs=batching["batch_size"], batch_tokens=batching["batch_tokens"],
                                   shared_prompt=batching["shared_prompt"])
    chosen = plan(device_type="cuda", packed=True, supports_flex=True, shape=shape, free_bytes=int(free_gib * 2**30),
                  tokens_per_forward=batching["tokens_per_forward"], largest_forward=largest)
    checkpointed = 0 if not chosen.gradient_checkpointing else chosen.checkpointed_layers or shape.layers
    return {"steps": len(steps), "forwards": len(widths), "mean_tokens_per_forward": statistics.fmean(widths),
            "max_tokens_per_forward": widest, "state_mib": state_bytes(shape) / mib,
            "predicted_peak_mib": (state_bytes(shape) + widest * activation_bytes_per_token(shape, 0)) / mib,
            # the most the plan checkpoints: every layer but the last (checkpointing that one saves nothing)
            "predicted_peak_checkpointing_mib":
                (state_bytes(shape) + widest * activation_bytes_per_token(shape, shape.layers - 1)) / mib,
            "planned_for_tokens": largest, "free_gib": free_gib, "checkpointed_layers": checkpointed,
            "layers": shape.layers,
            "planned_peak_mib": (state_bytes(shape) + widest * activation_bytes_per_token(shape, checkpointed)) / mib}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="a folder with config.json and the tokenizer (default: the Pythia-1B shape's, "
                             "written to benchmarks/.work without weights)")
    parser.add_argument("--tokenizer", default="default", help="for the default model: a folder or a Hub name")
    parser.add_argument("--data", type=Path, default=bench_train.DATA)
    parser.add_argument("--case", action="append", choices=sorted(bench_train.FILES), help="default: both")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, action="append", default=[],
                        help="also plan batches of this many tokens (train.batch_tokens); repeatable")
    parser.add_argument("--tokens-per-forward", type=int, default=65_536, help="the GPU default")
    parser.add_argument("--max-train-pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-shared-prompt", dest="shared_prompt", action="store_false")
    parser.add_argument("--free-gib", type=float, default=80.0,
                        help="GPU memory free for the device plan's choice of checkpointed layers (80: an H100)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    import pythia_1b_shape

    from rm_lib.data.tokenstore import read_rows
    from rm_lib.model.modeling import load_tokenizer

    args = parse(argv)
    if args.model is None:
        args.model = bench_train.WORK / "pythia-1b-shape-config"
        if not pythia_1b_shape.is_built(args.model):
            pythia_1b_shape.build(args.model, args.tokenizer, weights=False)
    cases = args.case or sorted(bench_train.FILES)
    bench_train.check_data(args, cases)
    shape = model_shape(args.model)
    pad = load_tokenizer(str(args.model)).pad_token_id
    results = []
    for case in cases:
        prepared = bench_train.parse(["--model", str(args.model), "--data", str(args.data), "--max-length",
                                      str(args.max_length), "--max-train-pairs", str(args.max_train_pairs),
                                      "--max-test-pairs", "1", "--seed", str(args.seed), "--case", case])
        rows = read_rows(bench_train.prepare(prepared, case) / "bench_train.parquet")
        for batch_tokens in [None, *args.batch_tokens]:
            plan = plan_case(rows, shape, args.free_gib, batch_size=args.batch_size, batch_tokens=batch_tokens,
                             seed=args.seed,
                             tokens_per_forward=args.tokens_per_forward, pad_token_id=pad,
                             shared_prompt=args.shared_prompt)
            batching = f"{batch_tokens} tokens" if batch_tokens else f"{args.batch_size} pairs"
            results.append({"case": case, "pairs": len(rows), "batching": batching, **plan})
    print(f"\nmodel {args.model} ({shape.parameters / 1e9:.2f}B parameters), max length {args.max_length}, "
          f"{args.tokens_per_forward} tokens per forward at most")
    print("| case | batches of | steps | mean tokens per forward | largest forward | predicted peak MiB | "
          f"with checkpointing | planned on {args.free_gib:g} GiB: checkpointed layers, peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['batching']} | {r['steps']} | {r['mean_tokens_per_forward']:,.0f} | "
              f"{r['max_tokens_per_forward']:,} | {r['predicted_peak_mib']:,.0f} | "
              f"{r['predicted_peak_checkpointing_mib']:,.0f} | {r['checkpointed_layers']} of {r['layers']}, "
              f"{r['planned_peak_mib']:,.0f} |")
    record.append("plan_memory.py", argv, {"results": results})
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()

"""What the host allocator costs a CPU training step: the same packed MiniLM steps under three
policies, each in a fresh process, with tokens/s, peak RSS, minor page faults and kernel time.

    python benchmarks/bench_allocator.py --case hh --case alpaca

- `trim` (the trainer's policy): glibc's own thresholds, free heap pages handed back after each step
  (`--trim-every N`: every N steps);
- `mmap-128k` (the earlier policy): a fixed 128 KiB mmap threshold, every buffer a fresh mapping;
- `none`: glibc's own thresholds and nothing handed back.

GLIBC_TUNABLES in the environment reaches every policy's process. The pairs are those
`bench_train.py` prepares (run it first, or this prepares them the same way).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time

import bench_train
import record

POLICIES = ("trim", "mmap-128k", "none")
WARM_UP = 2  # steps before the clock starts


def apply(policy: str) -> None:
    libc = ctypes.CDLL("libc.so.6")
    if policy == "mmap-128k":
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD


def child(case: str, policy: str, batch_size: int, tokens_per_forward: int, trim_every: int) -> dict:
    import torch

    from rm_lib.data.tokenstore import read_rows
    from rm_lib.model.batching import epoch_batches, token_chunks
    from rm_lib.model.loss import bradley_terry_loss
    from rm_lib.model.modeling import load_reward_model, load_tokenizer
    from rm_lib.model.packing import pack_pairs, packed_rewards
    from rm_lib.training.memory import release_free_memory
    from rm_lib.training.model_modes import dropout_disabled

    apply(policy)
    torch.manual_seed(0)
    tokenizer = load_tokenizer("default")
    model = load_reward_model("default", pad_token_id=tokenizer.pad_token_id)
    dropout_disabled(model).__enter__()  # for the rest of this child process, as training has it
    model.train()
    rows = read_rows(bench_train.WORK / case / "bench_train.parquet")
    batches = epoch_batches(rows, batch_size, seed=42, epoch=0, group_by_length=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)

    steps = 0

    def step(batch: list[int]) -> int:
        nonlocal steps
        mine = [rows[i] for i in batch]
        for chunk in token_chunks(mine, tokens_per_forward):
            packed = pack_pairs(chunk, tokenizer.pad_token_id)
            scores = packed_rewards(model, packed)
            loss = bradley_terry_loss(scores[:packed.n_pairs], scores[packed.n_pairs:])
            (loss * len(chunk) / len(mine)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if policy == "trim" and steps % trim_every == 0:
            release_free_memory()
        return sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in mine)

    for batch in batches[:WARM_UP]:
        step(batch)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    tokens = sum(step(batch) for batch in batches[WARM_UP:])
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"case": case, "policy": policy, "trim_every": trim_every if policy == "trim" else None,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "steps": len(batches) - WARM_UP,
            "tokens_per_s": tokens / wall,
            "peak_rss_mib": after.ru_maxrss / 1024, "minor_faults": after.ru_minflt - before.ru_minflt,
            "kernel_s": after.ru_stime - before.ru_stime, "user_s": after.ru_utime - before.ru_utime}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(bench_train.FILES))
    parser.add_argument("--policy", action="append", choices=POLICIES)
    parser.add_argument("--max-train-pairs", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens-per-forward", type=int, default=8192)
    parser.add_argument("--trim-every", type=int, default=1, help="trim: every this many steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases, policies = args.case or sorted(bench_train.FILES), args.policy or list(POLICIES)
    if args.child:
        print(json.dumps(child(cases[0], policies[0], args.batch_size, args.tokens_per_forward, args.trim_every)))
        return []
    results = []
    for case in cases:
        if not (bench_train.WORK / case / "bench_train.parquet").exists():
            bench_train.check_data(bench_train.parse([]), [case])
            bench_train.prepare(bench_train.parse(["--max-train-pairs", str(args.max_train_pairs),
                                                   "--max-test-pairs", "400"]), case)
        for policy in policies:
            out = subprocess.run([sys.executable, __file__, "--child", "--case", case, "--policy", policy,
                                  "--batch-size", str(args.batch_size),
                                  "--tokens-per-forward", str(args.tokens_per_forward),
                                  "--trim-every", str(args.trim_every)],
                                 check=True, capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    print("\n| case | policy | real tok/s | peak RSS MiB | minor faults | kernel s | user s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['policy']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['minor_faults'] / 1e6:.1f}M | {r['kernel_s']:.1f} | {r['user_s']:.1f} |")
    record.append("bench_allocator.py", argv, {"results": results})
    return results


if __name__ == "__main__":
    main()

"""Evaluation's scoring: each pair's two sequences scored apart, shortest first (score_pairs), against
each pair's chosen and rejected padded together in one batch (how evaluate batched before), on the same
pairs and model, one after the other in one run.

    python benchmarks/bench_evaluate.py            # 800 alpaca-eval pairs, all-MiniLM-L6-v2, 512 tokens

The model is the default base with a new score head (the rewards are not the point; the same weights
score both ways, and the rewards must agree).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca-eval-prefs.jsonl.gz"


def rows_of(path: Path, pairs: int, max_length: int) -> tuple[list[dict], int]:
    """The first `pairs` pairs, tokenized as tokenize does and held to `max_length` as filter does."""
    from rm_lib.data import formats, sources, templates
    from rm_lib.data.length_filter import apply
    from rm_lib.data.tokenization import tokenize_pairs
    from rm_lib.model.modeling import load_tokenizer
    from rm_lib.model.special import special_tokens

    tokenizer = load_tokenizer("default")
    normaliser = formats.Normaliser(str(path))
    found = [r for outcome, r in normaliser(sources.read_file(path)) if outcome == "pair"][:pairs]
    rows = tokenize_pairs(found, tokenizer, templates.resolve("auto", tokenizer))
    special = special_tokens(tokenizer)
    kept = apply(rows, max_len=max_length, max_prompt=max_length // 2, policy="truncate",
                 keep_front=len(special.prefix), template_start=special.template_start).kept
    return kept, tokenizer.pad_token_id


def together(model, rows: list[dict], pad: int, batch: int) -> tuple[list[float], list[float], int]:
    """The earlier way: pairs sorted by their longer side, both sides of a pair in one padded batch."""
    import torch

    from rm_lib.model.batching import collate_pairs, pair_length
    from rm_lib.model.modeling import rewards

    order = sorted(range(len(rows)), key=lambda i: pair_length(rows[i]))
    r_c, r_r, padded = [0.0] * len(rows), [0.0] * len(rows), 0
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            collated = collate_pairs([rows[i] for i in idx], pad, use_margin=False)
            out = rewards(model, collated.input_ids, collated.attention_mask).tolist()
            padded += collated.padded_tokens
            for k, i in enumerate(idx):
                r_c[i], r_r[i] = out[k], out[k + len(idx)]
    return r_c, r_r, padded


def apart_padding(rows: list[dict], batch: int) -> int:
    lengths = sorted(len(r[f"input_ids_{side}"]) for r in rows for side in ("chosen", "rejected"))
    chunks = (lengths[i:i + 2 * batch] for i in range(0, len(lengths), 2 * batch))
    return sum(max(chunk) * len(chunk) for chunk in chunks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--pairs", type=int, default=800)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.data.exists():
        sys.exit(f"bench: {args.data} absent: the real preference data lives in ../shared/data")
    import torch

    from rm_lib.model.inference import score_pairs
    from rm_lib.model.modeling import load_reward_model

    rows, pad = rows_of(args.data, args.pairs, args.max_length)
    torch.manual_seed(0)
    model = load_reward_model("default", pad_token_id=pad).eval()
    tokens = sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows)
    score_pairs(model, rows[:args.batch_size], pad_token_id=pad, batch_size=args.batch_size)  # warm-up, untimed
    results, scored = {}, {}
    for _ in range(args.rounds):  # alternated, the fastest of each kept: a busy machine slows one run, not a way
        for name in ("together", "apart"):
            started = time.perf_counter()
            if name == "apart":
                r_c, r_r = score_pairs(model, rows, pad_token_id=pad, batch_size=args.batch_size)
                padded = apart_padding(rows, args.batch_size)
            else:
                r_c, r_r, padded = together(model, rows, pad, args.batch_size)
            wall = time.perf_counter() - started
            scored[name] = r_c + r_r
            if name not in results or wall < results[name]["wall_s"]:
                results[name] = {"wall_s": wall, "pairs": len(rows), "tokens": tokens, "padded_tokens": padded,
                                 "pairs_per_s": len(rows) / wall}
            print(f"{name}: {len(rows)} pairs, {tokens} tokens ({padded} with padding) in {wall:.1f}s = "
                  f"{len(rows) / wall:.1f} pairs/s", flush=True)
    worst = max(abs(a - b) for a, b in zip(scored["apart"], scored["together"]))
    ratio = results["apart"]["pairs_per_s"] / results["together"]["pairs_per_s"]
    print(f"apart / together, pairs/s: {ratio:.2f}x; padded tokens {results['apart']['padded_tokens']} vs "
          f"{results['together']['padded_tokens']}; largest reward difference {worst:.2g}")
    record.append("bench_evaluate.py", argv, {"evaluate": results, "ratio": ratio, "max_reward_difference": worst})


if __name__ == "__main__":
    main()

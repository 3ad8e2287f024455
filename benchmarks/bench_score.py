"""Scoring throughput: RewardScorer's batches of like lengths against batches in input order (how it
batched before), on the same texts and model, one after the other in one run.

    python benchmarks/bench_score.py            # both sides of the hh-rlhf pairs, all-MiniLM-L6-v2

The model is the default base with a new score head, saved as a release is (the rewards are not the
point here; the same weights score both ways, and the rewards must agree).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless.jsonl.gz"
WORK = ROOT / "benchmarks" / ".work" / "score-model"


def texts(path: Path) -> list[list[dict]]:
    from rm_lib.data import formats, sources

    normaliser = formats.Normaliser(str(path))
    pairs = [r for outcome, r in normaliser(sources.read_file(path)) if outcome == "pair"]
    return [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]


def padded_tokens(lengths: list[int], batch: int) -> int:
    return sum(max(chunk) * len(chunk) for chunk in (lengths[i:i + batch] for i in range(0, len(lengths), batch)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if not args.data.exists():
        sys.exit(f"bench: {args.data} absent: the real preference data lives in ../shared/data")
    import torch

    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import load_reward_model, load_tokenizer, save_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer("default")
    save_model(load_reward_model("default", pad_token_id=tokenizer.pad_token_id), tokenizer, WORK)
    scorer = RewardScorer(WORK, batch_size=args.batch_size, device="cpu")
    encoded = [scorer.fit(scorer.encode(t), "text")[0] for t in texts(args.data)]
    lengths = [len(ids) for ids in encoded]
    b = args.batch_size
    results = {}
    for name in ("by_length", "input_order"):
        started = time.perf_counter()
        if name == "by_length":
            rewards = scorer.score_ids(encoded).rewards
            padded = padded_tokens(sorted(lengths), b)
        else:  # each batch the next texts as given
            rewards = [r for i in range(0, len(encoded), b) for r in scorer.score_ids(encoded[i:i + b]).rewards]
            padded = padded_tokens(lengths, b)
        wall = time.perf_counter() - started
        results[name] = {"wall_s": wall, "texts": len(encoded), "tokens": sum(lengths), "padded_tokens": padded,
                         "tokens_per_s": sum(lengths) / wall, "rewards": rewards}
        print(f"{name}: {len(encoded)} texts, {sum(lengths)} tokens ({padded} with padding) in {wall:.1f}s = "
              f"{sum(lengths) / wall:,.0f} tokens/s", flush=True)
    worst = max(abs(a - c) for a, c in zip(results["by_length"].pop("rewards"), results["input_order"].pop("rewards")))
    ratio = results["by_length"]["tokens_per_s"] / results["input_order"]["tokens_per_s"]
    print(f"by length / input order, tokens/s: {ratio:.2f}x; largest reward difference {worst:.2g}")
    record.append("bench_score.py", argv, {"score": results, "ratio": ratio, "max_reward_difference": worst})


if __name__ == "__main__":
    main()

"""Data preparation throughput: rm_lib's tokenization + length filter against TRL's RewardTrainer
dataset preparation (EOS, tokenization, length filter), on the same pairs and tokenizer, one after
the other in one run.

    python benchmarks/bench_tokenize.py            # the 20,000 alpaca-eval pairs, max length 512
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca-eval-prefs.jsonl.gz"


def load_pairs(path: Path) -> list[dict]:
    from rm_lib.data import formats, sources

    normaliser = formats.Normaliser(str(path))
    return [record for outcome, record in normaliser(sources.read_file(path)) if outcome == "pair"]


def ours(pairs: list[dict], tokenizer, max_length: int) -> tuple[float, int, int]:
    from rm_lib.data import templates
    from rm_lib.data.length_filter import apply
    from rm_lib.data.tokenization import tokenize_pairs

    started = time.perf_counter()
    template = templates.resolve("auto", tokenizer)
    rows = tokenize_pairs(pairs, tokenizer, template, batch_size=1000)
    outcome = apply(rows, max_len=max_length, max_prompt=max_length - 1, policy="drop", keep_front=0)
    wall = time.perf_counter() - started
    tokens = sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows)
    return wall, tokens, len(outcome.kept)


def trl(pairs: list[dict], tokenizer, max_length: int) -> tuple[float, int, int]:
    """TRL's own preparation of the same conversations, given as text in its explicit-prompt form."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rm_lib.data import templates

    template = templates.resolve("auto", tokenizer)
    columns = {"prompt": [], "chosen": [], "rejected": []}
    for p in pairs:  # the text both trainers see; rendering is not timed for TRL
        prompt = templates.render(p["prompt"], template, tokenizer, add_generation_prompt=True) if p["prompt"] else ""
        columns["prompt"].append(prompt)
        columns["chosen"].append(templates.render(p["prompt"] + p["chosen"], template, tokenizer)[len(prompt):])
        columns["rejected"].append(templates.render(p["prompt"] + p["rejected"], template, tokenizer)[len(prompt):])
    dataset = Dataset.from_dict(columns)
    if tokenizer.eos_token is None:  # BERT-style tokenizers: TRL appends eos_token as text
        tokenizer.eos_token = tokenizer.sep_token
    args = RewardConfig(output_dir=str(ROOT / "benchmarks" / ".work" / "trl-tokenize"), max_length=max_length,
                        report_to="none", use_cpu=True)
    started = time.perf_counter()
    prepared = RewardTrainer._prepare_dataset(None, dataset, tokenizer, args, "train")
    wall = time.perf_counter() - started
    # Tokens before the length filter, as counted for ours
    full = RewardTrainer._prepare_dataset(None, dataset, tokenizer,
                                          RewardConfig(output_dir=args.output_dir, max_length=None,
                                                       report_to="none", use_cpu=True), "train")
    tokens = sum(len(c) + len(r) for c, r in zip(full["chosen_ids"], full["rejected_ids"]))
    return wall, tokens, len(prepared)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    if not args.data.exists():
        sys.exit(f"bench: {args.data} absent: the real preference data lives in ../shared/data")
    from rm_lib.model.modeling import load_tokenizer

    pairs = load_pairs(args.data)
    results = {}
    for name, fn in (("ours", ours), ("trl", trl)):
        wall, tokens, kept = fn(pairs, load_tokenizer(args.model), args.max_length)
        results[name] = {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "kept": kept,
                         "pairs": len(pairs)}
        print(f"{name}: {len(pairs)} pairs, {tokens} tokens in {wall:.1f}s = {tokens / wall:,.0f} tokens/s; "
              f"{kept} pairs within {args.max_length} tokens", flush=True)
    ratio = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"ours/TRL tokens/s: {ratio:.2f}x")
    record.append("bench_tokenize.py", argv, {"tokenize": results, "ratio": ratio})


if __name__ == "__main__":
    main()

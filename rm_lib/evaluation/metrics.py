"""Pair metrics: accuracy where a tie counts as wrong (TRL PR #1012), the length baselines
beside it, and accuracy per length bucket."""
from __future__ import annotations

import math
from collections.abc import Sequence


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def subset_accuracy(r_chosen: Sequence[float], r_rejected: Sequence[float],
                    subsets: Sequence[str | None]) -> dict[str, dict]:
    """{subset: {"pairs", "accuracy"}} for the pairs that name a subset (a tie counts as wrong)."""
    found: dict[str, list[bool]] = {}
    for c, r, name in zip(r_chosen, r_rejected, subsets):
        if name is not None:
            found.setdefault(name, []).append(c > r)
    return {name: {"pairs": len(wins), "accuracy": sum(wins) / len(wins)} for name, wins in sorted(found.items())}


def pair_metrics(r_chosen: Sequence[float], r_rejected: Sequence[float], len_chosen: Sequence[int],
                 len_rejected: Sequence[int], buckets: int = 4) -> dict:
    n = len(r_chosen)
    if n == 0:
        raise ValueError("no pairs to evaluate")
    wins = [c > r for c, r in zip(r_chosen, r_rejected)]
    ties = [c == r for c, r in zip(r_chosen, r_rejected)]
    longer = [lc > lr for lc, lr in zip(len_chosen, len_rejected)]
    shorter = [lc < lr for lc, lr in zip(len_chosen, len_rejected)]
    loss = sum(math.log1p(math.exp(-(c - r))) if c - r > -30 else -(c - r)
               for c, r in zip(r_chosen, r_rejected)) / n
    mean_c, std_c = _mean_std(r_chosen)
    mean_r, std_r = _mean_std(r_rejected)
    mean_all, std_all = _mean_std(list(r_chosen) + list(r_rejected))
    # Buckets by pair length (longest side), equal counts.
    order = sorted(range(n), key=lambda i: max(len_chosen[i], len_rejected[i]))
    per_bucket = []
    for b in range(min(buckets, n)):
        idx = order[b * n // min(buckets, n):(b + 1) * n // min(buckets, n)]
        lens = [max(len_chosen[i], len_rejected[i]) for i in idx]
        per_bucket.append({"range": f"{min(lens)}-{max(lens)}", "pairs": len(idx),
                           "accuracy": sum(wins[i] for i in idx) / len(idx),
                           "longer_wins": sum(longer[i] for i in idx) / len(idx),
                           "shorter_wins": sum(shorter[i] for i in idx) / len(idx)})
    return {
        "pairs": n, "accuracy": sum(wins) / n, "tie_rate": sum(ties) / n, "loss": loss,
        "longer_wins_baseline": sum(longer) / n, "shorter_wins_baseline": sum(shorter) / n,
        "reward_chosen_mean": mean_c, "reward_chosen_std": std_c,
        "reward_rejected_mean": mean_r, "reward_rejected_std": std_r,
        "reward_mean": mean_all, "reward_std": std_all, "reward_margin_mean": mean_c - mean_r,
        "per_length_bucket": per_bucket,
    }

"""Pair metrics: accuracy where a tie counts as wrong (TRL PR #1012), and beside it what says
whether the model learned more than length: the length baselines, how often it prefers the longer
answer, the correlation of reward with length, accuracy per length bucket, and calibration."""
from __future__ import annotations

import math
from collections.abc import Sequence


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if all(v == values[0] for v in values):  # one value (a NaN equals none): the summed mean rounds, and a
        # spread of 1e-17 is no spread
        return float(values[0]), 0.0
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r; None where either side is constant (r is undefined there, not 0)."""
    n = len(xs)
    if n < 2:
        return None
    mx, sx = _mean_std(xs)
    my, sy = _mean_std(ys)
    if sx == 0 or sy == 0:
        return None
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (n * sx * sy)
    return r if math.isnan(r) else max(-1.0, min(1.0, r))  # rounding takes a straight line to 1.0000000000000007


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def calibration(r_chosen: Sequence[float], r_rejected: Sequence[float], bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error of p = sigmoid(r_chosen - r_rejected), the Bradley-Terry probability
    the model gives the chosen answer. Each pair's prediction is the side it favours, with confidence
    max(p, 1 - p) in [0.5, 1]; ECE is the pair-weighted gap between confidence and accuracy per
    equal-width confidence bin (a tie is a wrong prediction at confidence 0.5)."""
    found: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for c, r in zip(r_chosen, r_rejected):
        p = _sigmoid(c - r)
        confidence = max(p, 1 - p) if math.isfinite(p) else 0.5  # a NaN reward favours no side: wrong at 0.5
        found[min(int((confidence - 0.5) * 2 * bins), bins - 1)].append((confidence, c > r))
    n = sum(len(b) for b in found)
    table, ece = [], 0.0
    for i, members in enumerate(found):
        if not members:
            continue
        confidence = sum(m[0] for m in members) / len(members)
        accuracy = sum(m[1] for m in members) / len(members)
        ece += len(members) / n * abs(confidence - accuracy)
        table.append({"range": f"{0.5 + i / (2 * bins):.2f}-{0.5 + (i + 1) / (2 * bins):.2f}",
                      "pairs": len(members), "confidence": confidence, "accuracy": accuracy})
    return ece, table


def subset_accuracy(r_chosen: Sequence[float], r_rejected: Sequence[float],
                    subsets: Sequence[str | None]) -> dict[str, dict]:
    """{subset: {"pairs", "accuracy"}} for the pairs that name a subset (a tie counts as wrong)."""
    found: dict[str, list[bool]] = {}
    for c, r, name in zip(r_chosen, r_rejected, subsets):
        if name is not None:
            found.setdefault(name, []).append(c > r)
    return {name: {"pairs": len(wins), "accuracy": sum(wins) / len(wins)} for name, wins in sorted(found.items())}


def subset_listing(accuracy: dict[str, float], limit: int = 8) -> tuple[list[tuple[str, float]], int]:
    """The subsets a summary lists: all of them, in order, up to `limit`; past it the `limit` least accurate
    (NaN first), so that hundreds of subsets (one per generator, per prompt) stay a line. Also how many
    are left out."""
    items = list(accuracy.items())
    if len(items) <= limit:
        return items, 0
    worst = sorted(items, key=lambda item: (not math.isnan(item[1]), item[1]))[:limit]
    return worst, len(items) - limit


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
    # Length dependence: of the pairs whose sides differ in length, how often the longer one scores higher
    # (a tie or a NaN reward prefers neither: NaN != x is true, and counted a NaN as a preference)
    unequal = [i for i in range(n) if len_chosen[i] != len_rejected[i]]
    prefers_longer = (sum(r_chosen[i] > r_rejected[i] if len_chosen[i] > len_rejected[i]
                          else r_rejected[i] > r_chosen[i] for i in unequal) / len(unequal)) if unequal else None
    ece, calibration_bins = calibration(r_chosen, r_rejected)
    # Buckets by pair length (longest side), of about equal counts; the pairs of one length stay in one
    # bucket, so that the ranges do not overlap (fewer buckets where lengths repeat a lot).
    order = sorted(range(n), key=lambda i: max(len_chosen[i], len_rejected[i]))
    length = [max(len_chosen[i], len_rejected[i]) for i in order]
    cuts = [0]
    for b in range(1, min(buckets, n)):
        cut = max(b * n // min(buckets, n), cuts[-1])
        while 0 < cut < n and length[cut] == length[cut - 1]:
            cut += 1
        if cuts[-1] < cut < n:
            cuts.append(cut)
    per_bucket = []
    for start, end in zip(cuts, [*cuts[1:], n]):
        idx = order[start:end]
        lens = length[start:end]
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
        "prefers_longer": prefers_longer,
        # every answer, chosen and rejected alike: does the reward follow the token count?
        "reward_length_correlation": pearson(list(len_chosen) + list(len_rejected),
                                             list(r_chosen) + list(r_rejected)),
        # per pair: does the margin follow the length difference?
        "margin_length_correlation": pearson([lc - lr for lc, lr in zip(len_chosen, len_rejected)],
                                             [c - r for c, r in zip(r_chosen, r_rejected)]),
        "calibration_ece": ece, "calibration_bins": calibration_bins,
        "per_length_bucket": per_bucket,
    }


def set_aside_by_filter(report: dict) -> tuple[int, int, str] | None:
    """(held-out pairs before the length filter, how many were set aside, 'reason: n, ...') where any
    were (report.json's `held_out`: the filter's reasons, and `template_refused`, the pairs tokenize set
    aside as their chat template refused them), else None."""
    held = report.get("held_out") or {}
    aside = held.get("set_aside_by_filter") or {}
    if not aside:
        return None
    return held["pairs_before_filter"], sum(aside.values()), ", ".join(f"{k}: {v}" for k, v in aside.items())

"""How often the release gate refuses a model, by how much worse it truly is than the last release.

Simulated held-out pairs, no model: each pair has a difficulty u ~ U(0, 1); a model of true accuracy p
gets a pair right where u < p, except on a share of pairs (1 - --agree, 0.15 by default) where it is
right by its own coin of p. Two models of 0.80 then agree on about 91% of pairs (the output says how
often); with --agree 0 they agree as two independent coins do (68%). The release has true accuracy
0.80; the new model 0.80 (as good: every refusal is a false one) or worse.

Three rules, on the same simulated reports:
- whole: the rules of a report that does not say which pairs it got right (the whole accuracies,
  strictly where the test sets share 90%, else within the noise of two samples);
- strict on shared: the new model must reach the release's accuracy on the pairs both hold;
- gate: rm_lib's rule (rm_lib.evaluation.quality._compared): on the shared pairs, strictly where they
  are 90% of the larger set, else McNemar's test (a drop chance gives under 2.5% of the time), with the
  whole accuracies' noise rule beside it.

    python benchmarks/bench_gate.py [--trials 400] [--agree 0.85]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rm_lib.evaluation import quality  # noqa: E402

RELEASE = 0.80
MIN_TEST_PAIRS = 50
# (name, release's test pairs, new model's, shared): pairs are numbered; the new set starts where the
# release's shared part does
SCENARIOS = [("same pairs", 1000, 1000, 1000), ("source grown by 10%", 1000, 1100, 1000),
             ("source grown by 15%", 1000, 1150, 1000), ("another seed", 1000, 1000, 200)]


def record(numbers: list[int], right: dict[int, bool], name: str) -> dict:
    """A report's test_data for the pairs `numbers`, as evaluate writes it."""
    digests = sorted((f"{n:016x}", right[n]) for n in numbers)
    return {"source": "s", "subset": None, "pairs": len(numbers), "hash": name,
            "digests": [d for d, _ in digests], "correct": "".join("1" if r else "0" for _, r in digests)}


def outcomes(numbers: list[int], difficulty: dict[int, float], p: float, agree: float,
             rng: random.Random) -> dict[int, bool]:
    return {n: (difficulty[n] < p) if rng.random() < agree else (rng.random() < p) for n in numbers}


def agreement(agree: float, rng: random.Random, pairs: int = 100_000) -> float:
    """How often two models of the release's accuracy agree on a pair."""
    numbers = list(range(pairs))
    difficulty = {n: rng.random() for n in numbers}
    a, b = (outcomes(numbers, difficulty, RELEASE, agree, rng) for _ in range(2))
    return sum(a[n] == b[n] for n in numbers) / pairs


def refused(release_pairs: int, new_pairs: int, shared: int, p_new: float, agree: float,
            rng: random.Random) -> tuple[bool, ...]:
    """One trial: (whole, strict on shared, gate) refused."""
    theirs = list(range(release_pairs))
    mine = list(range(release_pairs - shared, release_pairs - shared + new_pairs))
    difficulty = {n: rng.random() for n in set(theirs) | set(mine)}
    old, new = outcomes(theirs, difficulty, RELEASE, agree, rng), outcomes(mine, difficulty, p_new, agree, rng)
    same = shared == release_pairs == new_pairs
    report_old, report_new = record(theirs, old, "t0"), record(mine, new, "t0" if same else "t1")
    accuracy_old, accuracy_new = sum(old.values()) / len(old), sum(new.values()) / len(new)
    verdicts = []
    for with_outcomes in (False, True):
        strip = (lambda r: r) if with_outcomes else (lambda r: {k: v for k, v in r.items() if k != "correct"})
        report = {"accuracy": accuracy_new, "pairs": len(mine), quality.TEST_DATA: strip(report_new)}
        bar = {"accuracy": accuracy_old, "pairs": len(theirs), quality.TEST_DATA: strip(report_old)}
        verdicts.append(quality._compared(report, bar, MIN_TEST_PAIRS)[0] is not None)
    both = [n for n in mine if n in old]
    strict = sum(new[n] for n in both) < sum(old[n] for n in both)
    return verdicts[0], strict, verdicts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agree", type=float, default=0.85, help="share of pairs a model gets by their difficulty")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"release true accuracy {RELEASE}; {args.trials} trials per row; share refused; two models of "
          f"{RELEASE} agree on {agreement(args.agree, rng):.0%} of pairs\n")
    print("| test sets | new model's true accuracy | whole | strict on shared | gate |")
    print("|---|---|---|---|---|")
    for name, release_pairs, new_pairs, shared in SCENARIOS:
        for p_new in (0.80, 0.78, 0.75, 0.70):
            runs = [refused(release_pairs, new_pairs, shared, p_new, args.agree, rng) for _ in range(args.trials)]
            rates = [sum(r[i] for r in runs) / args.trials for i in range(3)]
            label = f"{name} ({release_pairs} / {new_pairs}, {shared} shared)"
            print(f"| {label} | {p_new:.2f} | " + " | ".join(f"{r:.0%}" for r in rates) + " |")


if __name__ == "__main__":
    main()

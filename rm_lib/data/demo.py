"""A built-in preference set the project makes itself, so the main job runs offline.

Synthetic film reviews, in the spirit of the sentiment task of Ziegler et al. (2019): an opening and
two continuations; the continuation whose words add up to the more positive review is preferred.
It is made to be learnable only in part, so that its accuracy means something:

- difficulty: each review rates two or three aspects, some with negated words ("not awful" is mildly
  positive); the pair's subset is `easy`, `medium` or `hard` by how far apart the two totals are;
- label noise: 10% of the pairs are flipped, so no model should pass about 90%;
- length misleads: a filler sentence is added more often to the rejected side, so "the longer answer
  wins" is below chance and "the shorter answer wins" a little above it.

It is demo data: a figure measured on it says the pipeline learns, not how good a reward model is.
"""
from __future__ import annotations

import random

SUBJECTS = ["film", "movie", "story", "show", "documentary", "sequel", "drama", "comedy", "thriller", "musical"]
OPENINGS = [
    "I watched this {s} last night with my family, and",
    "After all the hype around this {s}, I have to say",
    "Honestly, going into this {s} I expected little, but",
    "The second half of the {s} is where",
    "My friends recommended this {s}, and",
    "For a {s} with such a famous cast,",
    "Watching the {s} again after ten years,",
    "The director's new {s} is a case where",
]
ASPECTS = ["the acting", "the script", "the music", "the ending", "the pacing", "the dialogue",
           "the photography", "the characters", "the plot", "the humour"]
# Sentiment words graded from -2 (very negative) to +2 (very positive).
WORDS = {
    2: ["wonderful", "brilliant", "superb", "delightful", "magnificent", "outstanding"],
    1: ["good", "pleasant", "solid", "enjoyable", "charming", "decent"],
    -1: ["dull", "weak", "clumsy", "forgettable", "tedious", "flat"],
    -2: ["awful", "dreadful", "terrible", "painful", "horrible", "atrocious"],
}
FILLERS = ["I saw it on a rainy Tuesday in a half-empty cinema with a friend from work.",
           "We bought popcorn and sat in the third row, close to the screen.",
           "It runs for about two hours, with a short break in the middle.",
           "The tickets were cheaper than usual because it was a weekday matinee."]
NEGATION_P = 0.3  # an aspect's word is negated: "was not awful" counts as a mild +0.5
LABEL_NOISE = 0.1
FILLER_P = {"chosen": 0.35, "rejected": 0.5}
SUBSETS = (("easy", 3.0), ("medium", 1.5), ("hard", 0.0))  # by the gap between the two totals


def _review(rng: random.Random) -> tuple[str, float]:
    """A continuation and its sentiment total."""
    clauses, total = [], 0.0
    for aspect in rng.sample(ASPECTS, rng.choice((2, 3))):
        level = rng.choice(sorted(WORDS))
        word = rng.choice(WORDS[level])
        if rng.random() < NEGATION_P:
            clauses.append(f"{aspect} was not {word}")
            total += -level / 4  # "not awful" is mildly good, "not brilliant" mildly bad
        else:
            clauses.append(f"{aspect} was {word}")
            total += level
    return ", ".join(clauses[:-1]) + f" and {clauses[-1]}.", total


def _subset(gap: float) -> str:
    return next(name for name, least in SUBSETS if gap >= least)


def demo_pairs(n: int, seed: int = 0) -> list[dict]:
    """n explicit-prompt pairs with a `subset` (easy, medium, hard) in about equal shares."""
    rng = random.Random(seed)
    wanted = {name: n // len(SUBSETS) + (i < n % len(SUBSETS)) for i, (name, _) in enumerate(SUBSETS)}
    rows = []
    while len(rows) < n:
        (a, score_a), (b, score_b) = _review(rng), _review(rng)
        if abs(score_a - score_b) < 0.5:
            continue  # too close to call
        subset = _subset(abs(score_a - score_b))
        if wanted[subset] == 0:
            continue
        wanted[subset] -= 1
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        if rng.random() < LABEL_NOISE:
            chosen, rejected = rejected, chosen
        sides = {"chosen": chosen, "rejected": rejected}
        for side, p in FILLER_P.items():
            if rng.random() < p:
                sides[side] = f"{sides[side]} {rng.choice(FILLERS)}"
        prompt = rng.choice(OPENINGS).format(s=rng.choice(SUBJECTS))
        rows.append({"prompt": prompt, **sides, "subset": subset})
    return rows

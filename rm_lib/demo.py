"""A built-in preference set the project makes itself, so the main job runs offline.

Like the sentiment task of Ziegler et al. (2019): a review opening and two continuations; the
more positive continuation is preferred. Both sides have the same shape and similar length, so
length tells nothing and a model must read the sentiment words.
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
CLOSINGS = {
    2: ["I would happily watch it again.", "It left me smiling for days.", "Everyone should see it."],
    1: ["It was worth the evening.", "I mostly liked it.", "A nice way to spend time."],
    -1: ["I was checking my watch.", "It did not hold my attention.", "I would not see it twice."],
    -2: ["I wanted my money back.", "I walked out before the end.", "Avoid it if you can."],
}


def _continuation(rng: random.Random, level: int) -> str:
    first, second = rng.sample(ASPECTS, 2)
    return (f"{first} was {rng.choice(WORDS[level])} and {second} felt {rng.choice(WORDS[level])}. "
            f"{rng.choice(CLOSINGS[level])}")


def demo_pairs(n: int, seed: int = 0) -> list[dict]:
    """n explicit-prompt pairs; the chosen continuation has the higher sentiment level."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = rng.choice(OPENINGS).format(s=rng.choice(SUBJECTS))
        hi, lo = sorted(rng.sample(sorted(WORDS), 2), reverse=True)
        rows.append({"prompt": prompt, "chosen": _continuation(rng, hi), "rejected": _continuation(rng, lo)})
    return rows

"""The tokens both sides of a pair begin with: shared-prompt packing (model) computes them once per pair, and
download groups pretokenized pairs by them. Torch-free, so download does not load torch for it."""
from __future__ import annotations


def shared_prefix(chosen: list[int], rejected: list[int]) -> int:
    """How many leading tokens both sides share, leaving each at least its last token of its own
    (the one its score is read at)."""
    n = 0
    limit = min(len(chosen), len(rejected)) - 1
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n

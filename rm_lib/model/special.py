"""The tokens a model expects around every text: what its tokenizer puts before a text (BOS, or
[CLS]) and what every sequence must end with (EOS, or [SEP]), each added only where missing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecialTokens:
    prefix: tuple[int, ...]  # what the tokenizer puts before text: BOS, or [CLS]
    end: int | None  # what every sequence must end with: EOS, or [SEP]
    # where the tokenizer puts nothing before text: the BOS a chat template may write, a start token all the same
    template_start: int | None = None


def special_tokens(tokenizer: Any) -> SpecialTokens:
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    prefix = tuple(full[:start])
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return SpecialTokens(prefix=prefix, end=end, template_start=None if prefix else tokenizer.bos_token_id)


def add_special(ids: list[int], special: SpecialTokens) -> list[int]:
    """Prefix and end token, each added only if missing: no doubled BOS, always an EOS."""
    n = len(special.prefix)
    if n and tuple(ids[:n]) != special.prefix:
        ids = list(special.prefix) + ids
    if special.end is not None and (not ids or ids[-1] != special.end):
        ids = ids + [special.end]
    return ids

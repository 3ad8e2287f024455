"""When two pairs have the same prompt, and when they are the same pair.

The seeded split keeps every prompt on one side and the `no_prompt_overlap` check looks for one on
both: both read `prompt_keys`. Text is compared normalised (Unicode NFKC, case folded, runs of
whitespace as one space, none at the ends): prompts that differ only there read the same to a reader
and, with an uncased tokenizer such as the default model's, give the same token ids. Merging such
prompts into one group never changes a pair; leaving them apart would put one prompt in both splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from typing import Any

from rm_lib.prefix import shared_prefix

PROMPT, TOKENS, SIDES = "prompt:", "tokens:", "sides:"  # a key's kind: only the first two name a prompt
DIGEST_CHARS = 16  # 64 bits: two sets of a million prompts share one by chance about once in 18 million


def normalise_text(text: str) -> str:
    # casefold can leave characters NFKC composes differently (e.g. "ǰ"): normalise on both sides of it
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


def _normalised(value: Any) -> Any:
    if isinstance(value, str):
        return normalise_text(value)
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _pretokenized(pair: dict) -> bool:
    return "input_ids_chosen" in pair


def _sides(pair: dict) -> tuple[str, str]:
    if _pretokenized(pair):
        return _dumps(pair["input_ids_chosen"]), _dumps(pair["input_ids_rejected"])
    return _dumps(_normalised(pair.get("chosen"))), _dumps(_normalised(pair.get("rejected")))


def _sides_key(pair: dict) -> str:
    """A pair with no prompt is a group of its own, with its exact and exchanged copies."""
    return SIDES + _dumps(sorted(_sides(pair)))


def _has_text(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return bool(prompt)
    return any(m.get("content") if isinstance(m, dict) else m for m in prompt or [])


def prompt_keys(pairs: list[dict]) -> list[str]:
    """Each pair's prompt group, in order; pairs of one key must not be split apart.

    A pretokenized pair carries no prompt: its prompt is the tokens both sides begin with (as for
    shared-prompt packing). Where its two answers also begin alike, those tokens lengthen it, so a
    pair whose key begins with another pair's key joins that pair's group. The tokens that every pair
    begins with (a chat template's opening) are no prompt."""
    found = [""] * len(pairs)
    tokens: dict[int, tuple[int, ...]] = {}
    for i, pair in enumerate(pairs):
        if _pretokenized(pair):
            chosen, rejected = pair["input_ids_chosen"], pair["input_ids_rejected"]
            tokens[i] = tuple(chosen[:shared_prefix(chosen, rejected)])
        else:
            prompt = _normalised(pair.get("prompt") or [])
            found[i] = PROMPT + _dumps(prompt) if _has_text(prompt) else _sides_key(pair)
    opening = len(os.path.commonprefix(list(tokens.values()))) if len(tokens) > 1 else None
    roots: dict[tuple[int, ...], tuple[int, ...]] = {}
    root: tuple[int, ...] | None = None
    # sorted, a prefix comes right before every sequence that extends it
    for prefix in sorted({p for p in tokens.values() if opening is not None and len(p) > opening}):
        if root is None or prefix[:len(root)] != root:
            root = prefix
        roots[prefix] = root
    for i, prefix in tokens.items():
        found[i] = TOKENS + _dumps(list(roots[prefix])) if prefix in roots else _sides_key(pairs[i])
    return found


def names_a_prompt(key: str) -> bool:
    return not key.startswith(SIDES)


def pair_keys(pair: dict) -> tuple[str, str]:
    """The pair as compared for duplicates (prompt and sides normalised), and its exchanged copy."""
    chosen, rejected = _sides(pair)
    prompt = "" if _pretokenized(pair) else _dumps(_normalised(pair.get("prompt") or []))
    return _dumps([prompt, chosen, rejected]), _dumps([prompt, rejected, chosen])



def digest(key: str) -> str:
    """A short digest of a prompt key (prompt_keys), compared across datasets and models: which held-out
    prompts a model trained on (rm_lib.data.trained_prompts)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:DIGEST_CHARS]

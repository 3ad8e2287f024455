"""Length policy: drop over-length pairs (counted by reason) or truncate them from the left,
keeping the start tokens and the end of the conversation, where the responses differ."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


# The lengths filter holds pairs to, and how (filter's manifest, the model's rm_lib.json): score holds its
# pairs to them as the model was trained and evaluated.
LENGTH_SETTINGS = ("max_token_length", "max_prompt_token_length", "policy")


@dataclass
class FilterOutcome:
    kept: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)  # each with "reason"
    truncated: int = 0

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return dict(Counter(row["reason"] for row in self.dropped))


def drop_reason(row: dict, max_len: int, max_prompt: int | None) -> str | None:
    if max_prompt is not None and (row.get("prompt_length") or 0) > max_prompt:
        return "prompt_too_long"
    long_c, long_r = len(row["input_ids_chosen"]) > max_len, len(row["input_ids_rejected"]) > max_len
    if long_c and long_r:
        return "both_too_long"
    return "chosen_too_long" if long_c else "rejected_too_long" if long_r else None


def front_length(ids: list[int], keep_front: int, template_start: int | None) -> int:
    """How many of `ids`' first tokens a cut keeps: `keep_front` (the start tokens the tokenizer adds) or,
    where it adds none, the BOS a chat template wrote (`template_start`), which a cut removed."""
    return keep_front or int(template_start is not None and ids[:1] == [template_start])


def truncate_left(ids: list[int], max_len: int, keep_front: int, cut: int = 0) -> list[int]:
    """Remove `cut` tokens after the first `keep_front`, then more from the same place until
    at most max_len remain."""
    front, body = ids[:keep_front], ids[keep_front + cut:]
    room = max(max_len - len(front), 1)
    return front + body[-room:]


def _dropped(row: dict, reason: str) -> dict:
    return {"id": row["id"], "reason": reason, "prompt_length": row.get("prompt_length"),
            "chosen_length": len(row["input_ids_chosen"]), "rejected_length": len(row["input_ids_rejected"])}


def apply(rows: list[dict], *, max_len: int, max_prompt: int | None, policy: str, keep_front: int,
          template_start: int | None = None) -> FilterOutcome:
    """Every kept row carries `length_chosen`/`length_rejected`: its token counts before any cut.
    `keep_front`, `template_start`: the start tokens a cut keeps (front_length)."""
    outcome = FilterOutcome()
    for row in rows:
        row = {**row, "length_chosen": len(row["input_ids_chosen"]), "length_rejected": len(row["input_ids_rejected"])}
        if row["input_ids_chosen"] == row["input_ids_rejected"]:
            # texts that differ only where the tokenizer does not look (case, spaces): no preference to learn,
            # and a sure tie in evaluation
            outcome.dropped.append(_dropped(row, "identical_tokens"))
            continue
        reason = drop_reason(row, max_len, max_prompt)
        if reason is None:
            outcome.kept.append(row)
        elif policy == "drop":
            outcome.dropped.append(_dropped(row, reason))
        else:
            prompt_len = row.get("prompt_length") or 0
            cut = max(prompt_len - max_prompt, 0) if max_prompt is not None else 0
            new = dict(row)
            front = front_length(row["input_ids_chosen"], keep_front, template_start)  # one prompt, one start
            for side in ("chosen", "rejected"):
                ids = truncate_left(row[f"input_ids_{side}"], max_len, front, cut)
                new[f"input_ids_{side}"], new[f"attention_mask_{side}"] = ids, [1] * len(ids)
            if prompt_len:  # the prompt tokens left in the side cut more (the other keeps at least as many)
                removed = max(len(row[f"input_ids_{side}"]) - len(new[f"input_ids_{side}"])
                              for side in ("chosen", "rejected"))
                new["prompt_length"] = max(prompt_len - removed, front)
            if new["input_ids_chosen"] == new["input_ids_rejected"]:
                outcome.dropped.append(_dropped(row, "identical_after_truncation"))
                continue
            outcome.kept.append(new)
            outcome.truncated += 1
    return outcome

"""Reward every pair of a list of token rows, in length-sorted batches, in the original order."""
from __future__ import annotations

from typing import Any

import torch

from .batching import collate_pairs, pair_length
from .modeling import rewards


@torch.no_grad()
def score_pairs(model: Any, rows: list[dict], *, pad_token_id: int, batch_size: int = 32,
                device: torch.device | None = None) -> tuple[list[float], list[float]]:
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: pair_length(rows[i]))
    r_chosen, r_rejected = [0.0] * len(rows), [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate_pairs([rows[i] for i in idx], pad_token_id, use_margin=False).to(device)
        out = rewards(model, batch.input_ids, batch.attention_mask).tolist()
        for k, i in enumerate(idx):
            r_chosen[i], r_rejected[i] = out[k], out[k + len(idx)]
    model.train(was_training)
    return r_chosen, r_rejected

"""Batches of pairs: length-grouped order, padded collation, per-process slices."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def pair_length(row: dict) -> int:
    return max(len(row["input_ids_chosen"]), len(row["input_ids_rejected"]))


def epoch_batches(rows: list[dict], batch_size: int, *, seed: int, epoch: int, group_by_length: bool,
                  megabatch: int = 64) -> list[list[int]]:
    """Row indices of every batch of one epoch; a pure function of (seed, epoch), so a resumed
    run sees the same batches. Length grouping sorts within shuffled windows of `megabatch`
    batches and then shuffles the batches, so little compute goes to padding."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * megabatch
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -pair_length(rows[i]))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def process_slice(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch."""
    per = -(-len(batch) // world)
    return batch[rank * per:(rank + 1) * per]


def token_chunks(rows: list[dict], budget: int | None) -> list[list[dict]]:
    """Split one batch, in order, into runs of pairs holding at most `budget` real tokens each (a
    longer pair runs alone). The loss is a mean over pairs, so weighting each run's loss by its share
    of pairs gives the whole batch's gradient with a fraction of its activation memory."""
    if budget is None:
        return [rows]
    chunks: list[list[dict]] = [[]]
    used = 0
    for row in rows:
        size = len(row["input_ids_chosen"]) + len(row["input_ids_rejected"])
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(row)
        used += size
    return chunks


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, T]: B chosen rows, then B rejected rows
    attention_mask: torch.Tensor
    margin: torch.Tensor | None  # [B]
    n_pairs: int
    real_tokens: int
    padded_tokens: int

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device),
                         None if self.margin is None else self.margin.to(device), self.n_pairs,
                         self.real_tokens, self.padded_tokens)


def collate_pairs(rows: list[dict], pad_token_id: int, use_margin: bool = True) -> PairBatch:
    """Chosen and rejected of every pair in one right-padded tensor, so one forward scores both."""
    seqs = [r["input_ids_chosen"] for r in rows] + [r["input_ids_rejected"] for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    margins = [r.get("margin") for r in rows]
    margin = (torch.tensor([m or 0.0 for m in margins], dtype=torch.float32)
              if use_margin and any(m is not None for m in margins) else None)
    real = sum(len(s) for s in seqs)
    return PairBatch(ids, mask, margin, len(rows), real, ids.numel())

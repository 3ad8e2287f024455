"""Reward every pair of a list of token rows, in length-sorted batches, in the original order; on one
process or split across the processes of a distributed run."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rm_lib.model.batching import PairBatch, collate_sequences, in_batches
from rm_lib.model.modeling import rewards, unwrap
from rm_lib.model.packing import PackedBatch, packed_rewards


class PairScorer(torch.nn.Module):
    """The model as one module whose forward scores a whole batch, padded or packed. Training and
    evaluation hand this to accelerate, so the wrapper around it sees every forward: DDP runs its
    gradient hooks, FSDP gathers its sharded weights. A forward that reached into the
    model's submodules would skip them."""

    def __init__(self, model: Any, length_head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.scored_model = model
        self.length_head = length_head  # length-debiased training only; never part of the saved model
        # the model's layer classes, each its own FSDP unit (accelerate's transformer wrap policy reads
        # them off the module it prepares); without them FSDP would gather the whole model at once
        self._no_split_modules = getattr(unwrap(model), "_no_split_modules", None)

    def forward(self, batch: PairBatch | PackedBatch, lengths: torch.Tensor | None = None) -> Any:
        """The rewards of the batch's sequences; with `lengths`, also the length head's scores of them."""
        if isinstance(batch, PackedBatch):
            scores = packed_rewards(unwrap(self.scored_model), batch)
        else:
            scores = rewards(self.scored_model, batch.input_ids, batch.attention_mask)
        if lengths is None:
            return scores
        return scores, self.length_head(lengths)


def _batch_scorer(model: Any) -> Callable[[PairBatch], torch.Tensor]:
    if isinstance(getattr(model, "module", model), PairScorer):  # prepared for a distributed run
        return model
    return lambda batch: rewards(model, batch.input_ids, batch.attention_mask)


@torch.no_grad()
def score_pairs(model: Any, rows: list[dict], *, pad_token_id: int, batch_size: int = 32,
                device: torch.device | None = None, shrink_on_oom: bool = True) -> tuple[list[float], list[float]]:
    """The rewards of each pair's chosen and rejected sequences, in `rows` order. Each reward is its
    sequence's alone, so the sequences are scored apart from their pairs, shortest first, 2 x `batch_size`
    to a right-padded batch: a chosen answer padded to its longer rejected one (or the reverse) spent
    a third more tokens on AlpacaEval (BENCHMARKS.md). A batch out of GPU memory is scored again in
    halves (`in_batches`); `shrink_on_oom=False` where several processes score in step."""
    device = device or next(model.parameters()).device
    score = _batch_scorer(model)
    was_training = model.training
    model.eval()
    seqs = [r["input_ids_chosen"] for r in rows] + [r["input_ids_rejected"] for r in rows]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))

    def run(start: int, stop: int) -> list[float]:
        return score(collate_sequences([seqs[i] for i in order[start:stop]], pad_token_id).to(device)).tolist()

    try:
        scored = in_batches(len(order), 2 * batch_size, run, what="scoring pairs", unit="texts",
                            shrink=shrink_on_oom)
    finally:
        model.train(was_training)
    out = [0.0] * len(seqs)
    for i, reward in zip(order, scored):
        out[i] = reward
    return out[:len(rows)], out[len(rows):]


def shard(rows: list[dict], rank: int, world: int) -> tuple[list[dict], int]:
    """This process's rows (every `world`-th, so each share has the same mix of lengths) padded with
    copies to one size for all: sharded weights are gathered inside every forward, so each process must
    run as many batches as the others. Returns the share and how many of its rows are real."""
    mine = rows[rank::world]
    size = -(-len(rows) // world)
    return mine + rows[:1] * (size - len(mine)), len(mine)


def unshard(parts: list[list[Any]], world: int) -> list[Any]:
    """Undo `shard`: parts[rank] holds the results for rows rank, rank + world, ... in that order."""
    out: list[Any] = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out


def score_pairs_across(accelerator: Any, model: Any, rows: list[dict], *, pad_token_id: int,
                       batch_size: int = 32) -> tuple[list[float], list[float]]:
    """`score_pairs` with the rows split over the processes of `accelerator`; every process gets all
    rewards back, in the original order. Every process must call it: the gather is collective."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world == 1:
        return score_pairs(model, rows, pad_token_id=pad_token_id, batch_size=batch_size, device=accelerator.device)
    from accelerate.utils import gather_object

    mine, real = shard(rows, rank, world)
    r_c, r_r = score_pairs(model, mine, pad_token_id=pad_token_id, batch_size=batch_size, device=accelerator.device,
                           shrink_on_oom=False)
    parts = gather_object([(r_c[:real], r_r[:real])])  # one (chosen, rejected) per process, in rank order
    return unshard([p[0] for p in parts], world), unshard([p[1] for p in parts], world)

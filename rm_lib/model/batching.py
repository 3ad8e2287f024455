"""Batches of pairs: length-grouped order, the forwards of a step on each process, padded collation."""
from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rm_lib.errors import DevicePathError
from rm_lib.progress import Progress


def pair_length(row: dict) -> int:
    return max(len(row["input_ids_chosen"]), len(row["input_ids_rejected"]))


def pair_tokens(row: dict) -> int:
    return len(row["input_ids_chosen"]) + len(row["input_ids_rejected"])


def epoch_batches(rows: list[dict], batch_size: int, *, seed: int, epoch: int, group_by_length: bool,
                  megabatch: int = 64, batch_tokens: int | None = None, accumulation: int = 1) -> list[list[int]]:
    """Row indices of every micro-batch of one epoch; a pure function of (seed, epoch), so a resumed
    run sees the same batches. The epoch is cut into optimizer steps of `batch_size` x `accumulation`
    pairs (the last one smaller), each then into `accumulation` micro-batches, the smallest last (empty
    where a step has fewer pairs than micro-batches): accumulation is a larger batch split in passes,
    the same pairs in each step, and an epoch holds whole steps.

    Length grouping sorts within shuffled windows of `megabatch` steps and then shuffles the steps, so
    little compute goes to padding. `batch_tokens`: each step takes pairs until it holds `accumulation`
    x that many tokens (a longer pair alone), so short pairs come many to a step and long ones few; the
    windows are then `megabatch` times `batch_size` pairs, as with a larger `batch_tokens`."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * megabatch * (accumulation if batch_tokens is None else 1)
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -pair_length(rows[i]))]
    if batch_tokens is None:
        size = batch_size * accumulation
        steps = [order[i:i + size] for i in range(0, len(order), size)]
    else:
        steps = _cut_by_tokens(order, rows, batch_tokens * accumulation)
    if group_by_length:
        rng.shuffle(steps)
    return [micro for step in steps for micro in _micro_batches(step, accumulation)]


def _micro_batches(step: list[int], accumulation: int) -> list[list[int]]:
    """`step` cut, in order, into `accumulation` runs of len(step) / accumulation pairs, rounded up: a
    whole step of pairs into runs of `batch_size`; a smaller step's last runs smaller, or empty."""
    size = -(-len(step) // accumulation)
    return [step[k * size:(k + 1) * size] for k in range(accumulation)]


def _cut_by_tokens(order: list[int], rows: list[dict], budget: int) -> list[list[int]]:
    """`order` cut, in order, into runs of at most `budget` tokens (a longer pair alone)."""
    batches: list[list[int]] = [[]]
    used = 0
    for i in order:
        size = pair_tokens(rows[i])
        if batches[-1] and used + size > budget:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += size
    return batches


class EpochSchedule:
    """Where micro-batch k of a run lies (epoch, batch), over epochs whose batch counts may differ
    (token-budgeted batches); each epoch's batches computed once."""

    def __init__(self, rows: list[dict], batch_size: int, *, seed: int, group_by_length: bool,
                 batch_tokens: int | None = None, accumulation: int = 1) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.group_by_length, self.batch_tokens, self.accumulation = group_by_length, batch_tokens, accumulation
        self._current: tuple[int, list[list[int]]] | None = None
        self._counts: dict[int, int] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        if self._current is None or self._current[0] != epoch:
            self._current = (epoch, epoch_batches(self.rows, self.batch_size, seed=self.seed, epoch=epoch,
                                                  group_by_length=self.group_by_length,
                                                  batch_tokens=self.batch_tokens, accumulation=self.accumulation))
            self._counts[epoch] = len(self._current[1])
        return self._current[1]

    def count(self, epoch: int) -> int:
        if epoch not in self._counts:
            if self.batch_tokens is None:  # every epoch alike: no need to lay one out
                step = self.batch_size * self.accumulation
                self._counts[epoch] = -(-len(self.rows) // step) * self.accumulation
            else:  # laid out once: `locate` counts the epoch it then reads last
                self.batches(epoch)
        return self._counts[epoch]

    def locate(self, micro: int) -> tuple[int, int]:
        """(epoch, index of the batch in it) of the run's micro-batch `micro`, counted from 0."""
        epoch = 0
        while micro >= self.count(epoch):
            micro -= self.count(epoch)
            epoch += 1
        return epoch, micro

    def micro_batches(self, num_epochs: float) -> int:
        """Micro-batches in `num_epochs` epochs: a fraction of the last one counted in whole optimizer steps
        (each `accumulation` micro-batches), as one batch `accumulation` times larger counts it."""
        whole = int(num_epochs)
        count = sum(self.count(e) for e in range(whole))
        if num_epochs <= whole:
            return count
        steps = self.count(whole) // self.accumulation  # an epoch holds whole steps
        return count + int((num_epochs - whole) * steps) * self.accumulation


def process_slice(batch: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global batch; shares differ by one pair at most."""
    return batch[len(batch) * rank // world:len(batch) * (rank + 1) // world]


def token_chunks(rows: list[dict], budget: int | None) -> list[list[dict]]:
    """Split one batch, in order, into runs of pairs holding at most `budget` real tokens each (a
    longer pair runs alone). The loss is a mean over pairs, so weighting each run's loss by its share
    of pairs gives the whole batch's gradient with a fraction of its activation memory."""
    if budget is None:
        return [rows] if rows else []
    return [[rows[i] for i in run] for run in _cut_by_tokens(list(range(len(rows))), rows, budget) if run]


@dataclass(frozen=True)
class Forward:
    """One forward and backward of a training step on one process. `weight`: what its loss (a mean
    over its pairs) counts for in the step's gradient; 0 for a forward that only keeps this process
    in step with the others (it has no pairs of its own left), whose pairs count for nothing."""
    pairs: list[dict]
    weight: float

    @property
    def counts(self) -> bool:
        return self.weight > 0


def step_forwards(rows: list[dict], schedule: EpochSchedule, micro: int, accumulation: int, rank: int, world: int,
                  budget: int | None, end: int | None = None) -> list[list[Forward]]:
    """This process's forwards for each micro-batch of the step that begins at micro-batch `micro`,
    each of at most `budget` tokens. `end`: the run's number of micro-batches (none past it is read).

    The step's gradient is the mean over all its pairs, whatever the micro-batches and the processes
    hold: a forward's loss is weighted by its pairs' share of the step, times `world` because the
    processes average their gradients. Every process runs as many forwards as the busiest one: FSDP
    gathers weights in each forward, and a process that stopped early would leave the others waiting.
    One that has run out of pairs runs the step's shortest pair again, at weight 0."""
    batches = []
    for k in range(accumulation if end is None else min(accumulation, end - micro)):
        epoch, position = schedule.locate(micro + k)
        batch = schedule.batches(epoch)[position]
        if batch:  # a step of fewer pairs than micro-batches leaves the last ones empty
            batches.append([rows[i] for i in batch])
    step_pairs = sum(len(b) for b in batches)
    spare = min((r for b in batches for r in b), key=pair_tokens)
    layout = []
    for batch in batches:
        shares = [token_chunks(process_slice(batch, r, world), budget) for r in range(world)]
        mine = [Forward(chunk, len(chunk) * world / step_pairs) for chunk in shares[rank]]
        layout.append(mine + [Forward([spare], 0.0)] * (max(map(len, shares)) - len(mine)))
    return layout


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, T]: B chosen rows, then B rejected rows
    attention_mask: torch.Tensor
    margin: torch.Tensor | None  # [B]
    n_pairs: int
    real_tokens: int
    padded_tokens: int

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(to_device(self.input_ids, device), to_device(self.attention_mask, device),
                         None if self.margin is None else to_device(self.margin, device), self.n_pairs,
                         self.real_tokens, self.padded_tokens)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; from the host to a GPU through pinned memory without waiting. A plain copy
    from pageable memory synchronizes the stream: the GPU would run dry at every batch while the host
    waits, then packs and launches the next forward. Pinned blocks are reused only once their copy
    has run (torch's caching host allocator records it), so the source may be dropped at once."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def right_padded(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of the sequences, padded on the right to the longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


def collate_pairs(rows: list[dict], pad_token_id: int, use_margin: bool = True) -> PairBatch:
    """Chosen and rejected of every pair in one right-padded tensor, so one forward scores both."""
    seqs = [r["input_ids_chosen"] for r in rows] + [r["input_ids_rejected"] for r in rows]
    ids, mask = right_padded(seqs, pad_token_id)
    margins = [r.get("margin") for r in rows]
    margin = (torch.tensor([m or 0.0 for m in margins], dtype=torch.float32)
              if use_margin and any(m is not None for m in margins) else None)
    real = sum(len(s) for s in seqs)
    return PairBatch(ids, mask, margin, len(rows), real, ids.numel())


def collate_sequences(seqs: list[list[int]], pad_token_id: int) -> PairBatch:
    """Sequences of no particular pairs in one right-padded tensor: a batch to score, never to train on
    (no pairs, so no loss)."""
    ids, mask = right_padded(seqs, pad_token_id)
    return PairBatch(ids, mask, None, 0, sum(len(s) for s in seqs), ids.numel())


def _count(n: int, unit: str) -> str:
    return f"{n} {unit.removesuffix('s') if n == 1 else unit}"


def in_batches(count: int, batch_size: int, run: Callable[[int, int], list[Any]], *, what: str,
               shrink: bool = True, unit: str = "pairs") -> list[Any]:
    """`run(start, stop)` over [0, count) in slices of `batch_size`, the results joined, with a progress
    line now and then (Progress). Inference holds no state between slices, so one that runs out of GPU
    memory is run again in halves, and the rest too (it says so); `shrink=False` (several processes,
    whose forwards may gather weights together) ends with an error naming the setting instead."""
    out: list[Any] = []
    start = 0
    progress = Progress(what, count, unit, shared=not shrink)  # only processes scoring in step keep from shrinking
    while start < count:
        stop = min(start + batch_size, count)
        try:
            out += run(start, stop)
            start = stop
            progress(start)
            continue
        except torch.OutOfMemoryError:
            if not shrink or batch_size == 1:
                # halved down to one alone already; several processes score in step and cannot
                advice = ("set evaluate.batch_size lower, or free GPU memory" if not shrink else
                          f"a single {unit.removesuffix('s')} does not fit: free GPU memory, or score shorter texts "
                          "(evaluate: a lower filter.max_token_length, then rerun filter)")
                raise DevicePathError(
                    f"{what}: out of GPU memory scoring a batch of {_count(stop - start, unit)}"
                    + ("" if shrink else " on one of several processes, which score in step")
                    + f"; {advice}") from None
        # out of the except block: its traceback, and the tensors it holds, are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        batch_size = max(batch_size // 2, 1)
        print(f"{what}: out of GPU memory in a batch of {_count(stop - start, unit)}; on in batches of {batch_size}",
              file=sys.stderr)
    return out

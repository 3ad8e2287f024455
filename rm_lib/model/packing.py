"""Padding-free batches: the chosen and rejected sequences of several pairs packed into a few rows.

Each sequence keeps its own positions (they restart at 0) and attends only to itself through a
block-diagonal mask, so its score is the one it would get alone; the rows are filled first-fit
from the longest sequence down, so only the tail of a row is padding.

Shared-prompt packing (`pack_pairs_shared`, causal decoders only) lays a pair out as
prefix | chosen rest | rejected rest, where the prefix is what both sides begin with: the rejected
tokens see the prefix and themselves (not the chosen ones), and their positions continue from the
prefix. A causal model computes the prefix the same way for both sides, so every score is the one
the sequence gets alone, and the prefix is computed once per pair instead of twice."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from rm_lib.errors import DevicePathError
from rm_lib.model.attention import FP32_SDPA
from rm_lib.model.batching import pair_tokens, to_device
from rm_lib.model.varlen import LAYOUT_KWARG, VARLEN, VarlenLayout, varlen_layout
from rm_lib.prefix import shared_prefix


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W], restarting at 0 for every sequence
    segment_ids: torch.Tensor  # [R, W]: sequence index of each token, -1 - column for padding
    first: torch.Tensor  # [S] flat index (row * W + column) of each sequence's first token
    last: torch.Tensor  # [S] flat index of each sequence's last token
    margin: torch.Tensor | None
    n_pairs: int
    real_tokens: int  # tokens computed (a shared prefix once)
    padded_tokens: int
    # [R, W] with shared prompts: the segment a token may also attend to (its pair's prefix);
    # None: each token sees its own segment only
    prefix_ids: torch.Tensor | None = None
    sequence_tokens: int = 0  # tokens of the pairs' sequences, a shared prefix counted for both sides
    varlen: VarlenLayout | None = None  # for VARLEN attention: built on the host (`with_varlen`) before `to`

    def __post_init__(self) -> None:
        self.sequence_tokens = self.sequence_tokens or self.real_tokens

    def to(self, device: torch.device) -> PackedBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_device(t, device)

        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.segment_ids), move(self.first),
                           move(self.last), move(self.margin), self.n_pairs, self.real_tokens, self.padded_tokens,
                           move(self.prefix_ids), self.sequence_tokens,
                           None if self.varlen is None else self.varlen.to(device))

    def with_varlen(self, *, causal: bool) -> PackedBatch:
        """This batch with its layout for VARLEN attention, read off the segment ids (on the host: no sync)."""
        return replace(self, varlen=varlen_layout(self.segment_ids, causal=causal, prefix_ids=self.prefix_ids))


FLEX_BLOCK = 128  # flex_attention's block size: rows are padded to a multiple of it


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices per row: longest first, each into the first row with room (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def row_width(sizes: list[int], width: int | None, one_row: bool, multiple: int = FLEX_BLOCK) -> int:
    """`one_row`: every item in one row (attention that skips what the mask excludes needs no narrow
    rows), padded to a `multiple` of tokens (flex_attention's block size; varlen needs none: 1);
    else `width`, at least the longest item."""
    if one_row:
        return -(-sum(sizes) // multiple) * multiple
    return max(width or 0, max(sizes))


def pack_pairs(rows: list[dict], pad_token_id: int, use_margin: bool = True, width: int | None = None,
               one_row: bool = False, multiple: int = FLEX_BLOCK) -> PackedBatch:
    """Sequences in the order chosen of every pair, then rejected (as `collate_pairs`), packed into
    rows `width` tokens wide (default: the longest sequence, so no row is wider than a padded batch)."""
    seqs = [r["input_ids_chosen"] for r in rows] + [r["input_ids_rejected"] for r in rows]
    lengths = [len(s) for s in seqs]
    width = row_width(lengths, width, one_row, multiple)
    layout = first_fit(lengths, width)
    ids = torch.full((len(layout), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    segments = -1 - torch.arange(width).repeat(len(layout), 1)
    first = torch.empty(len(seqs), dtype=torch.long)
    last = torch.empty(len(seqs), dtype=torch.long)
    for r, members in enumerate(layout):
        column = 0
        for i in members:
            n = lengths[i]
            ids[r, column:column + n] = torch.tensor(seqs[i], dtype=torch.long)
            positions[r, column:column + n] = torch.arange(n)
            segments[r, column:column + n] = i
            first[i], last[i] = r * width + column, r * width + column + n - 1
            column += n
    return PackedBatch(ids, positions, segments, first, last, _margin(rows, use_margin), len(rows), sum(lengths),
                       ids.numel())


def _margin(rows: list[dict], use_margin: bool) -> torch.Tensor | None:
    margins = [r.get("margin") for r in rows]
    return (torch.tensor([m or 0.0 for m in margins], dtype=torch.float32)
            if use_margin and any(m is not None for m in margins) else None)


def largest_batch_tokens(rows: list[dict], *, pairs: int, batch_tokens: int | None, shared_prompt: bool) -> int:
    """The most tokens one process's batch can compute packed, whatever an epoch's order: the `pairs`
    largest pairs, or with token-budgeted batches their budget `batch_tokens` (the global one: a
    process's share never holds more; a longer pair alone), rounded up to whole flex_attention blocks.
    What the device plan sizes memory by, where it is below the budget per forward."""
    sizes = [pair_tokens(r) for r in rows]
    if batch_tokens is not None:
        most = max([batch_tokens, *sizes])
    else:
        if shared_prompt:
            sizes = [n - shared_prefix(r["input_ids_chosen"], r["input_ids_rejected"]) for n, r in zip(sizes, rows)]
        most = sum(sorted(sizes, reverse=True)[:pairs])
    return -(-most // FLEX_BLOCK) * FLEX_BLOCK


def pack_pairs_shared(rows: list[dict], pad_token_id: int, use_margin: bool = True,
                      width: int | None = None, one_row: bool = False, multiple: int = FLEX_BLOCK) -> PackedBatch:
    """Each pair as one block prefix | chosen rest | rejected rest, blocks packed first-fit into rows
    `width` wide (default: the longest block). Scores come out in `pack_pairs` order: chosen of every
    pair, then rejected. For causal attention only."""
    n = len(rows)
    splits = [shared_prefix(r["input_ids_chosen"], r["input_ids_rejected"]) for r in rows]
    blocks = [len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) - k for r, k in zip(rows, splits)]
    width = row_width(blocks, width, one_row, multiple)
    layout = first_fit(blocks, width)
    ids = torch.full((len(layout), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(layout), width), dtype=torch.long)
    segments = -1 - torch.arange(width).repeat(len(layout), 1)
    prefixes = segments.clone()
    first = torch.empty(2 * n, dtype=torch.long)
    last = torch.empty(2 * n, dtype=torch.long)
    for r, members in enumerate(layout):
        column = 0
        for i in members:
            chosen, rejected, k = rows[i]["input_ids_chosen"], rows[i]["input_ids_rejected"], splits[i]
            start_of_block = r * width + column
            # segments: chosen i, rejected n + i (as pack_pairs), the shared prefix 2n + i
            for segment, tokens, start in ((2 * n + i, chosen[:k], 0), (i, chosen[k:], k),
                                           (n + i, rejected[k:], k)):
                m = len(tokens)
                ids[r, column:column + m] = torch.tensor(tokens, dtype=torch.long)
                positions[r, column:column + m] = torch.arange(start, start + m)
                segments[r, column:column + m] = segment
                prefixes[r, column:column + m] = 2 * n + i
                if segment < 2 * n:
                    first[segment], last[segment] = start_of_block, r * width + column + m - 1
                column += m
    unshared = sum(len(r["input_ids_chosen"]) + len(r["input_ids_rejected"]) for r in rows)
    return PackedBatch(ids, positions, segments, first, last, _margin(rows, use_margin), n, sum(blocks), ids.numel(),
                       prefix_ids=prefixes, sequence_tokens=unshared)


def block_mask(segment_ids: torch.Tensor, *, causal: bool, boolean: bool, dtype: torch.dtype,
               prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[R, 1, W, W] mask letting a token see only its own sequence (and, if causal, what precedes it);
    with `prefix_ids`, also the shared prefix of its pair. A padding token sees only itself, so no
    row of the softmax is empty."""
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    if prefix_ids is not None:
        allowed |= prefix_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        width = segment_ids.shape[-1]
        allowed &= torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = allowed[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)



def flex_block_mask(segment_ids: torch.Tensor, *, causal: bool, prefix_ids: torch.Tensor | None = None) -> Any:
    """The same rule as `block_mask`, as a flex_attention BlockMask: blocks of 128 x 128 that no token
    pair in them may attend are skipped, so the work follows the real sequences, not W x W.

    The blocks are found from the layout (`attended_blocks`), not by evaluating the rule on all W x W
    token pairs as torch's `create_block_mask` does: nothing to compile, no W x W booleans, no sync."""
    from torch.nn.attention.flex_attention import BlockMask

    segments, prefixes = segment_ids, prefix_ids

    def allowed(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        same = segments[b, q] == segments[b, kv]
        if prefixes is not None:
            same = same | (prefixes[b, q] == segments[b, kv])
        return same & (kv <= q) if causal else same

    some, every = attended_blocks(segment_ids, causal=causal, prefix_ids=prefix_ids)
    partial_count, partial_index = _ordered(some & ~every)
    full_count, full_index = _ordered(every)
    width = segment_ids.shape[-1]
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=allowed, seq_lengths=(width, width))


def attended_blocks(segment_ids: torch.Tensor, *, causal: bool,
                    prefix_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, 1, Q blocks, KV blocks] booleans of `block_mask`'s rule at flex_attention's block size:
    blocks where some token may attend some key, and blocks where every token may attend every key.

    Each segment lies in one run of columns (as the packers lay rows out), so what a token may see is at
    most two intervals of its row: its own segment (up to itself, if causal) and its pair's prefix. A
    prefix ends where the chosen side begins: the two are then one interval. Work and memory are
    W x W / 128, on the device the segments are on."""
    rows, width = segment_ids.shape
    device = segment_ids.device
    column = torch.arange(width, device=device).expand(rows, width)
    # each segment's first and last column, by id (shifted by W: padding's are -1 - column); a batch
    # has fewer segments than twice its tokens (a shared prefix may be empty), so no id reaches 2RW
    key = segment_ids + width
    ids = width + 2 * rows * width
    first = torch.full((rows, ids), width, device=device).scatter_reduce(1, key, column, "amin")
    last = torch.full((rows, ids), -1, device=device).scatter_reduce(1, key, column, "amax")
    own_start, own_end = first.gather(1, key), last.gather(1, key)
    if causal:
        own_end = column
    if prefix_ids is None:
        other_start, other_end = own_start, own_end
    else:
        other = prefix_ids + width
        other_start, other_end = first.gather(1, other), last.gather(1, other)
        if causal:
            other_end = torch.minimum(other_end, column)
        # touching or overlapping: one interval
        joined = (other_start <= own_end + 1) & (own_start <= other_end + 1)
        merged_start, merged_end = torch.minimum(own_start, other_start), torch.maximum(own_end, other_end)
        own_start, own_end = torch.where(joined, merged_start, own_start), torch.where(joined, merged_end, own_end)
        other_start, other_end = torch.where(joined, own_start, other_start), torch.where(joined, own_end, other_end)
    blocks = -(-width // FLEX_BLOCK)
    padded = blocks * FLEX_BLOCK

    def rows_of_blocks(bound: torch.Tensor, empty: int) -> torch.Tensor:
        # tokens past the row (up to a whole block) see nothing
        return torch.nn.functional.pad(bound, (0, padded - width), value=empty)[..., None]

    starts = [rows_of_blocks(t, padded) for t in (own_start, other_start)]  # an empty interval: [padded, -1]
    ends = [rows_of_blocks(t, -1) for t in (own_end, other_end)]
    lo = torch.arange(blocks, device=device) * FLEX_BLOCK
    hi = lo + FLEX_BLOCK - 1
    some = (starts[0] <= hi) & (ends[0] >= lo) | (starts[1] <= hi) & (ends[1] >= lo)  # [R, padded, blocks]
    every = (starts[0] <= lo) & (ends[0] >= hi) | (starts[1] <= lo) & (ends[1] >= hi)
    some = some.view(rows, blocks, FLEX_BLOCK, blocks).any(2)
    every = every.view(rows, blocks, FLEX_BLOCK, blocks).all(2)
    return some[:, None], every[:, None]


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BlockMask's form of [..., Q blocks, KV blocks] booleans: how many per Q block, and their indices first."""
    flags = blocks.to(torch.int32)
    return flags.sum(-1, dtype=torch.int32), torch.argsort(flags, dim=-1, descending=True, stable=True).to(torch.int32)


@contextlib.contextmanager
def any_width_compiles() -> Iterator[None]:
    """Compiles started inside (transformers compiles flex_attention) hold for every row width. By
    default a first compile is for its exact shapes and the next width compiles again for any, yet a
    packed row's width changes with every forward: that first compile is thrown away (on an H200,
    cold, step 2 took 18.5 s of a 49 s run). Sizes that happen to be equal (blocks in a row,
    attention heads) are not taken to stay equal either."""
    import torch._dynamo
    import torch.fx.experimental._config as shapes

    # past dynamo's limit of compiles per function, flex_attention would run unfused, holding
    # heads x W x W scores per layer: stopped with a clear error instead of a crawl into memory exhaustion
    with torch._dynamo.config.patch(assume_static_by_default=False, fail_on_recompile_limit_hit=True), \
            shapes.patch(use_duck_shape=False):
        try:
            yield
        except torch._dynamo.exc.FailOnRecompileLimitHit as exc:
            limit = torch._dynamo.config.recompile_limit
            raise DevicePathError(
                f"train.attention: flex_attention (or a layer under train.compile) reached dynamo's limit of "
                f"{limit} compiles in this run and would now run uncompiled (flex_attention unfused: memory "
                "growing with the square of the tokens per forward). Run again with TORCH_LOGS=recompiles to see "
                "what changed between compiles, or set train.attention=varlen (FlashAttention's kernel: nothing "
                "compiled) or sdpa, or train.compile=false") from exc


def pooling(inner: Any) -> str | None:
    """How a packed forward reads a score: 'last' for decoder heads (`score`), 'first' for BERT-style
    [CLS] heads (`pooler` + `classifier`), None where packed rows would not give the padded scores
    (`why_not_packed` says why)."""
    return None if why_not_packed(inner) else _head_pooling(inner)


def why_not_packed(inner: Any) -> str | None:
    """Why this model cannot score packed rows as it scores padded ones, or None where it can."""
    kind = _head_pooling(inner)
    if kind is None:
        return "its head is not one linear layer on the last or the first token"
    base = getattr(inner, inner.base_model_prefix, None)
    if base is None:
        return f"its backbone is not at `{inner.base_model_prefix}`, where transformers models keep it"
    if kind == "first" and not getattr(inner, "_supports_attention_backend", False):
        # Canine downsamples characters across the row, LayoutLM reads the mask as 2D, LUKE adds its
        # entities' mask: their attention does not take the block mask as BERT's does
        return "its encoder's attention does not take a block mask through transformers' attention interface"
    if "position_ids" not in inspect.signature(base.forward).parameters or _alibi(inner.config):
        # Bloom, MPT, Falcon-RW: distances come from the columns of the row, so a packed sequence
        # would see the tokens laid between its prompt and its answer, or crash on the block mask
        return ("it places tokens by their columns in the batch (as ALiBi models do), not by the position ids "
                "packing gives")
    return None


def _head_pooling(inner: Any) -> str | None:
    if hasattr(inner, "score"):
        return "last"
    base = getattr(inner, inner.base_model_prefix, None)
    pooler = getattr(base, "pooler", None)
    if not _linear(getattr(inner, "classifier", None)) or pooler is None or hasattr(pooler, "original_module"):
        return None  # a pooler peft wraps (new weights LoRA trains in full): `_pooled` reads the module itself
    if isinstance(pooler, torch.nn.Linear) and not hasattr(base, "pooler_activation"):
        return None  # a bare linear pooler whose activation `_pooled` would not know
    return "first"


def _linear(head: Any) -> bool:
    """One linear layer, also where LoRA trains it in full (peft wraps it, and the wrapper calls the copy
    it trains)."""
    return isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear)


def _pooled(base: Any, first: torch.Tensor) -> torch.Tensor:
    """[S, H] pooled outputs of the sequences whose first hidden states are `first` [S, H], as the
    backbone's forward pools them: a pooler reading token 0 of [B, T, H] (BERT), or a linear layer
    followed by `pooler_activation` (ALBERT)."""
    if isinstance(base.pooler, torch.nn.Linear):
        return base.pooler_activation(base.pooler(first))
    return base.pooler(first[:, None])


def _alibi(config: Any) -> bool:
    nested = getattr(config, "attn_config", None)  # MPT keeps it there
    nested = nested if isinstance(nested, dict) else getattr(nested, "__dict__", {})
    return bool(getattr(config, "alibi", False) or nested.get("alibi")
                or getattr(config, "position_embedding_type", None) == "alibi")


def attention_window(config: Any) -> int | None:
    """The sliding window some of the model's layers attend within (Mistral, Gemma 2/3, Qwen with
    use_sliding_window); None where every layer attends to the whole sequence."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def window_too_short(config: Any, longest: int) -> int | None:
    """The model's sliding window where a sequence of `longest` tokens is longer than it: packed batches
    mask by sequence, not by the window, so such a sequence would attend further back than the model does
    when it scores it padded. None where packing is safe."""
    window = attention_window(config)
    return window if window is not None and longest > window else None


def check_attention_window(config: Any, longest: int) -> None:
    """window_too_short's SettingsError: training does not pack such sequences."""
    window = window_too_short(config, longest)
    if window is not None:
        from rm_lib.errors import SettingsError

        raise SettingsError(f"train.padding_free: this model attends within a sliding window of {window} tokens, "
                            f"which packed batches do not apply, and a training sequence has {longest} tokens; set "
                            f"train.padding_free=false, or filter.max_token_length to at most {window}")


def packed_rewards(inner: Any, batch: PackedBatch) -> torch.Tensor:
    """One float reward per packed sequence, in `pack_pairs` order; `inner` is the transformers model
    under any DDP or peft wrapper (LoRA layers sit inside it)."""
    kind = pooling(inner)
    if kind is None:
        raise ValueError(f"{type(inner).__name__} scores no packed rows: {why_not_packed(inner)}")
    base_name = inner.base_model_prefix
    attn = getattr(inner.config, "_attn_implementation", "eager")
    dtype = next(inner.parameters()).dtype
    if torch.is_autocast_enabled(batch.input_ids.device.type):
        dtype = torch.get_autocast_dtype(batch.input_ids.device.type)
    if batch.prefix_ids is not None and kind != "last":
        raise ValueError("shared-prompt packing needs a causal decoder: an encoder's prompt would see both answers")
    base = getattr(inner, base_name)
    flex = attn == "flex_attention"
    # inductor's CPU flex kernel builds for fixed shapes only (torch 2.13)
    compiles = any_width_compiles() if flex and batch.input_ids.device.type != "cpu" else contextlib.nullcontext()
    with compiles:
        if attn == VARLEN:  # no mask: each layer reads the layout (built here from device ids, it costs a sync)
            layout = batch.varlen or varlen_layout(batch.segment_ids, causal=kind == "last",
                                                   prefix_ids=batch.prefix_ids).to(batch.input_ids.device)
            what_to_see = {LAYOUT_KWARG: layout}
        elif flex:
            what_to_see = {"attention_mask": flex_block_mask(batch.segment_ids, causal=kind == "last",
                                                             prefix_ids=batch.prefix_ids)}
        else:
            what_to_see = {"attention_mask": block_mask(batch.segment_ids, causal=kind == "last",
                                                        boolean=attn in ("sdpa", FP32_SDPA), dtype=dtype,
                                                        prefix_ids=batch.prefix_ids)}
        hidden = base(input_ids=batch.input_ids, position_ids=batch.position_ids, **what_to_see).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    if kind == "last":
        scores = inner.score(flat[batch.last])
    else:
        scores = inner.classifier(inner.dropout(_pooled(base, flat[batch.first])))
    scores = scores.squeeze(-1).float()
    if scores.shape != batch.first.shape:  # an [S, 1] would broadcast against [S] margins in the loss
        raise ValueError(f"{type(inner).__name__} gave packed scores of shape {tuple(scores.shape)}, not one "
                         f"per sequence ({batch.first.shape[0]})")
    return scores

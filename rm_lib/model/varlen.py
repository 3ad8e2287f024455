"""Packed rows through FlashAttention's variable-length kernel (torch.nn.attention.varlen): every
sequence attends only to itself, told apart by offsets, with no mask built and nothing compiled.

A packed batch is cut into query sequences, runs of tokens of one segment (a stretch of padding is
one too, so every output is defined). With shared prompts a pair lies as prefix | chosen rest |
rejected rest: the prefix and the chosen rest form one causal sequence; the rejected rest's keys are
gathered (the prefix, then the rejected rest) and the kernel's causal mask, aligned to the last key
as FlashAttention aligns it where a sequence has more keys than queries, lets each rejected token see
the whole prefix and the rejected tokens up to itself. On a device without the kernel (the CPU) the
same layout is computed sequence by sequence with SDPA: for checking, not for speed."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

import torch

from rm_lib.errors import DevicePathError
from rm_lib.model.batching import to_device

VARLEN = "rm_varlen"  # the name transformers knows the attention function by
# the most the kernel's output and gradients may differ from SDPA's on the check layout, against the
# largest value of each (at least 1): bf16 rounding stays near 5e-3 (on a CPU stand-in); a causal mask
# aligned to the wrong end differs by about 1
KERNEL_TOLERANCE = 0.1
LAYOUT_KWARG = "rm_varlen_layout"  # the keyword that carries the layout from the model's forward to each layer


@dataclass
class VarlenLayout:
    cu_q: torch.Tensor  # [N + 1] int32: where each query sequence starts in the flattened rows, then the end
    cu_k: torch.Tensor  # [N + 1] int32: the same for the keys
    max_q: int
    max_k: int
    kv_index: torch.Tensor | None  # [keys] flat token index of each key; None: the keys are the queries
    causal: bool
    q_bounds: tuple[int, ...]  # cu_q on the host (the sequence-by-sequence path reads it)
    k_bounds: tuple[int, ...]

    def to(self, device: torch.device) -> VarlenLayout:
        return replace(self, cu_q=to_device(self.cu_q, device), cu_k=to_device(self.cu_k, device),
                       kv_index=None if self.kv_index is None else to_device(self.kv_index, device))


def varlen_layout(segment_ids: torch.Tensor, *, causal: bool, prefix_ids: torch.Tensor | None = None) -> VarlenLayout:
    """The query sequences of a packed batch and the keys of each ([R, W] ids as the packers lay them
    out: each segment in one run of columns, padding ids negative; `prefix_ids`: the segment a token
    may also see). Reads the ids, so build it where they are on the host."""
    flat = segment_ids.reshape(-1).cpu()
    stretch = torch.where(flat < 0, -1, flat)  # padding, whatever its ids: one run per stretch
    starts = torch.cat([torch.zeros(1, dtype=torch.long),
                        (stretch[1:] != stretch[:-1]).nonzero().flatten() + 1]).tolist()
    ends = starts[1:] + [flat.numel()]
    ids = stretch[starts].tolist()
    prefixes = prefix_ids.reshape(-1).cpu()[starts].tolist() if prefix_ids is not None else ids
    run_of = {s: (a, b) for a, b, s in zip(starts, ends, ids) if s >= 0}
    sequences: list[tuple[int, int, list[tuple[int, int]]]] = []  # queries [a, b) and their key ranges
    for a, b, segment, prefix in zip(starts, ends, ids, prefixes):
        if segment < 0 or prefix == segment or prefix not in run_of:  # padding, a prefix, or nothing shared
            sequences.append((a, b, [(a, b)]))
            continue
        p = run_of[prefix]
        if sequences and sequences[-1] == (*p, [p]) and p[1] == a:  # prefix | chosen rest: one sequence
            sequences[-1] = (p[0], b, [(p[0], b)])
        else:  # rejected rest: its keys are the prefix and itself
            sequences.append((a, b, [p, (a, b)]))
    q_lengths = [b - a for a, b, _ in sequences]
    k_lengths = [sum(e - s for s, e in keys) for _, _, keys in sequences]
    q_bounds = tuple(accumulate(q_lengths, initial=0))
    gathered = any(keys != [(a, b)] for a, b, keys in sequences)
    kv_index = torch.cat([torch.arange(s, e) for _, _, keys in sequences for s, e in keys]) if gathered else None
    k_bounds = tuple(accumulate(k_lengths, initial=0)) if gathered else q_bounds
    return VarlenLayout(torch.tensor(q_bounds, dtype=torch.int32), torch.tensor(k_bounds, dtype=torch.int32),
                        max(q_lengths), max(k_lengths), kv_index, causal, q_bounds, k_bounds)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function form: [R, H, W, D] query, key and value of packed rows, the
    layout under LAYOUT_KWARG; returns [R, W, H, D]."""
    layout: VarlenLayout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise ValueError(f"{VARLEN} attention scores packed batches only (rm_lib.model.packing.packed_rewards)")
    if dropout:
        raise ValueError(f"{VARLEN} attention applies no attention dropout; train with train.disable_dropout=true")
    # what the kernel does not apply would train another attention than the model is scored with
    unsupported = [name for name, off in (("softcap", lambda v: v is None or v == 0), ("s_aux", lambda v: v is None))
                   if not off(kwargs.get(name))]
    if unsupported:
        raise ValueError(f"{VARLEN} attention does not apply this model's {' and '.join(unsupported)}; train with "
                         "train.attention=auto")
    rows, heads, width, dim = query.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.transpose(1, 2).reshape(rows * width, t.shape[1], dim).contiguous()
        return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t  # grouped keys

    q, k, v = flat(query), flat(key), flat(value)
    if layout.kv_index is not None:
        k, v = k.index_select(0, layout.kv_index), v.index_select(0, layout.kv_index)
    dtype = v.dtype  # autocast's: rotary embeddings may have left the query and key in fp32
    out = attend(q.to(dtype), k.to(dtype), v, layout, scaling)
    return out.view(rows, width, heads, dim), None


@torch.compiler.disable
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout,
           scale: float | None) -> torch.Tensor:
    """[queries, H, D] attention output of flattened query, key and value sequences. Never compiled:
    under `train.compile` a layer compiles around it, so the layout's sizes, which change with every
    forward, are nothing a compiled graph depends on."""
    if not q.is_cuda:
        return _sequence_by_sequence(q, k, v, layout, scale)
    kernel = cuda_kernel()
    if kernel is None:
        raise RuntimeError(f"{VARLEN} attention needs torch.nn.attention.varlen (torch 2.10 or later); "
                           f"torch {torch.__version__} has none")
    return call_kernel(*kernel, q, k, v, layout, scale)


def call_kernel(function: Any, takes_window: bool, takes_scale: bool, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, layout: VarlenLayout, scale: float | None) -> torch.Tensor:
    """`function` (torch's varlen_attn) called as its torch release takes it."""
    options: dict[str, Any] = ({"window_size": (-1, 0) if layout.causal else (-1, -1)} if takes_window
                               else {"is_causal": layout.causal})
    if takes_scale:
        options["scale"] = scale
    elif scale is not None:  # torch 2.10's kernel scales by 1 / sqrt(D) only
        q = q * (scale * q.shape[-1] ** 0.5)
    return function(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, **options)


@functools.cache
def cuda_kernel() -> tuple[Any, bool, bool] | None:
    """torch's varlen_attn, and whether it takes `window_size` (torch 2.11 on; 2.10: `is_causal`) and
    `scale`; None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in parameters, "scale" in parameters


def _sequence_by_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VarlenLayout,
                          scale: float | None) -> torch.Tensor:
    """The kernel's result, one SDPA per sequence; a causal mask with more keys than queries aligned
    to the last key, as FlashAttention aligns it."""
    pieces = []
    for i in range(len(layout.q_bounds) - 1):
        qa, qb, ka, kb = layout.q_bounds[i], layout.q_bounds[i + 1], layout.k_bounds[i], layout.k_bounds[i + 1]
        mask = None
        if layout.causal:
            mask = torch.ones(qb - qa, kb - ka, dtype=torch.bool, device=q.device).tril((kb - ka) - (qb - qa))
        out = torch.nn.functional.scaled_dot_product_attention(
            q[qa:qb].transpose(0, 1), k[ka:kb].transpose(0, 1), v[ka:kb].transpose(0, 1), attn_mask=mask,
            scale=scale)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


@functools.cache
def register_varlen() -> str:
    """The attention function under VARLEN, with no mask function: transformers then builds no mask
    for it (the layout says what each token sees). Returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


def kernel_disagreement(kernel: tuple[Any, bool, bool], device: torch.device | str, dtype: torch.dtype) -> float:
    """The largest difference between `kernel` (as `cuda_kernel` gives it) and SDPA sequence by
    sequence in fp32, outputs and the gradients of query, key and value, on a small layout with what
    training uses: a prompt and its chosen answer as one causal sequence, a rejected answer with
    gathered keys (more keys than queries), and a pair that shares nothing."""
    from rm_lib.model.packing import pack_pairs_shared  # packing builds on this module

    pairs = [{"input_ids_chosen": [1] * 40 + [2] * 9, "input_ids_rejected": [1] * 40 + [3] * 13},
             {"input_ids_chosen": [4] * 7, "input_ids_rejected": [5] * 11}]
    batch = pack_pairs_shared(pairs, 0, one_row=True, multiple=1)
    layout = varlen_layout(batch.segment_ids, causal=True, prefix_ids=batch.prefix_ids).to(device)
    tokens = batch.input_ids.numel()
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(tokens, 4, 64, generator=generator)
    k, v = (torch.randn(tokens, 4, 64, generator=generator) for _ in range(2))
    if layout.kv_index is not None:
        k, v = k.index_select(0, layout.kv_index.cpu()), v.index_select(0, layout.kv_index.cpu())
    weights = torch.randn(tokens, 4, 64, generator=generator)  # what the output's gradient is

    def outputs_and_gradients(attention: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = attention(*inputs)
        (out.float() * weights.to(out.device)).sum().backward()
        return [t.detach().float().cpu() for t in (out, *(t.grad for t in inputs))]

    with torch.enable_grad():
        expected = outputs_and_gradients(lambda *t: _sequence_by_sequence(*t, layout, 0.125), [q, k, v])
        got = outputs_and_gradients(lambda *t: call_kernel(*kernel, *t, layout, 0.125),
                                    [t.to(device, dtype) for t in (q, k, v)])
    # against the largest value of each: gradients grow with the number of keys a token sees
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1.0)) for a, b in zip(got, expected))


@functools.cache
def check_kernel(device: str, dtype: torch.dtype) -> float:
    """Before a run trains with the kernel: it must agree with SDPA on `kernel_disagreement`'s layout
    (a torch release that aligned the causal mask otherwise would train a wrong model without a word).
    Once per process, device and dtype; returns the difference."""
    kernel = cuda_kernel()
    if kernel is None:
        raise DevicePathError(f"train.attention: varlen needs torch.nn.attention.varlen (torch 2.10 or later); "
                              f"torch {torch.__version__} has none. Use auto")
    worst = kernel_disagreement(kernel, device, dtype)
    if not worst <= KERNEL_TOLERANCE:
        raise DevicePathError(f"train.attention: varlen: torch {torch.__version__}'s variable-length kernel differs "
                              f"from SDPA by {worst:.3g} (at most {KERNEL_TOLERANCE} allowed) on a check layout of "
                              "shared prompts; it would train a wrong model. Use train.attention=auto (flex_attention)")
    return worst

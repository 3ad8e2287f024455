"""SDPA with its inputs in fp32, for training under bf16 autocast on a CPU.

On a CPU with AMX, bf16 autocast makes the matrix products 3.5x faster, but SDPA's bf16 CPU backward
is 5x slower than its fp32 one: the step gains 1.24x. Attention in fp32, the rest in bf16, gains
1.84x (BENCHMARKS.md, "Where a CPU step's time goes"). Registered with transformers under its own
name, so no other model in the process changes; the trainer switches to it for the run and back."""
from __future__ import annotations

import functools
from typing import Any

import torch

FP32_SDPA = "rm_sdpa_fp32"


def sdpa_in_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention on fp32 query, key and value; the output in the value's dtype (what
    autocast's projections gave: a query may be fp32 already, from rotary embeddings)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = value.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


@functools.cache
def register_fp32_sdpa() -> str:
    """The attention function and its mask rule (SDPA's) under FP32_SDPA; returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(FP32_SDPA, sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    return FP32_SDPA

"""Modes a model trains in, switched on for a run and off after it: no dropout, activation
checkpointing, another attention implementation, compiled layers."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from rm_lib.errors import SettingsError
from rm_lib.model.attention import FP32_SDPA, register_fp32_sdpa
from rm_lib.model.modeling import set_attention, unwrap
from rm_lib.model.varlen import VARLEN, register_varlen


def _is_drop_rate(name: str, value: Any) -> bool:
    return type(value) is float and "drop" in name.lower()


@contextlib.contextmanager
def dropout_disabled(model: torch.nn.Module) -> Iterator[None]:
    """No dropout anywhere while the block runs: nn.Dropout modules, and the rates that modules pass to
    F.dropout, to the attention kernel or to LayerDrop themselves (OPT's `dropout`, Bloom's
    `hidden_dropout`, Starcoder2's `residual_dropout`, `attention_dropout`, `layerdrop`), or read from
    the config at each forward (Falcon). The configs get their rates back at the end: they are saved
    with the model. LoRA's own dropout (train.lora_dropout, on the adapters' input) stays: it is the
    one rate set for this run (0, the default, is none); disabling it too left the setting without
    effect while the records said it was applied."""
    configs: dict[int, Any] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".lora_dropout." not in f".{path}.":
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_drop_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "__dict__"):
            configs.setdefault(id(config), config)
    saved = [(config, name, value) for config in configs.values()
             for name, value in list(vars(config).items()) if _is_drop_rate(name, value) and value]
    for config, name, _ in saved:
        setattr(config, name, 0.0)
    try:
        yield
    finally:
        for config, name, value in saved:
            setattr(config, name, value)


def checkpoint_layers(model: Any, count: int | None) -> None:
    """Activation checkpointing on for the first `count` transformer layers of `model` (None: all),
    off for the rest: each layer checkpointed frees its activations and is run again in the backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = unwrap(model)
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if count is not None:
        layers = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < count


@contextlib.contextmanager
def attention_as(model: Any, implementation: str | None) -> Iterator[None]:
    """Inside, `model` (under any wrapper) computes attention with `implementation` (None: its own);
    after, with its own again, also when what ran inside raised."""
    inner = unwrap(model)
    own = inner.config._attn_implementation
    if implementation in (None, own):
        yield
        return
    if implementation == FP32_SDPA:
        register_fp32_sdpa()
    if implementation == VARLEN:
        register_varlen()
    set_attention(inner, implementation)
    try:
        yield
    finally:
        inner.set_attn_implementation(own)


@contextlib.contextmanager
def compiled_layers(model: Any) -> Iterator[int]:
    """Inside, each transformer layer of `model` runs compiled by torch.compile (fused kernels, fewer
    launches); after, plainly again. Yields how many layers. The layers share their code, so one
    compile serves them all (and, under `any_width_compiles`, every row width)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = unwrap(model)
    layers = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise SettingsError(f"train.compile: {type(inner).__name__} has no layers transformers marks as "
                            "its transformer layers; set train.compile=false")
    for layer in layers:
        layer.compile()
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set

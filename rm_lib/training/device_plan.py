"""How a training run uses its device: attention kernel, tokens per forward, activation checkpointing,
optimizer. The `auto` settings resolve here, from the device and the model's shape, by pure rules.

On a GPU the packed rows go through flex_attention with a block mask, which skips the 128 x 128
blocks the block-diagonal mask excludes (a dense [rows, 1, W, W] mask keeps SDPA off its fast
kernels and grows with W^2); every sequence of a forward then fits in one row, so the budget is in
tokens. On a CPU the dense masked SDPA stays: it is the fastest path there, and flex_attention has
no backward on a CPU. Under bf16 autocast on a CPU, SDPA gets fp32 inputs (rm_lib.model.attention):
its bf16 backward there is 5x slower than its fp32 one."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rm_lib.errors import SettingsError
from rm_lib.model.attention import FP32_SDPA
from rm_lib.model.varlen import VARLEN

GPU_TOKENS_PER_FORWARD = 65_536  # enough work per forward to keep a large GPU busy
CPU_TOKENS_PER_FORWARD = 8_192
MEMORY_HEADROOM = 0.85  # of the free memory: the allocator's fragmentation and the CUDA context
# of a limit the user set (train.gpu_memory_gib), which bounds the allocator's peak: the estimate's own
# error (0.5% on an H200 run, BENCHMARKS.md)
LIMIT_MARGIN = 0.95


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What the plan expects a GPU run to hold at its peak: `state` bytes of weights, gradients and
    AdamW moments, and `per_token` bytes of activations for each of at most `tokens` tokens a forward."""
    state: int
    per_token: int
    tokens: int

    def peak(self, tokens: int | None = None) -> int:
        """The peak for a forward of `tokens` (default: the most the plan allows for)."""
        return self.state + (self.tokens if tokens is None else tokens) * self.per_token


@dataclass(frozen=True)
class DevicePlan:
    attention: str | None  # the implementation to train with; None: the model's own
    tokens_per_forward: int | None
    gradient_checkpointing: bool
    fused_adamw: bool
    why: str  # one line for the log
    # with checkpointing on: how many of the model's layers, the first ones, are checkpointed; None: all
    checkpointed_layers: int | None = None
    memory: MemoryEstimate | None = None  # where the plan weighed the GPU's memory

    def attention_used(self, loaded_attention: str) -> str:
        """The attention implementation the run trains with: the plan's, or the model's own
        (`loaded_attention`, its config's `_attn_implementation`) where the plan keeps that."""
        return "varlen" if self.attention == VARLEN else self.attention or loaded_attention

    def record(self, loaded_attention: str) -> dict:
        """What a run's summary keeps of its plan; `attention` as the log's first line says it."""
        return {"attention": self.attention_used(loaded_attention), "tokens_per_forward": self.tokens_per_forward,
                "gradient_checkpointing": self.gradient_checkpointing, "checkpointed_layers": self.checkpointed_layers,
                "fused_adamw": self.fused_adamw, "why": self.why,
                "predicted_peak_mib": self.memory.peak() / 2**20 if self.memory else None}

    def describe(self, loaded_attention: str) -> str:
        attention = self.attention_used(loaded_attention)
        checkpointing = "off"
        if self.gradient_checkpointing:
            checkpointing = "on" if self.checkpointed_layers is None else f"on for the first {self.checkpointed_layers}"
        return (f"attention {attention}, "
                f"{self.tokens_per_forward or 'all'} tokens per forward, "
                f"activation checkpointing {checkpointing}, "
                f"{'fused ' if self.fused_adamw else ''}AdamW ({self.why})"
                + (f", predicted peak {self.memory.peak() / 2**20:,.0f} MiB" if self.memory else ""))


def arithmetic(device: Any) -> dict:
    """What, beside its settings and data, decides how a run's float sums round: the same on another
    machine trains the same weights byte for byte; another torch build, device or thread count trains
    weights that differ in their last digits (2 CPU threads and 1 did, by up to 8e-5)."""
    import torch

    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name() if device.type == "cpu"
            else None)  # another accelerator by its type alone, not the host's CPU
    return {"torch": torch.__version__, "device": f"{device.type}: {name}" if name else device.type,
            "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_shape(model: Any) -> ModelShape:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return ModelShape(parameters=sum(p.numel() for p in model.parameters()),
                      trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      layers=int(getattr(config, "num_hidden_layers", 0) or 0), hidden=hidden,
                      intermediate=int(getattr(config, "intermediate_size", 0) or 4 * hidden))


def activation_bytes_per_token(shape: ModelShape, checkpointed: int | bool, gathered_keys: bool = False) -> int:
    """Estimated bf16 activations kept for backward, per token, with the first `checkpointed` layers
    checkpointed (True: all of them). A layer keeps about 18h + 4i bytes per token (34h at i = 4h with
    fused attention, Korthikanti et al. 2022); a checkpointed one keeps its 2h-byte input, and is
    recomputed in full, one at a time, once the backward reaches it. By then the layers after it have
    freed theirs: with one layer or more left whole, the peak is where the forward ends; with every
    layer checkpointed, it is the last layer's recompute, which comes first in the backward.
    `gathered_keys` (varlen with shared prompts): the keys and values gathered for rejected answers,
    kept for the kernel's backward; at most one more of each per token, 4h bytes."""
    per_layer = 18 * shape.hidden + 4 * shape.intermediate + (4 * shape.hidden if gathered_keys else 0)
    k = shape.layers if checkpointed is True else min(int(checkpointed), shape.layers)
    if k == shape.layers:
        return shape.layers * 2 * shape.hidden + per_layer
    return k * 2 * shape.hidden + (shape.layers - k) * per_layer


@dataclass(frozen=True)
class Sharding:
    """How FSDP splits the training state: the weights, gradients and AdamW moments, each `processes`
    ways. `weights_gathered`: every layer's weights stay whole from forward to backward besides each
    process's share (SHARD_GRAD_OP, FSDP2's `reshard_after_forward: false`); otherwise only the layer
    computing and the one fetched ahead are."""
    processes: int = 1
    weights_gathered: bool = False


UNSHARDED = Sharding()  # one process, or DDP: each holds the whole state


def state_bytes(shape: ModelShape, sharding: Sharding = UNSHARDED) -> int:
    """fp32 weights, and for the trainable ones fp32 gradients and AdamW's two moments, whole or split
    as `sharding` says. Split, each process holds its share and what is whole at a time: two layers'
    weights (all of them where they stay gathered) and one layer's gradients before they are scattered."""
    n, layers = sharding.processes, max(shape.layers, 1)
    weights, gradients, moments = 4 * shape.parameters, 4 * shape.trainable, 8 * shape.trainable
    if n <= 1:
        return weights + gradients + moments
    gathered = weights if sharding.weights_gathered else 2 * weights // layers
    return weights // n + gathered + gradients // n + gradients // layers + moments // n


def plan(*, device_type: str, packed: bool, supports_flex: bool, shape: ModelShape, free_bytes: int | None,
         attention: str = "auto", tokens_per_forward: int | str | None = "auto",
         gradient_checkpointing: bool | str = "auto", precision: str = "no",
         loaded_attention: str = "sdpa", supports_varlen: bool = False,
         largest_forward: int | None = None, limit_bytes: int | None = None,
         sharding: Sharding = UNSHARDED, switches_attention: bool = True) -> DevicePlan:
    """Resolve the `auto` settings; values the user set are kept as they are. `precision`: the
    autocast the run trains under (accelerate's mixed_precision); `loaded_attention`: the model's own;
    `switches_attention`: the model can be told to compute attention otherwise (not DeBERTa-v2's, nor
    most remote code's);
    `supports_varlen`: this torch has FlashAttention's variable-length kernel; `largest_forward`: the
    most tokens one forward of this run's data can hold (None: unknown), what memory is planned for
    where it is below the budget per forward; `limit_bytes`: the most GPU memory the run may use
    (train.gpu_memory_gib), where less than is free; `sharding`: how the processes split the
    weights, gradients and AdamW state (`state_bytes`)."""
    gpu = device_type == "cuda"
    # one fused kernel for the whole update on a CPU too (a fifth of the per-parameter loop's time there)
    fused = device_type in ("cuda", "cpu")
    if attention == "flex_attention" and not gpu:
        raise SettingsError("train.attention: flex_attention has no backward pass on a CPU; use auto (masked SDPA "
                            "there) or sdpa")
    if attention == "varlen":
        _check_varlen(gpu=gpu, packed=packed, precision=precision, supports_varlen=supports_varlen)
    if attention == "auto":
        attention_choice = "flex_attention" if gpu and packed and supports_flex else None
        if device_type == "cpu" and precision == "bf16" and loaded_attention == "sdpa" and switches_attention:
            attention_choice = FP32_SDPA  # SDPA's bf16 CPU backward is 5x slower than its fp32 one
    else:
        attention_choice = VARLEN if attention == "varlen" else attention
    if tokens_per_forward == "auto":
        wanted: int | None = GPU_TOKENS_PER_FORWARD if gpu else CPU_TOKENS_PER_FORWARD
    else:
        wanted = tokens_per_forward  # type: ignore[assignment]
    tokens = wanted if largest_forward is None else largest_forward if wanted is None else min(wanted, largest_forward)
    gathered = attention_choice == VARLEN
    state = state_bytes(shape, sharding)

    def estimate(layers: int, most: int) -> MemoryEstimate:
        return MemoryEstimate(state, activation_bytes_per_token(shape, layers, gathered), most)

    if gradient_checkpointing != "auto":
        known = gpu and shape.layers and tokens is not None
        return DevicePlan(attention_choice, wanted, bool(gradient_checkpointing), fused, "as set",
                          memory=estimate(shape.layers if gradient_checkpointing else 0, tokens) if known else None)
    if not gpu or free_bytes is None or not shape.layers or tokens is None:
        return DevicePlan(attention_choice, wanted, False, fused, "on a CPU" if not gpu else "no token budget set")
    usable = MEMORY_HEADROOM * free_bytes
    where = f"{free_bytes / 2**30:.0f} GiB free"
    if limit_bytes is not None and LIMIT_MARGIN * limit_bytes < usable:
        usable, where = LIMIT_MARGIN * limit_bytes, f"the {limit_bytes / 2**30:g} GiB of train.gpu_memory_gib"
        if usable <= state:
            raise SettingsError(f"train.gpu_memory_gib: the weights, gradients and AdamW state alone take "
                                f"{state / 2**30:.1f} GiB, more than {LIMIT_MARGIN:.0%} of "
                                f"{limit_bytes / 2**30:g} GiB; allow more, or train with train.lora=true")
    room = usable - state
    held = f"{tokens} tokens a forward" + (f" at most ({wanted} allowed)" if tokens != wanted else "")
    # the fewest layers that make the forward fit, the first ones; never all of them: the last
    # layer's recompute comes at once, and would save nothing
    for k in range(shape.layers):
        if tokens * activation_bytes_per_token(shape, k, gathered) <= room:
            if k == 0:
                return DevicePlan(attention_choice, wanted, False, True, f"{held} fit without checkpointing in {where}",
                                  memory=estimate(0, tokens))
            return DevicePlan(attention_choice, wanted, True, True,
                              f"{held} need {k} of {shape.layers} layers checkpointed in {where}",
                              checkpointed_layers=k, memory=estimate(k, tokens))
    most = shape.layers - 1
    fits = int(room // activation_bytes_per_token(shape, most, gathered)) if room > 0 else 0
    if tokens_per_forward == "auto":  # fewer tokens per forward, never fewer than one block of rows
        budget: int | None = max(min(tokens, fits // 1024 * 1024), 1024)
    else:
        budget = wanted
    return DevicePlan(attention_choice, budget, True, True, f"{held} need checkpointing in {where}",
                      checkpointed_layers=most or None,
                      memory=estimate(most or shape.layers, min(tokens, budget or tokens)))


def _check_varlen(*, gpu: bool, packed: bool, precision: str, supports_varlen: bool) -> None:
    if not packed:
        raise SettingsError("train.attention: varlen scores packed batches only; set train.padding_free=true (and "
                            "use a model whose score head rm_lib can unpack) or another attention")
    if gpu and not supports_varlen:
        import torch

        raise SettingsError(f"train.attention: varlen needs torch.nn.attention.varlen (torch 2.10 or later); torch "
                            f"{torch.__version__} has none. Use auto (flex_attention) instead")
    if gpu and precision not in ("bf16", "fp16"):
        raise SettingsError(f"train.attention: varlen computes in bf16 or fp16 on a GPU, and this run trains with "
                            f"mixed precision '{precision}'; set train.mixed_precision=bf16")

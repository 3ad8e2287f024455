"""The `auto` training settings: flex_attention, tokens per forward, activation checkpointing and
fused AdamW follow the device and the model's shape; what a user set is kept."""
from __future__ import annotations

import pytest

from rm_lib.errors import SettingsError
from rm_lib.model.attention import FP32_SDPA
from rm_lib.settings import load_params
from rm_lib.training.device_plan import (
    CPU_TOKENS_PER_FORWARD,
    GPU_TOKENS_PER_FORWARD,
    ModelShape,
    activation_bytes_per_token,
    plan,
)

GiB = 2**30
PYTHIA_1B = ModelShape(parameters=1_011_781_632, trainable=1_011_781_632, layers=16, hidden=2048,
                       intermediate=8192)
SMALL = ModelShape(parameters=30_000_000, trainable=30_000_000, layers=4, hidden=256, intermediate=1024)


def test_a_cpu_keeps_the_dense_masked_path_and_its_budget():
    p = plan(device_type="cpu", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=None)
    assert (p.attention, p.tokens_per_forward, p.gradient_checkpointing, p.fused_adamw) == \
        (None, CPU_TOKENS_PER_FORWARD, False, True)
    assert not plan(device_type="mps", packed=True, supports_flex=True, shape=SMALL, free_bytes=None).fused_adamw


def test_a_gpu_trains_packed_rows_with_flex_attention_and_fused_adamw():
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=SMALL, free_bytes=80 * GiB)
    assert (p.attention, p.tokens_per_forward, p.gradient_checkpointing, p.fused_adamw) == \
        ("flex_attention", GPU_TOKENS_PER_FORWARD, False, True)
    padded = plan(device_type="cuda", packed=False, supports_flex=True, shape=SMALL, free_bytes=80 * GiB)
    assert padded.attention is None  # a padded batch has no block mask to skip
    no_flex = plan(device_type="cuda", packed=True, supports_flex=False, shape=SMALL, free_bytes=80 * GiB)
    assert no_flex.attention is None


def test_bf16_on_a_cpu_keeps_attention_in_fp32():
    """Under bf16 autocast on a CPU, SDPA's backward is 5x slower in bf16 than in fp32: attention stays
    fp32 there, for SDPA models only, and only at auto."""
    cpu = dict(device_type="cpu", packed=True, supports_flex=True, shape=SMALL, free_bytes=None)
    assert plan(**cpu, precision="bf16").attention == FP32_SDPA
    assert plan(**cpu, precision="no").attention is None
    assert plan(**cpu, precision="bf16", loaded_attention="eager").attention is None  # a model without SDPA
    assert plan(**cpu, precision="bf16", attention="sdpa").attention == "sdpa"  # what the user set
    gpu = plan(device_type="cuda", packed=True, supports_flex=True, shape=SMALL, free_bytes=80 * GiB, precision="bf16")
    assert gpu.attention == "flex_attention"


def test_checkpointing_is_chosen_when_the_budget_needs_it():
    # Pythia-1B: 65,536 tokens of full activations (~68 GiB) and 16 GiB of weights and AdamW state
    # do not fit in 80 GiB; checkpointed (~8 GiB) they do, so the budget stays whole
    assert GPU_TOKENS_PER_FORWARD * activation_bytes_per_token(PYTHIA_1B, False) > 60 * GiB
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB)
    assert p.gradient_checkpointing and p.tokens_per_forward == GPU_TOKENS_PER_FORWARD
    roomy = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=200 * GiB)
    assert not roomy.gradient_checkpointing


def test_a_small_gpu_gets_fewer_tokens_per_forward():
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=24 * GiB)
    assert p.gradient_checkpointing
    assert 1024 <= p.tokens_per_forward < GPU_TOKENS_PER_FORWARD and p.tokens_per_forward % 1024 == 0
    state = 16 * PYTHIA_1B.parameters
    assert state + p.tokens_per_forward * activation_bytes_per_token(PYTHIA_1B, True) <= 0.85 * 24 * GiB


def test_what_the_user_set_is_kept():
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB,
             attention="sdpa", tokens_per_forward=4096, gradient_checkpointing=False)
    assert (p.attention, p.tokens_per_forward, p.gradient_checkpointing) == ("sdpa", 4096, False)
    fixed_budget = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B,
                        free_bytes=24 * GiB, tokens_per_forward=32768)
    assert fixed_budget.tokens_per_forward == 32768 and fixed_budget.gradient_checkpointing


def test_flex_attention_on_a_cpu_is_refused_before_training():
    with pytest.raises(SettingsError, match="train.attention: flex_attention has no backward pass on a CPU"):
        plan(device_type="cpu", packed=True, supports_flex=True, shape=SMALL, free_bytes=None,
             attention="flex_attention")


def test_settings_take_auto_numbers_and_booleans():
    train = load_params(None, []).train
    assert (train.attention, train.max_tokens_per_forward, train.gradient_checkpointing) == ("auto", "auto", "auto")
    train = load_params(None, ["train.max_tokens_per_forward=4096", "train.gradient_checkpointing=true",
                               "train.attention=flex_attention"]).train
    assert (train.attention, train.max_tokens_per_forward, train.gradient_checkpointing) == \
        ("flex_attention", 4096, True)
    assert load_params(None, ["train.max_tokens_per_forward=null"]).train.max_tokens_per_forward is None


@pytest.mark.parametrize("override, named", [("train.attention=flash", "train.attention"),
                                             ("train.max_tokens_per_forward=lots", "train.max_tokens_per_forward"),
                                             ("train.max_tokens_per_forward=0", "train.max_tokens_per_forward"),
                                             ("train.gradient_checkpointing=sometimes",
                                              "train.gradient_checkpointing")])
def test_bad_values_name_the_setting(override, named):
    with pytest.raises(SettingsError, match=named):
        load_params(None, [override])

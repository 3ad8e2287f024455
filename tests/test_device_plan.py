"""The `auto` training settings: flex_attention, tokens per forward, activation checkpointing and
fused AdamW follow the device and the model's shape; what a user set is kept."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from rm_lib.errors import SettingsError
from rm_lib.model.attention import FP32_SDPA
from rm_lib.settings import load_params
from rm_lib.training.device_plan import (
    CPU_TOKENS_PER_FORWARD,
    GPU_TOKENS_PER_FORWARD,
    ModelShape,
    Sharding,
    activation_bytes_per_token,
    plan,
    state_bytes,
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


def test_the_summary_records_the_attention_the_log_names():
    """The plan keeps the model's own attention as None; the summary and the Dagster metadata say which one
    that is, as the log's first line does, not null."""
    cpu = plan(device_type="cpu", packed=True, supports_flex=True, shape=SMALL, free_bytes=None)
    assert cpu.attention is None
    assert cpu.record("sdpa")["attention"] == "sdpa" and "attention sdpa," in cpu.describe("sdpa")
    assert cpu.record("eager")["attention"] == "eager"
    gpu = plan(device_type="cuda", packed=True, supports_flex=True, shape=SMALL, free_bytes=80 * GiB)
    assert gpu.record("sdpa")["attention"] == "flex_attention"
    bf16 = plan(device_type="cpu", packed=True, supports_flex=True, shape=SMALL, free_bytes=None, precision="bf16")
    assert bf16.record("sdpa")["attention"] == FP32_SDPA and f"attention {FP32_SDPA}," in bf16.describe("sdpa")


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
    # a model that cannot be switched (remote code with SDPA of its own) keeps it: asking would be refused
    assert plan(**cpu, precision="bf16", switches_attention=False).attention is None
    assert plan(**cpu, precision="bf16", attention="sdpa").attention == "sdpa"  # what the user set
    gpu = plan(device_type="cuda", packed=True, supports_flex=True, shape=SMALL, free_bytes=80 * GiB, precision="bf16")
    assert gpu.attention == "flex_attention"


def fits(shape: ModelShape, tokens: int, layers: int, free: int) -> bool:
    """What the plan promises: weights, AdamW state and the activations of `tokens` with the first
    `layers` layers checkpointed within 85% of the free memory."""
    return state_bytes(shape) + tokens * activation_bytes_per_token(shape, layers) <= 0.85 * free


def test_checkpointing_is_chosen_when_the_budget_needs_it():
    # Pythia-1B: 65,536 tokens of full activations (~68 GiB) and 16 GiB of weights and AdamW state
    # do not fit in 80 GiB; with a few layers checkpointed they do, so the budget stays whole
    assert GPU_TOKENS_PER_FORWARD * activation_bytes_per_token(PYTHIA_1B, False) > 60 * GiB
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB)
    assert p.gradient_checkpointing and p.tokens_per_forward == GPU_TOKENS_PER_FORWARD
    roomy = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=200 * GiB)
    assert not roomy.gradient_checkpointing


def test_only_as_many_layers_are_checkpointed_as_the_memory_needs():
    """Each checkpointed layer is computed twice: the plan checkpoints the fewest that fit, the first
    ones, so an 80 GiB GPU recomputes 4 of Pythia-1B's 16 layers for a forward of 65,536 tokens."""
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB)
    k = p.checkpointed_layers
    assert k == 4
    assert fits(PYTHIA_1B, GPU_TOKENS_PER_FORWARD, k, 80 * GiB)
    assert not fits(PYTHIA_1B, GPU_TOKENS_PER_FORWARD, k - 1, 80 * GiB)
    assert "4 of 16 layers" in p.why and "on for the first 4" in p.describe("sdpa")
    # each layer checkpointed keeps its input instead of its activations
    assert [activation_bytes_per_token(PYTHIA_1B, n) for n in range(16)] == sorted(
        (activation_bytes_per_token(PYTHIA_1B, n) for n in range(16)), reverse=True)


def test_the_last_layer_is_never_checkpointed_by_the_plan():
    """The backward recomputes the last checkpointed layer first, while the layers before it still hold
    their inputs: checkpointing every layer peaks higher than leaving the last one whole, and costs a
    recompute more."""
    assert activation_bytes_per_token(PYTHIA_1B, 16) > activation_bytes_per_token(PYTHIA_1B, 15)
    assert activation_bytes_per_token(PYTHIA_1B, True) == activation_bytes_per_token(PYTHIA_1B, 16)
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=24 * GiB)
    assert p.gradient_checkpointing and p.checkpointed_layers == 15


def test_memory_is_planned_for_the_largest_forward_the_data_makes():
    """hh-rlhf batches of 16 pairs compute at most ~13k tokens: an 80 GiB GPU holds their activations
    without checkpointing, though not the 65,536 the budget would allow."""
    gpu = dict(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB)
    small = plan(**gpu, largest_forward=13_440)
    assert not small.gradient_checkpointing and small.tokens_per_forward == GPU_TOKENS_PER_FORWARD
    assert "13440 tokens a forward at most" in small.why
    assert plan(**gpu, largest_forward=10**6).checkpointed_layers == plan(**gpu).checkpointed_layers
    unbounded = plan(**{**gpu, "free_bytes": 24 * GiB}, tokens_per_forward=None, largest_forward=13_440)
    assert unbounded.tokens_per_forward is None and unbounded.gradient_checkpointing  # 14 GiB do not fit in 24 GiB


def test_the_plan_predicts_the_peak_it_planned_for():
    """What the log and the run's summary report, for a GPU run to be checked against."""
    gpu = dict(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB)
    p = plan(**gpu, largest_forward=13_440)
    assert p.memory.peak() == state_bytes(PYTHIA_1B) + 13_440 * activation_bytes_per_token(PYTHIA_1B, 0)
    assert p.memory.peak(1000) == state_bytes(PYTHIA_1B) + 1000 * activation_bytes_per_token(PYTHIA_1B, 0)
    assert p.record("sdpa")["predicted_peak_mib"] == p.memory.peak() / 2**20
    assert f"predicted peak {p.memory.peak() / 2**20:,.0f} MiB" in p.describe("sdpa")
    partial = plan(**gpu)
    assert partial.memory.per_token == activation_bytes_per_token(PYTHIA_1B, partial.checkpointed_layers)
    assert plan(device_type="cpu", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=None).memory is None


def test_a_memory_limit_is_planned_for_like_a_smaller_gpu():
    """train.gpu_memory_gib on an 80 GiB GPU: the plan checkpoints the fewest layers that keep its
    predicted peak within 95% of the limit, and runs smaller forwards where even 15 layers would not."""
    state = state_bytes(PYTHIA_1B)
    gpu = dict(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB,
               largest_forward=13_440)
    limit = int((state + 13_440 * activation_bytes_per_token(PYTHIA_1B, 8)) / 0.95) + 1
    p = plan(**gpu, limit_bytes=limit)
    assert p.checkpointed_layers == 8 and p.memory.peak() <= 0.95 * limit
    assert "train.gpu_memory_gib" in p.why
    tight = int((state + 5_000 * activation_bytes_per_token(PYTHIA_1B, 15)) / 0.95)
    fewer = plan(**gpu, limit_bytes=tight)
    assert fewer.checkpointed_layers == 15 and fewer.tokens_per_forward == 4096
    assert fewer.memory.peak() <= 0.95 * tight
    assert plan(**gpu, limit_bytes=100 * GiB) == plan(**gpu)  # above what is free: the free memory rules
    with pytest.raises(SettingsError, match=r"train.gpu_memory_gib: the weights, gradients and AdamW state alone"):
        plan(**gpu, limit_bytes=state)


SEVEN_B = ModelShape(parameters=6_738_415_616, trainable=6_738_415_616, layers=32, hidden=4096, intermediate=11008)


def test_a_sharded_run_plans_for_its_share_of_the_state():
    """FSDP full sharding over 8 GPUs of 80 GiB: a 7B model's 100 GiB of weights, gradients and AdamW
    state are 15 GiB on each (an eighth, 12.6 GiB, and three layers whole): the forwards keep their 65,536 tokens with
    some layers checkpointed, where counting the state whole left 1,024 tokens a forward."""
    gpu = dict(device_type="cuda", packed=True, supports_flex=True, shape=SEVEN_B, free_bytes=80 * GiB)
    whole = plan(**gpu)
    assert state_bytes(SEVEN_B) > 80 * GiB and whole.tokens_per_forward == 1024
    full = Sharding(8)
    sharded = plan(**gpu, sharding=full)
    layer = 4 * SEVEN_B.parameters // 32
    assert abs(state_bytes(SEVEN_B, full) - (state_bytes(SEVEN_B) / 8 + 3 * layer)) < 16
    assert sharded.tokens_per_forward == GPU_TOKENS_PER_FORWARD and 0 < sharded.checkpointed_layers < 32
    assert sharded.memory.peak() <= 0.85 * 80 * GiB


def test_weights_kept_gathered_from_forward_to_backward_count_whole():
    """SHARD_GRAD_OP keeps every layer's weights gathered besides each process's share: 7B on 8 GPUs
    of 80 GiB holds 38 GiB of state, which still trains with 65,536 tokens a forward, and counts
    more than full sharding and less than the whole state."""
    P, layer = SEVEN_B.parameters, 4 * SEVEN_B.parameters // 32
    gathered = Sharding(8, weights_gathered=True)
    assert state_bytes(SEVEN_B, gathered) == 4 * P // 8 + 4 * P + 4 * P // 8 + layer + 8 * P // 8
    assert state_bytes(SEVEN_B, Sharding(8)) < state_bytes(SEVEN_B, gathered) < state_bytes(SEVEN_B)
    gpu = dict(device_type="cuda", packed=True, supports_flex=True, shape=SEVEN_B, free_bytes=80 * GiB)
    grad_op = plan(**gpu, sharding=gathered)
    assert grad_op.tokens_per_forward == GPU_TOKENS_PER_FORWARD and 0 < grad_op.checkpointed_layers < 32
    assert grad_op.memory.peak() <= 0.85 * 80 * GiB
    assert state_bytes(SEVEN_B, Sharding(1)) == state_bytes(SEVEN_B)  # one process splits nothing


def _fsdp(reshard: object, processes: int = 4) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(reshard_after_forward=reshard)
    return SimpleNamespace(num_processes=processes, distributed_type=DistributedType.FSDP,
                           state=SimpleNamespace(fsdp_plugin=plugin))


@pytest.mark.parametrize("reshard, expected", [
    (True, Sharding(4)),  # FSDP2's default
    ("FULL_SHARD", Sharding(4)),
    (False, Sharding(4, weights_gathered=True)),
    ("SHARD_GRAD_OP", Sharding(4, weights_gathered=True)),
    ("2", Sharding(4, weights_gathered=True)),
    ("NO_SHARD", Sharding()),
    ("HYBRID_SHARD", Sharding(2)),  # within a node of 2 of the 4 processes
])
def test_the_state_is_split_as_fsdp_shards_it(reshard, expected, monkeypatch):
    from rm_lib.training.distributed import sharding

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sharding(_fsdp(reshard)) == expected


def test_torchs_sharding_strategies_are_read_by_name_and_ddp_splits_nothing():
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import ShardingStrategy

    from rm_lib.training.distributed import sharding

    assert sharding(_fsdp(ShardingStrategy.FULL_SHARD)) == Sharding(4)
    assert sharding(_fsdp(ShardingStrategy.SHARD_GRAD_OP)) == Sharding(4, weights_gathered=True)
    assert sharding(_fsdp(ShardingStrategy.NO_SHARD)) == Sharding()
    ddp = SimpleNamespace(num_processes=4, distributed_type=DistributedType.MULTI_GPU, state=SimpleNamespace())
    assert sharding(ddp) == Sharding()


def test_a_small_gpu_gets_fewer_tokens_per_forward():
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=24 * GiB)
    assert p.gradient_checkpointing
    assert 1024 <= p.tokens_per_forward < GPU_TOKENS_PER_FORWARD and p.tokens_per_forward % 1024 == 0
    assert fits(PYTHIA_1B, p.tokens_per_forward, p.checkpointed_layers, 24 * GiB)


def test_the_largest_batch_bounds_every_forward_of_every_epoch():
    from rm_lib.model.batching import epoch_batches
    from rm_lib.model.packing import FLEX_BLOCK, largest_batch_tokens, pack_pairs, pack_pairs_shared

    from helpers import shared_prompt_pairs

    rows = shared_prompt_pairs(60, vocab=50, seed=3)
    for shared, packer in ((True, pack_pairs_shared), (False, pack_pairs)):
        bound = largest_batch_tokens(rows, pairs=8, batch_tokens=None, shared_prompt=shared)
        assert bound % FLEX_BLOCK == 0
        widths = [packer([rows[i] for i in batch], 0, one_row=True).input_ids.shape[1]
                  for epoch in range(5) for batch in epoch_batches(rows, 8, seed=1, epoch=epoch, group_by_length=True)]
        assert max(widths) <= bound
        # and no looser than it must be: a batch of the 8 largest pairs reaches it, to the block
        largest = sorted(rows, key=lambda r: packer([r], 0, multiple=1).real_tokens)[-8:]
        assert bound - FLEX_BLOCK < packer(largest, 0, one_row=True).input_ids.shape[1] <= bound
    by_tokens = largest_batch_tokens(rows, pairs=8, batch_tokens=200, shared_prompt=True)
    assert by_tokens == 256  # the budget, in whole blocks
    assert largest_batch_tokens(rows, pairs=8, batch_tokens=10, shared_prompt=True) == FLEX_BLOCK  # a pair alone


def test_what_the_user_set_is_kept():
    p = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB,
             attention="sdpa", tokens_per_forward=4096, gradient_checkpointing=False)
    assert (p.attention, p.tokens_per_forward, p.gradient_checkpointing) == ("sdpa", 4096, False)
    fixed_budget = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B,
                        free_bytes=24 * GiB, tokens_per_forward=32768)
    assert fixed_budget.tokens_per_forward == 32768 and fixed_budget.gradient_checkpointing
    everywhere = plan(device_type="cuda", packed=True, supports_flex=True, shape=PYTHIA_1B, free_bytes=80 * GiB,
                      gradient_checkpointing=True, largest_forward=13_440)
    assert everywhere.checkpointed_layers is None and "activation checkpointing on," in everywhere.describe("sdpa")
    # what the user set is predicted too, for the peak the run reaches to be set beside it
    assert everywhere.memory.peak() == state_bytes(PYTHIA_1B) + 13_440 * activation_bytes_per_token(PYTHIA_1B, 16)


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
                                              "train.gradient_checkpointing"),
                                             ("train.gpu_memory_gib=0", "train.gpu_memory_gib"),
                                             ("train.gpu_memory_gib=lots", "train.gpu_memory_gib")])
def test_bad_values_name_the_setting(override, named):
    with pytest.raises(SettingsError, match=named):
        load_params(None, [override])

"""Padding-free training: packed rows give the rewards, loss and gradients of padded batches."""
from __future__ import annotations

import contextlib
import json
import random

import numpy as np
import pytest
import torch

from rm_lib.errors import DevicePathError
from rm_lib.model.batching import collate_pairs
from rm_lib.model.modeling import load_reward_model, rewards, unwrap
from rm_lib.model.packing import (
    FLEX_BLOCK,
    any_width_compiles,
    block_mask,
    first_fit,
    flex_block_mask,
    pack_pairs,
    pack_pairs_shared,
    packed_rewards,
    pooling,
    shared_prefix,
    why_not_packed,
)

from helpers import assert_same_step, fit_tiny, gradient_step, run_steps, shared_prompt_pairs, tiny_params, write_jsonl


def random_pairs(n: int, vocab: int, seed: int = 0, longest: int = 40) -> list[dict]:
    rng = random.Random(seed)
    seq = lambda: [rng.randrange(5, vocab) for _ in range(rng.randrange(2, longest))]  # noqa: E731
    return [{"input_ids_chosen": seq(), "input_ids_rejected": seq(), "margin": rng.random()} for _ in range(n)]


def test_first_fit_places_every_sequence_once_within_the_width():
    lengths = [9, 1, 4, 7, 3, 3, 10, 2, 6]
    rows = first_fit(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 45 tokens in rows of 10: as few as possible


def test_packed_batch_layout():
    pairs = [{"input_ids_chosen": [5, 6, 7], "input_ids_rejected": [8]},
             {"input_ids_chosen": [9, 10], "input_ids_rejected": [11, 12, 13]}]
    batch = pack_pairs(pairs, pad_token_id=0, use_margin=False)
    flat_ids, flat_pos = batch.input_ids.flatten().tolist(), batch.position_ids.flatten().tolist()
    seqs = [p["input_ids_chosen"] for p in pairs] + [p["input_ids_rejected"] for p in pairs]
    for i, seq in enumerate(seqs):  # every sequence whole, in its own segment, positions from 0
        first, last = batch.first[i].item(), batch.last[i].item()
        assert flat_ids[first:last + 1] == seq
        assert flat_pos[first:last + 1] == list(range(len(seq)))
        assert set(batch.segment_ids.flatten()[first:last + 1].tolist()) == {i}
    assert batch.input_ids.shape == (3, 3)  # 9 tokens in rows as wide as the longest sequence
    assert batch.real_tokens == 9 and batch.padded_tokens == 9
    assert batch.margin is None


def test_a_batch_goes_to_a_gpu_from_pinned_memory_without_a_stream_sync(monkeypatch):
    """A plain host-to-GPU copy waits for the stream: the GPU would run dry at every batch. Every
    tensor of a packed or padded batch is pinned and copied with non_blocking; on a CPU nothing is
    pinned (a CPU build of torch cannot pin). Checked here with the copy recorded, not run."""
    copies = []

    def pin(self):
        pinned = self.clone()
        pinned.is_pinned_here = True
        return pinned

    def copy(self, device, non_blocking=False):
        copies.append((torch.device(device).type, getattr(self, "is_pinned_here", False), non_blocking))
        return self

    pairs = random_pairs(3, 50)
    batches = [pack_pairs(pairs, 0), pack_pairs_shared(pairs, 0), collate_pairs(pairs, 0)]
    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "pin_memory", pin)
        patched.setattr(torch.Tensor, "to", copy)
        for batch in batches:
            batch.to(torch.device("cuda"))
        assert len(copies) == 6 + 7 + 3  # every tensor of each batch (margins included)
        assert set(copies) == {("cuda", True, True)}
        copies.clear()
        batches[1].to(torch.device("cpu"))
    assert set(copies) == {("cpu", False, False)}


@pytest.fixture(params=["sdpa", "eager"])
def attention(request) -> str:
    return request.param


@pytest.fixture(params=["minilm", "decoder"])
def model_path(request, minilm_path, tiny_decoder) -> str:
    return minilm_path if request.param == "minilm" else str(tiny_decoder)


def _model(path: str, attention: str):
    torch.manual_seed(0)
    model = load_reward_model(path, pad_token_id=0)
    model.config._attn_implementation = attention
    return model


def test_packed_rewards_loss_and_gradients_equal_the_padded_ones(model_path, attention):
    model = _model(model_path, attention)
    inner = unwrap(model)
    assert pooling(inner) is not None
    model.train()
    for module in model.modules():  # dropout off, as training runs by default
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pairs = random_pairs(8, min(model.config.vocab_size, 60))

    step = gradient_step(model, torch.tensor([p["margin"] for p in pairs]))

    padded = collate_pairs(pairs, 0)
    packed = pack_pairs(pairs, 0)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # fewer rows: padding saved
    expected = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    got = step(lambda: packed_rewards(inner, packed))
    assert_same_step(got, expected)


def test_a_lora_encoder_packs_to_the_padded_rewards_loss_and_gradients(minilm_path, attention):
    """peft wraps the [CLS] head LoRA trains in full, which was taken for no linear head: a LoRA encoder
    trained on padded batches (the packing it is given now gives the same step)."""
    from rm_lib.model.modeling import add_lora

    model = add_lora(_model(minilm_path, attention), r=4, alpha=8, dropout=0.0, target_modules=None)
    inner = unwrap(model)
    assert pooling(inner) == "first" and why_not_packed(inner) is None
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pairs = random_pairs(8, 60)
    step = gradient_step(model, torch.tensor([p["margin"] for p in pairs]))
    padded = collate_pairs(pairs, 0)
    expected = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    got = step(lambda: packed_rewards(inner, pack_pairs(pairs, 0)))
    assert_same_step(got, expected)


def test_training_padding_free_matches_padded_training(tmp_path, tiny_decoder):
    """Whole runs: the same losses step by step, with less padding computed."""
    rng = random.Random(1)
    words = "good bad great awful fine movie film plot acting story".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    source = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": text(rng.randrange(2, 8)), "chosen": text(rng.randrange(1, 30)),
         "rejected": text(rng.randrange(1, 30))} for _ in range(80)])
    history = {}
    for free in (True, False):
        root = tmp_path / f"free-{free}"
        params = tiny_params(f"train.padding_free={str(free).lower()}", "train.max_steps=6",
                             f"download.source={source}",
                             model=str(tiny_decoder))
        run_steps(params, root, "download", "tokenize", "filter", "train")
        history[free] = [json.loads(line) for line in (root / "data/train/metrics.jsonl").read_text().splitlines()]
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in history.items()}
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    pad = {k: sum(r["padding_fraction"] for r in v if "loss" in r) for k, v in history.items()}
    assert pad[True] < pad[False]


def test_the_shared_prefix_leaves_each_side_its_last_token():
    assert shared_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert shared_prefix([1, 2, 3], [1, 2, 3, 4]) == 2  # one side is a prefix of the other
    assert shared_prefix([5], [5]) == 0 and shared_prefix([1, 2], [3, 2]) == 0


def test_shared_prompt_layout_computes_each_prompt_once():
    pairs = [{"input_ids_chosen": [5, 6, 7, 8], "input_ids_rejected": [5, 6, 9]}]
    batch = pack_pairs_shared(pairs, pad_token_id=0, use_margin=False)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]  # prompt | chosen rest | rejected rest
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the rejected side continues from the prompt
    assert batch.last.tolist() == [3, 4] and batch.real_tokens == 5  # 7 tokens unshared
    assert batch.sequence_tokens == 7  # what tokens/s counts: the pairs' tokens, as a padded batch has them


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rewards_loss_and_gradients_equal_the_unpacked_ones(tiny_decoder, attention):
    model = _model(str(tiny_decoder), attention)
    inner = unwrap(model)
    model.train()
    pairs = shared_prompt_pairs(8, min(model.config.vocab_size, 60))
    step = gradient_step(model, torch.tensor([p["margin"] for p in pairs]))

    padded = collate_pairs(pairs, 0)
    shared = pack_pairs_shared(pairs, 0)
    assert shared.real_tokens < pack_pairs(pairs, 0).real_tokens  # the prompts are computed once
    expected = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    got = step(lambda: packed_rewards(inner, shared))
    assert_same_step(got, expected)


def test_an_encoder_refuses_shared_prompts(minilm_path):
    model = _model(minilm_path, "sdpa")
    with pytest.raises(ValueError, match="causal decoder"):
        packed_rewards(unwrap(model), pack_pairs_shared(shared_prompt_pairs(2, 60), 0))


_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
ALIBI = "ALiBi"  # the bias comes from each token's column, not from the position ids packing gives
NO_BLOCK_MASK = "attention interface"
FAMILIES = {  # model_type, its config in small, and why packed rows cannot give its padded scores (None: they can)
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 4}, None),  # learned absolute positions
    "gpt_neox": (_SMALL, None),
    "qwen2": ({**_SMALL, "num_key_value_heads": 2}, None),
    "gemma": ({**_SMALL, "num_key_value_heads": 2, "head_dim": 8}, None),
    "phi": (_SMALL, None),
    "opt": ({**_SMALL, "ffn_dim": 64, "word_embed_proj_dim": 32}, None),
    "gptj": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4}, None),
    "falcon": ({**_SMALL, "new_decoder_architecture": True, "num_kv_heads": 2}, None),
    "bert": (_SMALL, None),
    "albert": ({**_SMALL, "embedding_size": 16}, None),  # its pooler: a linear layer, then tanh
    "bloom": ({"hidden_size": 32, "n_layer": 2, "n_head": 4}, ALIBI),
    "mpt": ({"d_model": 32, "n_layers": 2, "n_heads": 4}, ALIBI),
    "falcon-rw": ({**_SMALL, "alibi": True}, ALIBI),
    "canine": (_SMALL, NO_BLOCK_MASK),
    "layoutlm": (_SMALL, NO_BLOCK_MASK),
    "luke": ({**_SMALL, "entity_vocab_size": 8, "entity_emb_size": 16}, NO_BLOCK_MASK),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_is_packed_only_where_packed_rows_give_its_padded_scores(family, monkeypatch):
    """Bloom and Falcon-RW crashed on the block mask; MPT scored a shared-prompt layout wrongly (its
    rejected tokens saw the chosen ones as distance); Canine and LayoutLM crashed. Such models train on
    padded batches. Those packed give one score per sequence, the padded one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    small, unpackable = FAMILIES[family]
    torch.manual_seed(0)
    config = AutoConfig.for_model(family.removesuffix("-rw"), num_labels=1, pad_token_id=0, vocab_size=100, **small)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    pairs = shared_prompt_pairs(6, 100)
    padded = collate_pairs(pairs, 0)
    with torch.no_grad():
        expected = rewards(model, padded.input_ids, padded.attention_mask)
        if unpackable:
            assert pooling(model) is None and unpackable in why_not_packed(model)
            with pytest.raises(ValueError, match="scores no packed rows"):
                packed_rewards(model, pack_pairs(pairs, 0))
            packer = pack_pairs_shared if hasattr(model, "score") else pack_pairs
            with monkeypatch.context() as unguarded:  # what packing them would do: crash, or score wrongly
                unguarded.setattr("rm_lib.model.packing.why_not_packed", lambda inner: None)
                try:
                    got = packed_rewards(model, packer(pairs, 0))
                except (ValueError, RuntimeError):
                    return
                assert not torch.allclose(got, expected, atol=1e-4)
            return
        packers = [pack_pairs, pack_pairs_shared] if pooling(model) == "last" else [pack_pairs]
        for packer in packers:
            torch.testing.assert_close(packed_rewards(model, packer(pairs, 0)), expected, atol=1e-5, rtol=1e-4)


def test_a_model_that_cannot_score_packed_rows_trains_on_padded_batches(tmp_path, tiny_decoder, capsys):
    from transformers import AutoModelForSequenceClassification, BloomConfig

    from rm_lib.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_decoder))
    torch.manual_seed(0)
    bloom = AutoModelForSequenceClassification.from_config(BloomConfig(
        vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4, num_labels=1,
        pad_token_id=tokenizer.pad_token_id))
    result, _, _ = fit_tiny(tmp_path, tiny_decoder, model=bloom)
    assert "padding_free is not supported for BloomForSequenceClassification" in capsys.readouterr().out
    assert result.steps == 3 and np.isfinite(result.history[-1]["loss"])


def test_training_with_shared_prompts_matches_per_sequence_packing(tmp_path, tiny_decoder):
    """Whole runs on conversations that share their prompt: the same losses, fewer tokens computed."""
    rng = random.Random(2)
    words = "good bad great awful fine movie film plot acting story".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    source = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": text(rng.randrange(10, 30)), "chosen": text(rng.randrange(1, 10)),
         "rejected": text(rng.randrange(1, 10))} for _ in range(80)])
    history = {}
    for shared in (True, False):
        params = tiny_params(f"train.shared_prompt={str(shared).lower()}", "train.max_steps=6",
                             f"download.source={source}", model=str(tiny_decoder))
        run_steps(params, tmp_path / f"shared-{shared}", "download", "tokenize", "filter", "train")
        history[shared] = [json.loads(line) for line in
                           (tmp_path / f"shared-{shared}/data/train/metrics.jsonl").read_text().splitlines()]
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in history.items()}
    assert len(losses[True]) == 6 and losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


# --- flex_attention: the GPU path (no dense W x W mask) --------------------------------------------

@pytest.mark.parametrize("packer", [pack_pairs, pack_pairs_shared])
def test_one_row_packing_fills_a_single_block_aligned_row(packer):
    pairs = shared_prompt_pairs(8, 60)
    rows = packer(pairs, 0)
    one = packer(pairs, 0, one_row=True)
    assert one.input_ids.shape[0] == 1 and one.input_ids.shape[1] % FLEX_BLOCK == 0
    assert one.real_tokens == rows.real_tokens and one.padded_tokens - one.real_tokens < FLEX_BLOCK
    flat = one.input_ids.flatten()
    assert flat[one.last].tolist() == rows.input_ids.flatten()[rows.last].tolist()  # the same tokens scored


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packer", [pack_pairs, pack_pairs_shared])
def test_the_flex_block_mask_allows_exactly_what_the_dense_mask_allows(packer, causal):
    batch = packer(shared_prompt_pairs(32, 60), 0, one_row=True)  # ~10 blocks of 128 wide
    dense = block_mask(batch.segment_ids, causal=causal, boolean=True, dtype=torch.float32,
                       prefix_ids=batch.prefix_ids)[:, 0]
    flex = flex_block_mask(batch.segment_ids, causal=causal, prefix_ids=batch.prefix_ids)
    rows, width = batch.segment_ids.shape
    b, q, kv = (torch.arange(n).view(*shape) for n, shape in ((rows, (-1, 1, 1)), (width, (1, -1, 1)),
                                                                 (width, (1, 1, -1))))
    rule = flex.mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(rule, dense)
    # blocks where nothing may attend (most of them: sequences are short) are skipped, not computed masked
    assert flex.sparsity() > 50


def long_pairs(n: int, seed: int) -> list[dict]:
    """Prompts and answers of hundreds of tokens: blocks every token of which may attend, some across
    the end of a prompt and the start of its chosen answer."""
    rng = random.Random(seed)
    seq = lambda lo, hi: [rng.randrange(5, 60) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    pairs = []
    for _ in range(n):
        prompt = seq(1, 400)
        pairs.append({"input_ids_chosen": prompt + seq(1, 300), "input_ids_rejected": prompt + seq(1, 300)})
    return pairs


def _blocks(count: torch.Tensor, index: torch.Tensor) -> list:
    return [sorted(index[key][:int(count[key])].tolist()) for key in np.ndindex(*count.shape)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packer", [pack_pairs, pack_pairs_shared])
def test_the_block_mask_skips_and_fills_the_same_blocks_as_torchs_create_block_mask(packer, causal):
    """`flex_block_mask` finds the blocks from the layout; torch's `create_block_mask` evaluates the
    rule on every token pair. They must agree on every block, the partly attended ones (the rule is
    applied inside) and the wholly attended ones (it is not), both ways (the backward reads the second)."""
    from torch.nn.attention.flex_attention import create_block_mask

    layouts = [(shared_prompt_pairs(32, 60, seed=s), {"one_row": True}) for s in range(3)]
    layouts += [(long_pairs(6, seed=s), {"one_row": True}) for s in range(4)]
    layouts += [(long_pairs(6, seed=9), {}), (shared_prompt_pairs(20, 60, seed=4), {}),  # rows as wide as the longest
                (long_pairs(5, seed=7), {"width": 1000})]
    full_blocks = 0
    for pairs, how in layouts:
        batch = packer(pairs, 0, **how)
        ours = flex_block_mask(batch.segment_ids, causal=causal, prefix_ids=batch.prefix_ids)
        rows, width = batch.segment_ids.shape
        theirs = create_block_mask(ours.mask_mod, rows, None, width, width, device="cpu")
        for a, b in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
            assert _blocks(getattr(ours, a), getattr(ours, b)) == _blocks(getattr(theirs, a), getattr(theirs, b)), \
                (a, rows, width)
        full_blocks += int(ours.full_kv_num_blocks.sum())
    assert full_blocks > 50  # the wholly attended case is exercised


@pytest.mark.parametrize("packer", [pack_pairs, pack_pairs_shared])
def test_flex_attention_rewards_equal_the_padded_ones(tiny_decoder, packer):
    """flex_attention has no backward on a CPU: the forward is checked here, gradients on a GPU by
    benchmarks/gpu_check.py."""
    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    model.eval()
    pairs = shared_prompt_pairs(8, min(model.config.vocab_size, 60))
    padded = collate_pairs(pairs, 0)
    with torch.no_grad():
        expected = rewards(model, padded.input_ids, padded.attention_mask)
        model.set_attn_implementation("flex_attention")
        torch._dynamo.reset()  # one compiled shape per test: inductor's CPU flex kernel has no dynamic shapes
        got = packed_rewards(unwrap(model), packer(pairs, 0, one_row=True))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)




@pytest.fixture
def compiled_by_dynamo_alone(aot_eager_compiles, monkeypatch):
    """torch.compile with the aot_eager backend, and transformers' flex_attention compiled anew."""
    from transformers.integrations.flex_attention import WrappedFlexAttention

    monkeypatch.setattr(WrappedFlexAttention, "_instance", None)
    monkeypatch.setattr(WrappedFlexAttention, "_is_flex_compiled", False)


@pytest.mark.parametrize("any_width", [True, False])
def test_flex_attention_compiles_once_for_rows_of_every_width(tiny_decoder, compiled_by_dynamo_alone, any_width):
    """A packed row's width changes with every forward. Compiled for its first width alone, the next
    width compiles again; under `any_width_compiles` (what a GPU forward runs in), one compile serves
    them all (18.5 s of a cold 49 s run on an H200 went to the second one). Counted by dynamo with the
    aot_eager backend: inductor's CPU flex kernel builds for fixed shapes only."""
    from torch._dynamo.utils import counters

    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    model.eval()
    # the first row is 2 blocks wide, as many as the model has heads: sizes that must not be tied
    batches = [shared_prompt_pairs(n, min(model.config.vocab_size, 60), seed=n) for n in (8, 20, 14)]
    with torch.no_grad():
        expected = [rewards(model, b.input_ids, b.attention_mask) for b in (collate_pairs(p, 0) for p in batches)]
        model.set_attn_implementation("flex_attention")
        torch._dynamo.reset()
        before = counters["stats"]["unique_graphs"]
        widths, got = [], []
        with any_width_compiles() if any_width else contextlib.nullcontext():
            for pairs in batches:
                packed = pack_pairs_shared(pairs, 0, one_row=True)
                widths.append(packed.input_ids.shape[1] // FLEX_BLOCK)
                got.append(packed_rewards(unwrap(model), packed))
    assert widths[0] == model.config.num_attention_heads and len(set(widths)) == 3
    assert counters["stats"]["unique_graphs"] - before == (1 if any_width else 2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_flex_attention_past_the_compile_limit_stops_with_a_clear_error(tiny_decoder, compiled_by_dynamo_alone):
    """Past dynamo's limit of compiles per function, flex_attention would run unfused and hold
    heads x W x W scores per layer: a GPU run would crawl until its memory ran out. It stops instead,
    naming the setting that avoids it. Provoked here with a limit of one compile and a second model in
    another dtype (a new compile whatever the widths)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_decoder, num_labels=1)
    models = [AutoModelForSequenceClassification.from_config(config, attn_implementation="flex_attention",
                                                             dtype=dtype).eval()
              for dtype in (torch.float32, torch.float64)]
    packed = pack_pairs_shared(shared_prompt_pairs(8, 60), 0, one_row=True)
    torch._dynamo.reset()
    # dynamo's own patch: pytest 9's monkeypatch would delete the setting at undo (hiding it for good)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        with any_width_compiles():  # as a GPU forward runs
            assert packed_rewards(models[0], packed).shape == (16,)
        with pytest.raises(DevicePathError, match="limit of 1 compiles.*=varlen.*or sdpa"), any_width_compiles():
            packed_rewards(models[1], packed)


def test_sdpa_in_fp32_is_sdpa_and_under_bf16_autocast_runs_on_fp32_inputs(tiny_decoder, monkeypatch):
    from rm_lib.model.attention import FP32_SDPA, register_fp32_sdpa

    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    model.eval()
    pairs = shared_prompt_pairs(8, min(model.config.vocab_size, 60))
    packed, padded = pack_pairs_shared(pairs, 0), collate_pairs(pairs, 0)
    with torch.no_grad():
        expected = packed_rewards(unwrap(model), packed), rewards(model, padded.input_ids, padded.attention_mask)
        model.set_attn_implementation(register_fp32_sdpa())
        assert model.config._attn_implementation == FP32_SDPA
        got = packed_rewards(unwrap(model), packed), rewards(model, padded.input_ids, padded.attention_mask)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=0, rtol=0)  # the same computation in fp32
        sdpa = torch.nn.functional.scaled_dot_product_attention
        seen = []
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw))
        after = []  # what the attention hands on: back in autocast's dtype
        unwrap(model).model.layers[0].self_attn.o_proj.register_forward_pre_hook(
            lambda module, inputs: after.append(inputs[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rewards(model, padded.input_ids, padded.attention_mask)
    assert set(seen) == {torch.float32} and after == [torch.bfloat16]

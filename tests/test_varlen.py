"""train.attention=varlen: packed rows through FlashAttention's variable-length kernel. The kernel
runs on a GPU only (benchmarks/gpu_check.py checks it there); here the layout it is given, the way
it is called, and the same layout computed sequence by sequence on the CPU."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from rm_lib.errors import SettingsError
from rm_lib.model import varlen
from rm_lib.model.batching import collate_pairs
from rm_lib.model.modeling import load_reward_model, rewards, unwrap
from rm_lib.model.packing import pack_pairs, pack_pairs_shared, packed_rewards
from rm_lib.settings import TrainSettings
from rm_lib.training.device_plan import ModelShape, plan

from conftest import ROOT
from helpers import assert_same_step, fit_tiny, gradient_step, shared_prompt_pairs

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_a_shared_prompt_pair_is_one_causal_sequence_and_a_rejected_rest_that_also_sees_the_prompt():
    batch = pack_pairs_shared([{"input_ids_chosen": [1, 2, 3, 4], "input_ids_rejected": [1, 2, 5]}], 0, one_row=True)
    # columns: prompt 0-1 | chosen rest 2-3 | rejected rest 4 | padding 5-127
    layout = varlen.varlen_layout(batch.segment_ids, causal=True, prefix_ids=batch.prefix_ids)
    assert layout.q_bounds == (0, 4, 5, 128)
    assert layout.k_bounds == (0, 4, 7, 130)
    assert layout.kv_index.tolist() == [0, 1, 2, 3, 0, 1, 4, *range(5, 128)]
    assert (layout.max_q, layout.max_k) == (123, 123)
    assert layout.cu_q.dtype == layout.cu_k.dtype == torch.int32
    assert layout.cu_q.tolist() == list(layout.q_bounds)


def test_without_shared_prompts_every_sequence_and_stretch_of_padding_is_its_own_sequence():
    pairs = shared_prompt_pairs(6, 60)
    batch = pack_pairs(pairs, 0, width=40)  # several rows, padding at each row's end
    assert batch.input_ids.shape[0] > 1
    layout = varlen.varlen_layout(batch.segment_ids, causal=True)
    assert layout.kv_index is None and layout.k_bounds == layout.q_bounds
    assert layout.q_bounds[-1] == batch.input_ids.numel()  # every token is in a sequence
    flat, real = batch.segment_ids.reshape(-1), []
    for a, b in zip(layout.q_bounds, layout.q_bounds[1:]):
        ids = flat[a:b]
        if ids[0] >= 0:  # one whole sequence
            assert (ids == ids[0]).all() and (flat[b:] != ids[0]).all()
            real.append(b - a)
        else:  # a stretch of padding, to the row's end
            assert (ids < 0).all() and (b - a) <= batch.input_ids.shape[1]
    assert sorted(real) == sorted(len(p[side]) for p in pairs for side in ("input_ids_chosen", "input_ids_rejected"))


def test_a_row_for_varlen_is_as_wide_as_its_tokens():
    pairs = shared_prompt_pairs(8, 60)
    batch = pack_pairs_shared(pairs, 0, one_row=True, multiple=1)
    assert batch.input_ids.shape == (1, batch.real_tokens)
    layout = batch.with_varlen(causal=True).varlen
    assert (batch.segment_ids >= 0).all() and layout.q_bounds[-1] == batch.real_tokens  # no padding stretch


def test_a_pair_sharing_nothing_gathers_no_keys():
    batch = pack_pairs_shared([{"input_ids_chosen": [7, 2], "input_ids_rejected": [8, 3, 4]}], 0)
    layout = varlen.varlen_layout(batch.segment_ids, causal=True, prefix_ids=batch.prefix_ids)
    assert layout.q_bounds == (0, 2, 5) and layout.kv_index is None


def _spied(monkeypatch) -> list[int]:
    """Counts the calls of the varlen attention function (so a test knows it ran, not another)."""
    from transformers import AttentionInterface

    calls = [0]

    def spy(*args, **kwargs):
        calls[0] += 1
        return varlen.varlen_attention(*args, **kwargs)

    varlen.register_varlen()  # first, so that the registration is what the patch puts back
    monkeypatch.setitem(AttentionInterface._global_mapping, varlen.VARLEN, spy)
    return calls


@pytest.mark.parametrize("case", ["decoder, per sequence", "decoder, shared prompts", "encoder, per sequence"])
def test_varlen_rewards_loss_and_gradients_equal_the_padded_ones(case, tiny_decoder, minilm_path, monkeypatch):
    calls = _spied(monkeypatch)
    torch.manual_seed(0)
    model = load_reward_model(minilm_path if case.startswith("encoder") else str(tiny_decoder), pad_token_id=0)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pairs = shared_prompt_pairs(8, min(model.config.vocab_size, 60))
    step = gradient_step(model, torch.tensor([p["margin"] for p in pairs]))

    padded = collate_pairs(pairs, 0)
    expected = step(lambda: rewards(model, padded.input_ids, padded.attention_mask))
    packer = pack_pairs_shared if "shared" in case else pack_pairs
    batch = packer(pairs, 0, one_row=True).with_varlen(causal=case.startswith("decoder"))
    model.set_attn_implementation(varlen.VARLEN)
    got = step(lambda: packed_rewards(unwrap(model), batch))
    assert calls[0] == model.config.num_hidden_layers  # one call per layer: varlen ran, nothing else
    assert_same_step(got, expected)


def test_a_batch_without_its_layout_gets_one_from_its_ids(tiny_decoder):
    model = load_reward_model(str(tiny_decoder), pad_token_id=0)
    model.eval()
    pairs = shared_prompt_pairs(4, 60)
    padded = collate_pairs(pairs, 0)
    with torch.no_grad():
        expected = rewards(model, padded.input_ids, padded.attention_mask)
        varlen.register_varlen()
        model.set_attn_implementation(varlen.VARLEN)
        got = packed_rewards(unwrap(model), pack_pairs_shared(pairs, 0))  # several rows, no layout attached
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_the_kernel_is_called_as_each_torch_release_takes_it():
    """torch 2.10's varlen_attn takes is_causal and no scale; later ones a window and a scale."""
    batch = pack_pairs_shared([{"input_ids_chosen": [1, 2, 3], "input_ids_rejected": [1, 4]}], 0)
    layout = varlen.varlen_layout(batch.segment_ids, causal=True, prefix_ids=batch.prefix_ids)
    q, k, v = (torch.ones(4, 2, 16) for _ in range(3))
    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        seen.update(options, q=q)
        return q

    varlen.call_kernel(kernel, True, True, q, k, v, layout, 0.5)
    assert seen["window_size"] == (-1, 0) and seen["scale"] == 0.5 and torch.equal(seen["q"], q)
    seen.clear()
    varlen.call_kernel(kernel, False, False, q, k, v, layout, 0.5)
    assert seen.keys() == {"is_causal", "q"} and seen["is_causal"] is True
    torch.testing.assert_close(seen["q"], q * 0.5 * 4)  # the kernel divides by sqrt(16): the scale is 0.5
    seen.clear()
    varlen.call_kernel(kernel, True, False, q, k, v, layout, 16 ** -0.5)
    assert seen["window_size"] == (-1, 0) and torch.equal(seen["q"], q)


def test_this_torchs_kernel_takes_the_layout_as_called_forward_and_backward():
    """torch's own shape functions for its varlen kernel, on the meta device (no GPU here): the
    arguments `call_kernel` passes are the ones this torch release takes, gathered keys included."""
    batch = pack_pairs_shared([{"input_ids_chosen": [1, 2, 3, 4], "input_ids_rejected": [1, 2, 5]}], 0, one_row=True)
    layout = varlen.varlen_layout(batch.segment_ids, causal=True, prefix_ids=batch.prefix_ids).to("meta")
    kernel = varlen.cuda_kernel()
    assert kernel is not None, "torch.nn.attention.varlen is part of torch since 2.10"
    q = torch.empty(128, 2, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(130, 2, 16, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = varlen.call_kernel(*kernel, q, k, v, layout, 0.25)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == v.grad.shape == k.shape


def _top_left(q, k, v, layout, scale):
    """The sequence-by-sequence attention with the causal mask aligned to the first key, not the last:
    a rejected answer's tokens would miss most of their prompt."""
    pieces = []
    for i in range(len(layout.q_bounds) - 1):
        qa, qb, ka, kb = layout.q_bounds[i], layout.q_bounds[i + 1], layout.k_bounds[i], layout.k_bounds[i + 1]
        mask = torch.ones(qb - qa, kb - ka, dtype=torch.bool).tril()
        pieces.append(torch.nn.functional.scaled_dot_product_attention(
            q[qa:qb].transpose(0, 1), k[ka:kb].transpose(0, 1), v[ka:kb].transpose(0, 1), attn_mask=mask,
            scale=scale).transpose(0, 1))
    return torch.cat(pieces)


def _stand_in(alignment: str):
    """A kernel with torch's signature, computed by SDPA per sequence, its causal mask aligned to the
    last key (as FlashAttention aligns it) or to the first."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size, scale):
        bounds = (tuple(cu_q.tolist()), tuple(cu_k.tolist()))
        layout = varlen.VarlenLayout(cu_q, cu_k, max_q, max_k, None, window_size == (-1, 0), *bounds)
        attend = varlen._sequence_by_sequence if alignment == "last key" else _top_left
        return attend(q, k, v, layout, scale)

    return kernel, True, True


def test_a_varlen_run_starts_only_with_a_kernel_that_agrees_with_sdpa(monkeypatch):
    """A GPU run with train.attention=varlen first runs the kernel on a small layout of shared prompts
    against SDPA: bf16 rounding passes, a causal mask aligned to the first key of a rejected answer's
    gathered keys stops the run before it trains a wrong model."""
    from rm_lib.errors import DevicePathError

    right, wrong = _stand_in("last key"), _stand_in("first key")
    assert varlen.kernel_disagreement(right, "cpu", torch.bfloat16) < 0.02
    assert varlen.kernel_disagreement(wrong, "cpu", torch.bfloat16) > 0.5
    varlen.check_kernel.cache_clear()
    monkeypatch.setattr(varlen, "cuda_kernel", lambda: right)
    assert varlen.check_kernel("cpu", torch.bfloat16) < varlen.KERNEL_TOLERANCE
    varlen.check_kernel.cache_clear()
    monkeypatch.setattr(varlen, "cuda_kernel", lambda: wrong)
    with pytest.raises(DevicePathError, match=r"variable-length kernel differs from SDPA by .* train.attention=auto"):
        varlen.check_kernel("cpu", torch.bfloat16)
    varlen.check_kernel.cache_clear()


def _shape() -> ModelShape:
    return ModelShape(parameters=10**9, trainable=10**9, layers=16, hidden=2048, intermediate=8192)


def test_the_plan_takes_varlen_where_it_can_run_and_says_why_not_elsewhere():
    gpu = dict(device_type="cuda", supports_flex=True, shape=_shape(), free_bytes=140 * 2**30, attention="varlen")
    chosen = plan(packed=True, precision="bf16", supports_varlen=True, **gpu)
    assert chosen.attention == varlen.VARLEN and chosen.describe("sdpa").startswith("attention varlen, ")
    assert plan(device_type="cpu", packed=True, supports_flex=True, shape=_shape(), free_bytes=None,
                attention="varlen").attention == varlen.VARLEN  # sequence by sequence, for checking
    with pytest.raises(SettingsError, match="bf16 or fp16.*train.mixed_precision=bf16"):
        plan(packed=True, precision="no", supports_varlen=True, **gpu)
    with pytest.raises(SettingsError, match="torch.nn.attention.varlen"):
        plan(packed=True, precision="bf16", supports_varlen=False, **gpu)
    with pytest.raises(SettingsError, match="packed batches only.*padding_free"):
        plan(packed=False, precision="bf16", supports_varlen=True, **gpu)
    TrainSettings(attention="varlen", compile=True).validate()


def test_the_plan_counts_the_keys_varlen_gathers():
    """A varlen forward also keeps, for the kernel's backward, the keys and values gathered for
    rejected answers (at most one more of each per token): where flex_attention's activations just
    fit without checkpointing, varlen's do not."""
    from rm_lib.training.device_plan import GPU_TOKENS_PER_FORWARD, activation_bytes_per_token, state_bytes

    shape = _shape()
    extra = activation_bytes_per_token(shape, False, True) - activation_bytes_per_token(shape, False)
    assert extra == shape.layers * 4 * shape.hidden
    just_fits = (state_bytes(shape) + GPU_TOKENS_PER_FORWARD * activation_bytes_per_token(shape, False)) / 0.85
    gpu = dict(device_type="cuda", packed=True, supports_flex=True, shape=shape, free_bytes=int(just_fits) + 1,
               precision="bf16", supports_varlen=True)
    assert not plan(**gpu).gradient_checkpointing
    assert plan(**gpu, attention="varlen").gradient_checkpointing


@pytest.mark.parametrize("case", ["several forwards a batch, checkpointing", "LoRA, length head"])
def test_training_with_varlen_matches_training_with_the_cpus_packed_attention(tmp_path, tiny_decoder, case):
    """Whole runs with shared prompts: the same losses step by step and the same weights; with batches
    run as several forwards under activation checkpointing (the layout travels with the recomputed
    layers), and with LoRA layers inside the model and the length head beside it."""
    from rm_lib.model.modeling import add_lora, load_tokenizer

    lora = case.startswith("LoRA")
    both = ("train.length_debias=true",) if lora else ("train.max_tokens_per_forward=300",)

    def model():
        if not lora:
            return None  # fit_tiny loads the plain model
        torch.manual_seed(0)
        plain = load_reward_model(str(tiny_decoder), pad_token_id=load_tokenizer(str(tiny_decoder)).pad_token_id)
        return add_lora(plain, r=4, alpha=8, dropout=0.0, target_modules=None)

    default, weights, _ = fit_tiny(tmp_path, tiny_decoder, *both, model=model())
    result, varlen_weights, _ = fit_tiny(tmp_path, tiny_decoder, "train.attention=varlen", *both,
                                         *(() if lora else ("train.gradient_checkpointing=true",)), model=model())
    assert not lora or any("lora_B" in name and w.abs().sum() > 0 for name, w in varlen_weights.items())
    losses = [[r["loss"] for r in run.history] for run in (default, result)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
    assert all(r["padding_fraction"] == 0 for r in result.history)  # one row per forward, no block padding
    for name in weights:
        torch.testing.assert_close(varlen_weights[name], weights[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_compile_around_varlen_once_for_every_width(tmp_path, tiny_decoder, monkeypatch,
                                                                     aot_eager_compiles):
    """train.compile with varlen: each layer compiles around the attention (never compiled, see
    `attend`), so forwards of new widths and layouts compile nothing more, and the weights are those of
    the uncompiled run. Compiled by dynamo with the aot_eager backend."""
    from torch._dynamo.utils import counters

    from rm_lib.training import trainer

    # batches by tokens: the number of sequences changes from forward to forward, not only the widths
    settings = ("train.max_steps=6", "train.attention=varlen", "train.batch_tokens=700")
    _, plain, _ = fit_tiny(tmp_path, tiny_decoder, *settings)
    torch._dynamo.reset()
    seen = []  # each forward's width, and the graphs compiled before it
    real_pack = trainer.pack_pairs_shared

    batches = []

    def pack(*args, **kwargs):
        batch = real_pack(*args, **kwargs)
        seen.append((batch.input_ids.shape[1], counters["stats"]["unique_graphs"]))
        batches.append(batch.with_varlen(causal=True))
        return batch

    monkeypatch.setattr(trainer, "pack_pairs_shared", pack)
    before = counters["stats"]["unique_graphs"]
    _, compiled, _ = fit_tiny(tmp_path, tiny_decoder, *settings, "train.compile=true")
    widths = [w for w, _ in seen]
    assert any(w not in widths[:2] for w in widths[2:])  # later forwards of widths not seen before ...
    assert len({len(b.varlen.q_bounds) for b in batches}) > 1  # ... and other numbers of sequences ...
    assert seen[2][1] == counters["stats"]["unique_graphs"] > before  # ... compile nothing new
    for name, weight in plain.items():
        torch.testing.assert_close(compiled[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_the_gpu_check_of_varlen_in_fp16_passes_and_would_catch_a_misaligned_causal_mask(tmp_path, monkeypatch,
                                                                                           aot_eager_compiles):
    """The check's varlen paths run under fp16 autocast (the kernel computes in bf16 or fp16 only)
    against a padded batch under the same autocast. Its tolerance must let fp16 rounding pass and stop
    a kernel that aligned the causal mask of a rejected answer to the first key instead of the last
    (the rejected tokens would miss most of their prompt). Shown on a decoder of Pythia's family narrower
    than the check's small shape, with a third of the tolerance to spare on the passing side."""
    import pythia_1b_shape
    from transformers import GPTNeoXForSequenceClassification

    from rm_lib.model.modeling import load_tokenizer

    tokenizer = load_tokenizer("default")
    # Pythia's family narrower than the benchmark's small shape: a CPU without fp16 arithmetic (no
    # AVX512-FP16 or AMX-FP16) multiplies fp16 matrices ~100x slower than fp32, and this check runs in fp16
    shape = pythia_1b_shape.config(tokenizer, small=True)
    shape.update(dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2))
    torch.manual_seed(0)
    GPTNeoXForSequenceClassification(shape).save_pretrained(tmp_path / "decoder")
    model = load_reward_model(str(tmp_path / "decoder"), pad_token_id=tokenizer.pad_token_id)
    rows = gpu_check.pairs_with_prompts(8, 50_000)  # the GPU check's pairs, half as many
    varlen.register_varlen()

    def check() -> dict:
        return gpu_check.compare(model, rows, tokenizer.pad_token_id, varlen.VARLEN, gpu_check.FP16_TOLERANCE,
                                 paths=gpu_check.VARLEN_PATHS, fp16=True)

    report = check()
    assert list(report) == [name for name, *_ in gpu_check.VARLEN_PATHS]  # compiled layers too (aot_eager here)
    assert all(r["ok"] for r in report.values()), json.dumps(report)
    # with room: this decoder is narrower than the check's (fewer roundings add up), the GPU's kernel rounds too
    assert all(r["grad_max_rel_diff"] <= gpu_check.FP16_TOLERANCE / 3 for r in report.values()), json.dumps(report)

    monkeypatch.setattr(varlen, "_sequence_by_sequence", _top_left)
    wrong = check()
    assert wrong["varlen per-sequence (fp16)"]["ok"]  # square sequences: both alignments agree
    assert not wrong["varlen shared-prompt (fp16)"]["ok"], json.dumps(wrong)
    assert wrong["varlen shared-prompt (fp16)"]["grad_max_rel_diff"] >= 3 * gpu_check.FP16_TOLERANCE
    assert not wrong["varlen shared-prompt, compiled layers (fp16)"]["ok"]


@pytest.mark.parametrize("extra", [{"softcap": 50.0}, {"s_aux": torch.zeros(2)}])
def test_varlen_refuses_attention_terms_its_kernel_would_leave_out(extra):
    """Gemma 2's logit soft-capping, gpt-oss's attention sinks: left out in training, present when the
    model is scored, they would train another attention than the one used."""
    layout = varlen.varlen_layout(torch.tensor([[0, 0, 1, 1]]), causal=True)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="varlen attention does not apply this model's"):
        varlen.varlen_attention(torch.nn.Module(), q, q, q, None, **{varlen.LAYOUT_KWARG: layout}, **extra)
    out, _ = varlen.varlen_attention(torch.nn.Module(), q, q, q, None, softcap=None, s_aux=None,
                                     **{varlen.LAYOUT_KWARG: layout})
    assert out.shape == (1, 4, 2, 8)


def test_packed_training_refuses_sequences_longer_than_a_sliding_window(tmp_path, tiny_decoder):
    """Packed batches mask by sequence, not by a sliding window: a sequence longer than the window
    would see further back in training than when the model scores it padded."""
    from transformers import AutoConfig, Gemma2Config, MistralConfig, Qwen2Config

    from rm_lib.model.packing import attention_window, check_attention_window

    assert attention_window(MistralConfig(sliding_window=4096)) == 4096
    assert attention_window(Gemma2Config(sliding_window=512)) == 512  # every other layer
    assert attention_window(Qwen2Config(sliding_window=128)) is None  # use_sliding_window off
    assert attention_window(AutoConfig.from_pretrained(tiny_decoder)) is None
    check_attention_window(MistralConfig(sliding_window=64), 64)
    with pytest.raises(SettingsError, match=r"sliding window of 64 tokens.*has 65 tokens; set "
                                            r"train.padding_free=false, or filter.max_token_length to at most 64"):
        check_attention_window(MistralConfig(sliding_window=64), 65)

"""Score consistency: every way a trained model is used gives the evaluation's scores, the check says
which path does not, and report.json, metrics.json, the model card and the Dagster check carry the result."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from rm_lib.data.tokenstore import read_rows
from rm_lib.evaluation import consistency, quality
from rm_lib.files import read_json, write_json
from rm_lib.layout import Layout
from rm_lib.model.modeling import load_tokenizer
from rm_lib.publish import model_card

from helpers import run_steps, tiny_params

MODEL_PATHS = {"padded_bs1", "left_padding", "packed_training_forward", "packed_shared_prompt"}


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_decoder):
    """A tiny decoder trained, evaluated and released (build_tiny_decoder pads with its EOS)."""
    root = tmp_path_factory.mktemp("consistency")
    run_steps(tiny_params("train.max_steps=2", model=str(tiny_decoder)), root,
              "download", "tokenize", "filter", "train", "evaluate", "push")
    return Layout(root)


def _copy_with_pad(layout: Layout, folder, pad_token: str, *, tokenizer_too: bool = True):
    """The trained model with `pad_token` as its config's pad (and its tokenizer's, with tokenizer_too)."""
    shutil.copytree(layout.model, folder)
    tokenizer = load_tokenizer(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = tokenizer.convert_tokens_to_ids(pad_token)
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_too:
        tokenizer.pad_token = pad_token
        tokenizer.save_pretrained(folder)
    return folder


def _rows_and_pad(layout: Layout):
    return read_rows(layout.filtered / "test.parquet"), load_tokenizer(str(layout.model)).pad_token_id


def test_every_path_agrees_on_the_released_decoder(released):
    """build_tiny_decoder pads with its EOS; the pipeline gave the release a pad token of its own."""
    rows, pad = _rows_and_pad(released)
    config = read_json(released.model / "config.json")
    assert config["pad_token_id"] != config["eos_token_id"] and pad == config["pad_token_id"]
    result = consistency.check(released.model, rows, pad_token_id=pad)
    assert result["passed"] and result["failed"] == [] and result["skipped"] == {}, result
    assert result["pairs"] == min(16, len(rows)) and result["texts"] == 2 * result["pairs"]
    assert result["tolerance"] == 1e-4 and result["dtype"] == "float32"
    assert set(result["max_abs_diff"]) == MODEL_PATHS | {"pipeline"}
    assert all(0 <= d <= 1e-4 for d in result["max_abs_diff"].values())
    # the pipeline path scores the text a user has: the saved chat template writes the EOS training
    # appended (the base one wrote none, and the reward was read a token early), the tokenizer adds the BOS
    tokenizer = load_tokenizer(str(released.model))
    text = consistency.round_trip_text(tokenizer, rows[0]["input_ids_chosen"])
    assert text is not None and text.endswith(tokenizer.eos_token) and tokenizer.bos_token not in text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith("</s>")


def test_pad_equal_to_eos_sends_the_pipeline_to_another_token_and_the_check_says_so(released, tmp_path):
    """The layout peers ship (config and tokenizer pad with the EOS every text ends with)."""
    rows = read_rows(released.filtered / "test.parquet")
    tokenizer = load_tokenizer(str(released.model))
    model_dir = _copy_with_pad(released, tmp_path / "model", tokenizer.eos_token)
    result = consistency.check(model_dir, rows, pad_token_id=tokenizer.eos_token_id)
    assert not result["passed"] and result["failed"] == ["pipeline"]
    assert result["max_abs_diff"]["pipeline"] > result["tolerance"]
    assert "pad token of its own" in result["hint"]


def test_a_config_pad_other_than_the_tokenizers_fails_the_batched_pipeline(released, tmp_path):
    rows, pad = _rows_and_pad(released)
    tokenizer = load_tokenizer(str(released.model))
    model_dir = _copy_with_pad(released, tmp_path / "model", tokenizer.unk_token, tokenizer_too=False)
    result = consistency.check(model_dir, rows, pad_token_id=pad)
    assert result["failed"] == ["pipeline"] and "the tokenizer pads with token" in result["hint"]


def test_a_model_with_absolute_positions_fails_left_padding_and_evaluate_says_so(released, tmp_path):
    """GPT-2 numbers positions from the first column, padding included: a left-padded batch reads other
    rewards. The check names the path and why, and evaluate's summary warns (it only showed in the card)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rm_lib.steps.evaluate import EvaluateResult

    rows, pad = _rows_and_pad(released)
    folder = tmp_path / "gpt2"
    shutil.copytree(released.model, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "adapter"))
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(load_tokenizer(str(folder))), n_embd=32, n_layer=2, n_head=2, n_positions=256, num_labels=1,
        pad_token_id=pad)).save_pretrained(folder)
    result = consistency.check(folder, rows, pad_token_id=pad)
    assert result["failed"] == ["left_padding"] and "absolute" in result["hint"]
    report = read_json(released.evaluation / "report.json")
    summary = EvaluateResult({**report, "consistency": result}, released.evaluation / "report.json",
                             released.evaluation, {}).summary()
    warning = summary.splitlines()[-1]
    assert warning.startswith("  warning: score consistency: left_padding (by up to ") and "absolute" in warning


def test_a_sliding_window_shorter_than_the_texts_skips_the_packed_paths_training_refused(released, tmp_path):
    """Mistral attends within a sliding window, which packed batches do not apply: training refuses to pack
    texts longer than it (train.padding_free=false), yet the check ran the packed paths and a release trained
    on padded batches was published as "Some paths give other scores". They are skipped, saying why."""
    import torch
    from transformers import MistralConfig, MistralForSequenceClassification

    rows, pad = _rows_and_pad(released)
    longest = max(len(r[f"input_ids_{side}"]) for r in rows[:16] for side in ("chosen", "rejected"))
    folder = tmp_path / "mistral"
    shutil.copytree(released.model, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "adapter"))
    torch.manual_seed(0)
    MistralForSequenceClassification(MistralConfig(
        vocab_size=len(load_tokenizer(str(folder))), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, sliding_window=longest // 2,
        num_labels=1, pad_token_id=pad)).save_pretrained(folder)
    result = consistency.check(folder, rows, pad_token_id=pad)
    assert result["passed"], result
    for path in ("packed_training_forward", "packed_shared_prompt"):
        assert f"sliding window of {longest // 2} tokens" in result["skipped"][path]["reason"]
    assert "training runs padded batches" in result["skipped"]["packed_training_forward"]["reason"]


def test_a_score_read_at_the_padding_fails_every_path_against_the_reference(released, monkeypatch):
    import torch

    from rm_lib.model import modeling

    rows, pad = _rows_and_pad(released)
    assert len({len(r["input_ids_chosen"]) for r in rows[:16]}) > 1  # the reference batch holds padding
    monkeypatch.setattr(modeling, "last_token_index",
                        lambda mask: torch.full(mask.shape[:1], mask.shape[-1] - 1, device=mask.device))
    result = consistency.check(released.model, rows, pad_token_id=pad, pipeline=False)
    assert not result["passed"] and set(result["failed"]) == MODEL_PATHS
    assert result["skipped"]["pipeline"]["reason"] == "not run"


def test_a_broken_packed_forward_is_named_alone(released, monkeypatch):
    from rm_lib.model import packing

    rows, pad = _rows_and_pad(released)
    real = packing.block_mask
    monkeypatch.setattr(packing, "block_mask",  # tokens see the sequence after them: no longer causal
                        lambda seg, *, causal, **kw: real(seg, causal=False, **kw))
    result = consistency.check(released.model, rows, pad_token_id=pad, pipeline=False)
    assert result["failed"] == ["packed_training_forward", "packed_shared_prompt"] and not result["passed"]
    assert result["max_abs_diff"]["padded_bs1"] <= result["tolerance"]


def test_a_shared_prompt_mask_that_hides_the_prompt_is_named_alone(released, monkeypatch):
    from rm_lib.model import packing

    rows, pad = _rows_and_pad(released)
    real = packing.block_mask
    monkeypatch.setattr(packing, "block_mask",  # the answers no longer see their pair's prompt
                        lambda seg, *, prefix_ids=None, **kw: real(seg, **kw))
    result = consistency.check(released.model, rows, pad_token_id=pad, pipeline=False)
    assert result["failed"] == ["packed_shared_prompt"] and not result["passed"]


def test_an_encoder_agrees_on_every_path_it_supports(minilm_path, tmp_path):
    import torch

    from rm_lib.data import demo
    from rm_lib.model.modeling import load_reward_model

    tokenizer = load_tokenizer(minilm_path)
    torch.manual_seed(0)
    model = load_reward_model(minilm_path)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pairs = demo.demo_pairs(6, seed=3)
    text = lambda p, side: " ".join(str(v) for v in (p["prompt"], p[side]))  # noqa: E731
    rows = [{"input_ids_chosen": tokenizer(text(p, "chosen"))["input_ids"],
             "input_ids_rejected": tokenizer(text(p, "rejected") + " and so on")["input_ids"]} for p in pairs]
    result = consistency.check(tmp_path / "model", rows, pad_token_id=tokenizer.pad_token_id, model=model,
                               tokenizer=tokenizer)
    assert result["passed"], result
    assert set(result["skipped"]) == {"left_padding", "packed_shared_prompt"}
    assert "[CLS]" in result["skipped"]["left_padding"]["reason"]
    # the card says which paths were measured, and how to pad a model that left padding misreads
    outcome = model_card._consistency({"consistency": result}).split("). ", 1)[1].split("\n")[0]
    assert outcome == "Every path measured agrees. Pad its inputs on the right, as the released tokenizer does."
    assert result["max_abs_diff"]["packed_training_forward"] is not None
    assert result["max_abs_diff"]["pipeline"] is not None and "pipeline" not in result["skipped"]


def test_ids_that_do_not_round_trip_are_counted_as_skipped(released, tmp_path):
    rows = read_rows(released.filtered / "test.parquet")
    tokenizer = load_tokenizer(str(released.model))
    no_bos = dict(rows[0], input_ids_chosen=rows[0]["input_ids_chosen"][1:])  # the tokenizer adds BOS to any text
    assert consistency.round_trip_text(tokenizer, no_bos["input_ids_chosen"]) is None
    assert consistency.round_trip_text(tokenizer, rows[0]["input_ids_chosen"]) is not None
    model_dir = _copy_with_pad(released, tmp_path / "model", tokenizer.unk_token)
    result = consistency.check(model_dir, [no_bos, *rows[1:3]], pad_token_id=tokenizer.unk_token_id)
    assert result["skipped"]["pipeline"]["texts"] == 1 and result["passed"], result


def test_report_metrics_card_and_dagster_check_carry_the_result(released):
    report = read_json(released.evaluation / "report.json")
    result = report["consistency"]
    assert set(result["max_abs_diff"]) == MODEL_PATHS | {"pipeline"} and isinstance(result["passed"], bool)
    assert result["reference"] == consistency.REFERENCE and result["tolerance"] == 1e-4
    metrics = read_json(released.evaluation / "metrics.json")
    assert metrics["consistency_max_abs_diff"] == max(result["max_abs_diff"].values())
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    card = (released.release / "README.md").read_text(encoding="utf-8")
    assert "## Score consistency" in card
    for label in ("batch size 1 (each text alone)", "left padding", "packed (the training forward)"):
        line = next(x for x in card.splitlines() if x.startswith(f"| {label} |"))
        assert "agrees" in line, line
    pipeline_line = next(x for x in card.splitlines() if x.startswith("| `transformers.pipeline"))
    assert f"{result['max_abs_diff']['pipeline']:.1e}" in pipeline_line
    assert ("**differs**" in pipeline_line) == ("pipeline" in result["failed"])
    verdict = quality.scores_consistent(released)
    assert verdict.warn_only and verdict.passed == result["passed"]


def test_the_verdict_warns_naming_the_path_and_passes_a_consistent_report(tmp_path):
    import dagster as dg

    from orchestration import checks
    from orchestration.resources import ProjectResource

    layout = Layout(tmp_path)
    base = {"pairs": 2, "texts": 4, "tolerance": 1e-4, "reference": consistency.REFERENCE, "skipped": {},
            "max_abs_diff": {"padded_bs1": 1e-8, "left_padding": 2e-8, "packed_training_forward": 0.0,
                             "pipeline": 0.3}}
    assert not quality.scores_consistent(layout).passed  # no report yet
    write_json(layout.evaluation / "report.json", {"accuracy": 0.7})
    assert "no score-consistency result" in quality.scores_consistent(layout).description
    write_json(layout.evaluation / "report.json", {"consistency": {**base, "failed": ["pipeline"], "passed": False}})
    verdict = quality.scores_consistent(layout)
    assert not verdict.passed and verdict.warn_only and "pipeline (max |diff| 0.3)" in verdict.description
    shown = checks.evaluation_scores_consistent(dg.build_asset_check_context(),
                                                project=ProjectResource(root=str(tmp_path)))
    assert not shown.passed and shown.severity == dg.AssetCheckSeverity.WARN
    write_json(layout.evaluation / "report.json", {"consistency": {**base, "failed": [], "passed": True}})
    assert quality.scores_consistent(layout).passed
    assert "score the same on every path within" in quality.scores_consistent(layout).description
    # paths skipped (an encoder's left padding, a sliding window's packed paths): "every path" said so
    skipped = {"packed_shared_prompt": {"texts": 4, "reason": "an encoder's prompt would see both answers"}}
    write_json(layout.evaluation / "report.json", {"consistency": {**base, "failed": [], "passed": True,
                                                                   "skipped": skipped}})
    said = quality.scores_consistent(layout).description
    assert "score the same on every path scored (skipped: packed_shared_prompt; see the metadata for why)" in said


def test_metrics_json_says_nan_where_a_path_scored_no_numbers():
    """A path whose scores were NaN failed the report, while metrics.json's consistency_max_abs_diff (what
    `dvc metrics diff` shows) kept the other paths' 1e-7: max() drops a NaN that does not come first."""
    result = {"max_abs_diff": {"padded_bs1": 1e-7, "pipeline": math.nan, "left_padded": 2e-7}, "passed": False}
    assert math.isnan(consistency.worst_difference(result))
    assert consistency.worst_difference({"max_abs_diff": {"padded_bs1": 1e-7, "pipeline": 3e-7}}) == 3e-7
    assert consistency.worst_difference({}) is None


def test_every_path_report_json_compares_is_documented():
    """docs/evaluation.md lists each path of report.json's `consistency` (consistency.PATHS) with what it is."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs/evaluation.md").read_text(encoding="utf-8")
    section = page.split("## Score consistency", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("- `")}
    assert listed == set(consistency.PATHS)

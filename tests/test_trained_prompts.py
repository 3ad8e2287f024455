"""Held-out pairs a base model trained on: a model trained on from one of this project's reward models
records the prompts it and its bases trained on, evaluate counts the held-out pairs that ask one, and
the release gate refuses a model whose held-out accuracy is partly memory of its base."""
from __future__ import annotations

import json

import pytest

from rm_lib.data import keys, trained_prompts
from rm_lib.data.tokenstore import read_rows
from rm_lib.errors import DataError
from rm_lib.evaluation import quality
from rm_lib.files import read_json
from rm_lib.layout import Layout
from rm_lib.settings import PushSettings
from rm_lib.steps.evaluate import seen_in_training
from rm_lib.steps.tokenize import prompt_digests

from helpers import run_steps, tiny_params


def _pair(prompt: str, chosen: str = "yes", rejected: str = "no") -> dict:
    return {"id": "f:1", "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def _tokens(chosen: list[int], rejected: list[int]) -> dict:
    return {"id": "f:1", "input_ids_chosen": chosen, "input_ids_rejected": rejected}


def test_a_prompt_reads_the_same_whatever_its_answers_and_spacing():
    train = [_pair("Is the  sky blue?", "yes", "no"), _pair("Is the sea blue?")]
    test = [_pair("is the sky blue? ", "It is.", "No"), _pair("Is grass green?")]
    found = prompt_digests({"train": train, "test": test})
    assert found["test"][0] == found["train"][0] and len({*found["train"], found["test"][1]}) == 3
    assert len(found["train"][0]) == keys.DIGEST_CHARS


def test_pretokenized_pairs_that_share_only_the_opening_every_pair_has_are_each_their_own_prompt():
    """A BOS (or a chat template's opening) that every pair begins with is no prompt: pairs without one
    read as one prompt, so a base's training pairs counted as the model's own."""
    pairs = [_tokens([1, 10 + i, 50, 2], [1, 30 + i, 60, 2]) for i in range(4)]
    found = prompt_digests({"train": pairs[:2], "test": pairs[2:]})
    assert len(set(found["train"] + found["test"])) == 4
    prompted = [_tokens([1, 7, 7, 10 + i, 2], [1, 7, 7, 30 + i, 2]) for i in range(2)]
    again = prompt_digests({"train": pairs[:2] + prompted[:1], "test": prompted[1:]})
    assert again["train"][2] == again["test"][0]  # the prompt [1, 7, 7] whatever the answers


def test_a_record_holds_the_bases_prompts_and_names_a_base_that_kept_none():
    rows = [{"prompt_digest": d} for d in ("b", "a", "b")]
    grandparent_unknown = {"own": ["c", "a"], "bases": ["d"], "unrecorded_bases": ["old-rm"]}
    record = trained_prompts.record(rows, grandparent_unknown, "base-rm")
    assert record["own"] == ["a", "b"] and record["bases"] == ["c", "d"] and record["unrecorded_bases"] == ["old-rm"]
    assert trained_prompts.record(rows, trained_prompts.unrecorded(), "base-rm")["unrecorded_bases"] == ["base-rm"]
    assert trained_prompts.record(rows, None, "distilroberta-base")["unrecorded_bases"] == []
    # filtered pairs from before the digests: nothing is claimed of the model's own prompts
    assert trained_prompts.record([{"id": "x"}], None, "m")["own"] is None


def test_evaluate_counts_the_held_out_pairs_a_base_trained_on_and_scores_the_others_apart():
    rows = [{"id": f"test.jsonl:{i}", "prompt_digest": d} for i, d in enumerate(["own", "old", "new", "new2"], 1)]
    trained = {"own": ["own"], "bases": ["old", "own"], "unrecorded_bases": []}
    # the model prefers the chosen answer on the seen pairs only
    seen = seen_in_training(rows, [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], trained)
    assert (seen["checked"], seen["pairs"], seen["own"], seen["base"], seen["share_base"]) == (True, 4, 1, 1, 0.25)
    assert seen["accuracy_seen"] == 1.0 and seen["accuracy_unseen"] == 0.0
    assert seen["examples"] == ["test.jsonl:1", "test.jsonl:2"]
    assert not seen_in_training(rows, [1.0] * 4, [0.0] * 4, None)["checked"]
    without = seen_in_training([{"id": "t:1"}], [1.0], [0.0], trained)  # filtered by an earlier rm_lib
    assert not without["checked"] and "prompt digests" in without["why"]


def _report(layout: Layout, seen: dict) -> None:
    layout.evaluation.mkdir(parents=True)
    report = {"accuracy": 0.9, "pairs": 100, "seen_in_training": seen}
    (layout.evaluation / "report.json").write_text(json.dumps(report))


def test_the_gate_refuses_held_out_pairs_a_base_trained_on_above_the_share_and_warns_where_it_cannot_tell(tmp_path):
    seen = {"checked": True, "pairs": 100, "own": 0, "base": 30, "share_base": 0.3, "accuracy_unseen": 0.61,
            "unrecorded_bases": []}
    _report(Layout(tmp_path / "a"), seen)
    verdict = quality.seen_by_base_gate(Layout(tmp_path / "a"), 0.01)
    assert not verdict.passed and not verdict.warn_only
    assert "30 of 100 held-out pairs (30.0%)" in verdict.description
    assert "push.max_test_seen_by_base" in verdict.description
    assert "0.6100" in verdict.description  # the accuracy the user can trust
    assert quality.seen_by_base_gate(Layout(tmp_path / "a"), 0.3).passed  # the share is the most allowed
    assert not quality.seen_by_base_gate(Layout(tmp_path / "a"), 0.29).passed  # one pair past it is not
    _report(Layout(tmp_path / "b"), {**seen, "base": 0, "share_base": 0.0, "unrecorded_bases": ["old-rm"]})
    unknown = quality.seen_by_base_gate(Layout(tmp_path / "b"), 0.01)
    assert not unknown.passed and unknown.warn_only and "old-rm" in unknown.description
    blocked = quality.evaluation_gate(Layout(tmp_path / "a"), PushSettings(min_accuracy=0.5, min_test_pairs=1))
    assert [v.name for v in quality.blocking_failures(blocked)] == ["seen_by_base_gate"]


def test_a_damaged_record_is_named_before_any_training(tmp_path):
    (tmp_path / trained_prompts.FILE).write_text('{"own": ["a", 3]}')
    with pytest.raises(DataError, match=f"{trained_prompts.FILE}.*own"):
        trained_prompts.base_record("rm", tmp_path, True)
    (tmp_path / trained_prompts.FILE).write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        trained_prompts.read(tmp_path)


def test_a_base_of_this_project_without_a_record_is_unrecorded_and_any_other_base_is_none(tmp_path):
    assert trained_prompts.base_record("rm", tmp_path, True) == trained_prompts.unrecorded()
    assert trained_prompts.base_record("lm", tmp_path, False) is None
    assert trained_prompts.base_record("user/lm", None, False) is None


@pytest.mark.integration  # three training runs
def test_training_on_from_a_model_that_trained_on_the_held_out_prompts_is_refused_at_push(tmp_path, tiny_decoder):
    """A base trained with another split seed: the new run holds out prompts the base trained on, and its
    accuracy on them is partly memory. Held out as the base held out (the same seed), none is seen."""
    from rm_lib.steps.push import ReleaseBlocked

    base_params = tiny_params("train.max_steps=1", "download.seed=1", model=str(tiny_decoder))
    run_steps(base_params, tmp_path / "base", "download", "tokenize", "filter", "train")
    base = tmp_path / "base/models/reward_model"
    base_train = {r["prompt_digest"] for r in read_rows(tmp_path / "base/data/filtered/train.parquet")}
    assert read_json(base / trained_prompts.FILE)["own"] == sorted(base_train)

    other = tiny_params("train.max_steps=1", "download.seed=2", model=str(base))
    evaluated = run_steps(other, tmp_path / "other", "download", "tokenize", "filter", "train", "evaluate")["evaluate"]
    held_out = [r["prompt_digest"] for r in read_rows(tmp_path / "other/data/filtered/test.parquet")]
    expected = sum(d in base_train for d in held_out)
    assert expected > 0  # the seeds split the demo prompts differently
    report = read_json(tmp_path / "other/data/evaluation/report.json")
    assert report["seen_in_training"]["base"] == expected and report["seen_in_training"]["own"] == 0
    assert f"warning: {expected} of {len(held_out)} held-out pairs ask a prompt a base model trained on" in (
        evaluated.summary())
    assert read_json(tmp_path / "other/data/evaluation/metrics.json")["test_pairs_seen_by_base"] == expected
    assert read_json(tmp_path / "other/models/reward_model" / trained_prompts.FILE)["bases"] == sorted(
        base_train - {r["prompt_digest"] for r in read_rows(tmp_path / "other/data/filtered/train.parquet")})
    with pytest.raises(ReleaseBlocked, match="push.max_test_seen_by_base"):
        run_steps(other, tmp_path / "other", "push")
    assert not (tmp_path / "other/data/release/README.md").exists()

    same = tiny_params("train.max_steps=1", "download.seed=1", model=str(base))
    run_steps(same, tmp_path / "same", "download", "tokenize", "filter", "train", "evaluate", "push")
    assert read_json(tmp_path / "same/data/evaluation/report.json")["seen_in_training"]["base"] == 0
    assert (tmp_path / "same/data/release" / trained_prompts.FILE).is_file()  # a release carries its record
    card = (tmp_path / "same/data/release/README.md").read_text()
    assert "| held-out pairs whose prompt a base model trained on | 0 of " in card
    private = tiny_params("train.max_steps=1", "download.seed=1", "push.publish_trained_prompts=false",
                          model=str(base))
    run_steps(private, tmp_path / "same", "push")
    assert not (tmp_path / "same/data/release" / trained_prompts.FILE).exists()
    # the release's record lists the files it holds (it gave a hash for the file it left out)
    released = read_json(tmp_path / "same/data/release/rm_lib.json")["files"]
    assert trained_prompts.FILE not in released and "model.safetensors" in released
    assert trained_prompts.FILE in read_json(tmp_path / "same/models/reward_model/rm_lib.json")["files"]


@pytest.mark.integration  # two training runs
def test_a_copy_of_a_model_of_this_project_saved_without_its_records_is_named_as_an_unrecorded_base(tmp_path,
                                                                                                 tiny_decoder):
    """save_pretrained of a release keeps the config's rm_lib_fingerprint but neither rm_lib.json nor
    trained_prompts.json: it was taken for a language model, and nothing said its prompts were unknown."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_steps(tiny_params("train.max_steps=1", model=str(tiny_decoder)), tmp_path / "base", "download", "tokenize",
              "filter", "train")
    base, copy = tmp_path / "base/models/reward_model", tmp_path / "copy"
    AutoModelForSequenceClassification.from_pretrained(base).save_pretrained(copy)
    AutoTokenizer.from_pretrained(base).save_pretrained(copy)
    on = tiny_params("train.max_steps=1", "download.seed=2", model=str(copy))
    evaluated = run_steps(on, tmp_path / "on", "download", "tokenize", "filter", "train", "evaluate")["evaluate"]
    seen = read_json(tmp_path / "on/data/evaluation/report.json")["seen_in_training"]
    assert seen["unrecorded_bases"] == ["copy"] and seen["base"] == 0
    assert "note: copy keeps no record of the prompts it trained on" in evaluated.summary()
    verdict = quality.seen_by_base_gate(Layout(tmp_path / "on"), 0.01)
    assert verdict.warn_only and not verdict.passed and "copy" in verdict.description


def test_the_card_shows_the_count_and_the_bases_it_does_not_cover():
    from rm_lib.publish.model_card import _seen_row

    row = _seen_row({"checked": True, "pairs": 12, "own": 0, "base": 4, "share_base": 0.33, "accuracy_unseen": 0.5,
                     "unrecorded_bases": ["old_rm"]})
    assert "4 of 12; accuracy on the others 0.5000; `old_rm` keeps no record" in row
    unchecked = {"checked": False, "why": "the held-out pairs carry no prompt digests", "unrecorded_bases": []}
    assert "not checked: the held-out pairs" in _seen_row(unchecked)



def test_a_release_on_the_hub_as_base_is_read_from_there_and_one_without_a_record_is_unrecorded(tmp_path,
                                                                                                   monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    (tmp_path / trained_prompts.FILE).write_text(json.dumps({"own": ["a"], "bases": [], "unrecorded_bases": []}))
    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        if repo_id == "user/old-rm":
            raise EntryNotFoundError("404")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert trained_prompts.base_record("user/rm", None, True, revision="v2")["own"] == ["a"]
    assert asked == [("user/rm", trained_prompts.FILE, "v2")]
    assert trained_prompts.base_record("user/old-rm", None, True) == trained_prompts.unrecorded()
    assert "user/old-rm: its training prompts (trained_prompts.json) cannot be read" in capsys.readouterr().err
    assert trained_prompts.base_record("user/lm", None, False) is None and len(asked) == 2  # no request for an LM

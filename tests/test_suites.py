"""evaluate.suites: labelled sets in RewardBench 1's pairwise and RewardBench 2's best-of-N layouts,
accuracy per subset and overall, what report.json, metrics.json, the summary and the model card show."""
from __future__ import annotations

import hashlib
import json

import pytest

from rm_lib.data import sources
from rm_lib.errors import DataError, SettingsError
from rm_lib.evaluation import suites
from rm_lib.evaluation.scoring import RewardScorer, Scored
from rm_lib.layout import Layout
from rm_lib.settings import load_params
from rm_lib.steps.evaluate import numeric_metrics

from helpers import run_steps, tiny_params, write_jsonl


class NumberScorer:
    """A scorer whose reward is the number an answer starts with: exact rewards for the rule's cases."""

    def score_detailed(self, items, names=None):
        return Scored(rewards=[float(item[-1]["content"].split()[0]) for item in items],
                      truncated=[False] * len(items), lengths=[1] * len(items))

    def encode(self, item, name="item"):  # ids as distinct as the texts
        return list(json.dumps(item, sort_keys=True).encode())

    def score_ids(self, encoded, names=None, prompt_lengths=None):
        return self.score_detailed([json.loads(bytes(ids)) for ids in encoded])

    max_prompt = None  # cuts no prompt

    def prompt_length(self, prompt):
        return 0

    def sure_tie(self, chosen, rejected, name, prompt_length=0):
        return "identical_tokens" if chosen == rejected else None


def _rb2_rows() -> list[dict]:
    def row(i, subset, chosen, rejected):
        return {"id": str(i), "prompt": "Name a film you liked.", "chosen": chosen, "rejected": rejected,
                "num_correct": len(chosen), "num_incorrect": len(rejected), "subset": subset}

    return [row(1, "Math", ["0.9 right"], ["0.1 a", "0.5 b", "0.2 c"]),  # beats all three: correct
            row(2, "Math", ["0.9 right"], ["0.1 a", "1.5 b", "0.2 c"]),  # beats 2 of 3: wrong
            row(3, "Math", ["0.7 right"], ["0.6 a", "0.5 b", "0.4 c"]),
            row(4, "Focus", ["0.7 right"], ["0.7 tie", "0.5 b", "0.4 c"]),  # a tie with one rejected: wrong
            row(5, "Focus", ["0.7 right"], ["  ", "0.5 b", "0.4 c"])]  # an empty answer: skipped, counted


def _rb1_rows() -> list[dict]:
    def row(i, subset, chosen, rejected):
        return {"prompt": "How was the film?", "chosen": chosen, "rejected": rejected, "subset": subset, "id": i}

    return [row(1, "alpacaeval-easy", "0.8 good", "0.2 bad"), row(2, "alpacaeval-easy", "0.3 good", "0.4 bad"),
            row(3, "alpacaeval-easy", "0.5 good", "0.1 bad"), row(4, "refusals dangerous", "0.5 good", "0.5 bad"),
            row(5, "refusals dangerous", "0.6 same", "0.6 same")]  # identical sides: skipped, counted


def test_a_row_is_right_only_when_every_chosen_answer_beats_every_rejected_one():
    assert suites.row_correct([0.9], [0.1, 0.5, 0.2])
    assert not suites.row_correct([0.9], [0.1, 1.5, 0.2])  # beats 2 of 3
    assert not suites.row_correct([0.7], [0.7, 0.5, 0.4])  # a tie is wrong
    assert not suites.row_correct([1.0], [1.0]) and suites.row_correct([1.0], [0.0])  # pairwise: N = 1
    assert not suites.row_correct([2.0, 0.8], [0.9])  # several chosen: each must win


def test_overall_accuracy_weighs_subsets_by_their_rows():
    overall, per_subset = suites.accuracy([True, True, False, True], ["a", "a", "a", "b"])
    assert overall == 0.75  # the mean of the two subsets would be 0.8333
    assert per_subset == {"a": {"rows": 3, "accuracy": pytest.approx(2 / 3)}, "b": {"rows": 1, "accuracy": 1.0}}


@pytest.mark.parametrize("written", ["jsonl", "csv of JSON cells", "csv of Python reprs", "csv from Parquet"])
def test_best_of_n_file_like_reward_bench_2(tmp_path, written):
    """A CSV file holds each list of answers as text: its JSON, or what pandas' to_csv writes (the list's repr,
    numpy's for a column read from Parquet, whose items only spaces or newlines part). Read as the lists they
    are: read as text, each row was a pair of two texts, and scored as one."""
    import numpy as np
    import pandas as pd

    if written == "jsonl":
        path = write_jsonl(tmp_path / "rb2.jsonl", _rb2_rows())
    else:
        def cell(answers):
            return (json.dumps(answers) if written == "csv of JSON cells" else
                    np.array(answers) if written == "csv from Parquet" else answers)

        rows = [{**r, "chosen": cell(r["chosen"]), "rejected": cell(r["rejected"])} for r in _rb2_rows()]
        path = tmp_path / "rb2.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        assert "'0.1 a' '0.5 b'" in path.read_text() or written != "csv from Parquet"
    entry = suites.evaluate_suite(suites.parse_entry(str(path)), NumberScorer())
    assert entry["layout"] == "best_of_n" and entry["rows"] == 4
    assert entry["accuracy"] == 0.5  # rows 1 and 3 of 4
    assert entry["per_subset"] == {"Focus": {"rows": 1, "accuracy": 0.0},
                                   "Math": {"rows": 3, "accuracy": pytest.approx(2 / 3)}}
    assert entry["skipped"] == 1 and entry["skipped_by_reason"] == {"empty_answer": 1}
    assert entry["content_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_best_of_n_answer_that_ends_with_a_user_turn_is_set_aside(tmp_path):
    """As download sets such a pair aside: its reward would be read after the user's words."""
    user, reply = {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "0.9 good"}
    rows = [{"prompt": "q", "chosen": [[reply]], "rejected": [[reply | {"content": "0.1 bad"}]]},
            {"prompt": "q", "chosen": [[reply, user]], "rejected": [[reply | {"content": "0.1 bad"}]]}]
    entry = suites.evaluate_suite(suites.parse_entry(str(write_jsonl(tmp_path / "bon.jsonl", rows))), NumberScorer())
    assert entry["rows"] == 1 and entry["skipped_by_reason"] == {"answer_not_assistant": 1}


def test_a_blank_system_turn_of_a_best_of_n_prompt_is_none_as_in_training(tmp_path):
    """Training's normaliser drops a blank system turn; the best-of-N reader kept it, so the prompt the
    suite measured (to cut it to the prompt limit) was longer than the conversation it scored."""
    system, question = {"role": "system", "content": "  "}, {"role": "user", "content": "q"}
    rows = [{"prompt": [system, question], "chosen": ["0.9 good"], "rejected": ["0.1 bad", "0.2 worse"]}]
    read = suites.read_rows(suites._inputs(suites.parse_entry(str(write_jsonl(tmp_path / "bon.jsonl", rows))))[0])
    assert read.layout == "best_of_n" and read.rows[0].prompt == [question]



def test_a_best_of_n_suite_reads_messages_as_training_and_its_pairwise_rows_do(tmp_path):
    """Text parts are read as their text, as training and the pairwise layout read them; a row training
    would set aside (a tool turn, a tool call) is set aside and counted. The best-of-N reader took only
    string content and stopped evaluate on either."""
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "0.9 "}, {"type": "text", "text": "good"}]}]
    rows = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
             "chosen": [parts], "rejected": [[{"role": "assistant", "content": "0.1 bad"}], "0.2 worse"]},
            {"prompt": [{"role": "tool", "content": "42"}], "chosen": ["0.9 good"], "rejected": ["0.1 bad"]},
            {"prompt": "q", "chosen": [[{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]],
             "rejected": ["0.1 bad"]},
            {"prompt": "q", "chosen": ["[{'role': 'assistant', 'content': '0.9 good'}]"], "rejected": ["0.1 bad"]}]
    path = write_jsonl(tmp_path / "bon.jsonl", rows)
    read = suites.read_rows(suites._inputs(suites.parse_entry(str(path)))[0])
    assert read.layout == "best_of_n" and len(read.rows) == 1
    assert read.rows[0].prompt == [{"role": "user", "content": "q"}]
    assert read.rows[0].chosen == [[{"role": "assistant", "content": "0.9 good"}]]
    assert dict(read.skipped) == {"malformed_messages": 1, "tool_calls": 1, "messages_as_text": 1}
    entry = suites.evaluate_suite(suites.parse_entry(str(path)), NumberScorer())
    assert (entry["rows"], entry["accuracy"], entry["skipped"]) == (1, 1.0, 3)

@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_pairwise_file_like_reward_bench_1(tmp_path, suffix):
    path = tmp_path / f"rb1.{suffix}"
    if suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(_rb1_rows()), path)
    else:
        write_jsonl(path, _rb1_rows())
    entry = suites.evaluate_suite(suites.parse_entry(str(path)), NumberScorer())
    assert entry["layout"] == "pairwise" and entry["rows"] == 4 and entry["accuracy"] == 0.5
    assert entry["per_subset"] == {"alpacaeval-easy": {"rows": 3, "accuracy": pytest.approx(2 / 3)},
                                   "refusals dangerous": {"rows": 1, "accuracy": 0.0}}  # the tie is wrong
    assert entry["skipped_by_reason"] == {"identical": 1}


def test_conversational_pairs_and_a_category_column(tmp_path):
    def turn(text):
        return [{"role": "user", "content": "Review?"}, {"role": "assistant", "content": text}]

    rows = [{"chosen": turn("0.9 a"), "rejected": turn("0.1 b"), "category": "x"},
            {"chosen": turn("0.1 a"), "rejected": turn("0.2 b"), "category": "y"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    entry = suites.evaluate_suite(suites.parse_entry(str(path)), NumberScorer())
    assert entry["accuracy"] == 0.5 and set(entry["per_subset"]) == {"x", "y"}


@pytest.mark.parametrize("rows, row, field, message", [
    ([_rb2_rows()[0], {**_rb2_rows()[1], "rejected": ["0.1 a", 7, "0.2 c"]}], 2, "rejected[1]", "expected a string"),
    ([_rb2_rows()[0], {**_rb2_rows()[1], "prompt": None}], 2, "prompt", "expected a string"),
    ([_rb2_rows()[0], _rb1_rows()[0]], 2, "chosen", "row is pairwise, but the suite began best_of_n"),
    ([_rb2_rows()[0], {**_rb2_rows()[1], "rejected": "oops"}], 2, "rejected",
     "row is pairwise, but the suite began best_of_n"),
    ([_rb1_rows()[0], {"prompt": "p", "chosen": "a"}], 2, None, "missing column"),
])
def test_a_bad_row_names_its_file_row_and_field(tmp_path, rows, row, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as caught:
        suites.evaluate_suite(suites.parse_entry(str(path)), NumberScorer())
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(path), row, field)


def test_a_skipped_row_is_written_whatever_its_other_columns_hold(tmp_path):
    """evaluate writes the skipped rows beside the report: a column JSON cannot hold (a Parquet datetime,
    a lone surrogate) is written as text instead of stopping the step."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rm_lib.files import read_jsonl
    from rm_lib.files import write_jsonl as write_rows

    rows = [dict(r, note="half an emoji \ud800") for r in _rb1_rows()]
    path = tmp_path / "rb1.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, created=datetime.date(2024, 1, 2)) for r in _rb1_rows()]), path)
    for source in (write_jsonl(tmp_path / "rb1.jsonl", rows), path):
        entry = suites.evaluate_suite(suites.parse_entry(str(source)), NumberScorer())
        write_rows(tmp_path / "aside.jsonl", entry[suites.SET_ASIDE])
        (aside,) = read_jsonl(tmp_path / "aside.jsonl")
        assert aside["row"] == 5 and aside["reason"] == "identical"
        assert aside["data"].get("note", "half an emoji \\ud800") == "half an emoji \\ud800"
        assert aside["data"].get("created", "2024-01-02") == "2024-01-02"


def test_a_first_row_of_two_empty_lists_decides_no_layout(tmp_path):
    """Two empty lists fit either layout: as the first row they made the suite best-of-N, and the next
    pairwise row stopped the step; anywhere else the row was skipped as empty."""
    def chat(row: dict) -> dict:
        return {**row, "prompt": [{"role": "user", "content": row["prompt"]}],
                **{side: [{"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")}}

    empty = {"prompt": "q", "chosen": [], "rejected": []}
    pairs = [chat(r) for r in _rb1_rows()]
    for rows in ([empty, *pairs], [pairs[0], empty, *pairs[1:]]):
        entry = suites.evaluate_suite(suites.parse_entry(str(write_jsonl(tmp_path / "s.jsonl", rows))), NumberScorer())
        assert entry["layout"] == "pairwise" and entry["skipped_by_reason"]["empty_side"] == 1
    entry = suites.evaluate_suite(suites.parse_entry(str(write_jsonl(tmp_path / "b.jsonl", [empty, *_rb2_rows()]))),
                                  NumberScorer())
    assert entry["layout"] == "best_of_n" and entry["skipped_by_reason"]["empty_side"] == 1


def test_a_suite_with_no_usable_row_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [_rb1_rows()[4]])
    with pytest.raises(DataError, match=r"no row of the suite can be scored .*identical"):
        suites.evaluate_suite(suites.parse_entry(str(path)), NumberScorer())


def test_entries_names_and_the_setting(tmp_path):
    a = write_jsonl(tmp_path / "one" / "prefs.jsonl.gz", _rb1_rows(), gz=True)
    b = write_jsonl(tmp_path / "two" / "prefs.jsonl", _rb1_rows())
    parsed = suites.parse_entries([str(a), str(b), "allenai/reward-bench-2", "allenai/reward-bench@filtered"])
    assert [(s.name, s.kind, s.split) for s in parsed] == [
        ("prefs", "local", None), ("prefs_2", "local", None), ("reward_bench_2", "hub", "test"),
        ("reward_bench_filtered", "hub", "filtered")]
    # a repeated name takes the first name free of every suite's: `prefs_2` is a suite's own name here
    c = write_jsonl(tmp_path / "prefs_2.jsonl", _rb1_rows())
    assert [s.name for s in suites.parse_entries([str(a), str(b), str(c), str(a)])] == [
        "prefs", "prefs_3", "prefs_2", "prefs_4"]
    with pytest.raises(DataError, match="no such file"):
        suites.parse_entry(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no split"):
        suites.parse_entry(f"{b}@test")
    params = load_params(None, ['evaluate.suites=["rb.jsonl", "allenai/reward-bench-2"]'])
    assert params.evaluate.suites == ["rb.jsonl", "allenai/reward-bench-2"]
    assert load_params("params.yaml").evaluate.suites == []
    with pytest.raises(SettingsError, match="evaluate.suites: must be a list of strings"):
        load_params(None, ["evaluate.suites=rb.jsonl"])


def test_a_hub_suite_is_read_at_the_commit_it_records(tmp_path, monkeypatch):
    import datasets

    src = write_jsonl(tmp_path / "hub.jsonl", _rb2_rows()[:4])
    calls = []

    def fake_load(name, subset=None, split=None, revision=None):
        calls.append((name, subset, split, revision))
        return datasets.Dataset.from_json(str(src))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(sources, "hub_fingerprint", lambda name, revision: "abc123")
    entry = suites.evaluate_suite(suites.parse_entry("allenai/reward-bench-2"), NumberScorer())
    assert calls == [("allenai/reward-bench-2", None, "test", "abc123")]
    assert entry["content_hash"] == "abc123" and entry["split"] == "test" and entry["accuracy"] == 0.5


def test_metrics_json_flattens_suites_to_numbers():
    metrics = {"accuracy": 0.8, "suites": {"rb2": {"accuracy": 0.5, "layout": "best_of_n", "per_subset": {
        "Precise IF": {"rows": 2, "accuracy": 0.25}}}}}
    flat = numeric_metrics(metrics)
    assert flat == {"accuracy": 0.8, "suite_rb2_accuracy": 0.5, "suite_rb2__precise_if_accuracy": 0.25}
    # the test set's subsets: two names alike but for a control character keep a key each
    subsets = numeric_metrics({"accuracy": 0.5, "per_subset": {"x\ty": {"pairs": 3, "accuracy": 1.0},
                                                               "x y": {"pairs": 5, "accuracy": 0.2}}})
    assert subsets == {"accuracy": 0.5, "accuracy_x y": 1.0, "accuracy_x y_2": 0.2}
    # suite prefs's subset easy beside a suite prefs_easy; two subsets that sanitise alike: every figure kept
    both = {"prefs": {"accuracy": 0.1, "per_subset": {"easy": {"accuracy": 0.2}, "Precise IF": {"accuracy": 0.3},
                                                      "precise-if": {"accuracy": 0.4}}},
            "prefs_easy": {"accuracy": 0.5, "per_subset": {}}}
    assert suites.flat_metrics(both) == {
        "suite_prefs_accuracy": 0.1, "suite_prefs__easy_accuracy": 0.2, "suite_prefs__precise_if_accuracy": 0.3,
        "suite_prefs__precise_if_2_accuracy": 0.4, "suite_prefs_easy_accuracy": 0.5}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_decoder):
    """The tiny pipeline with two suites, up to the release folder (the model card)."""
    root = tmp_path_factory.mktemp("suites")
    rb1, rb2 = root / "rb1.jsonl", root / "rb2.parquet"
    write_jsonl(rb1, [{"prompt": "I watched this film and", "chosen": "the acting was superb.",
                       "rejected": "the acting was dreadful.", "subset": s, "id": i}
                      for i, s in enumerate(["easy", "easy", "hard"])]
                + [{"prompt": "p", "chosen": "the same", "rejected": "the same", "subset": "easy", "id": 3}])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": str(i), "prompt": "The second half of the drama is where",
                                          "chosen": ["the music was brilliant."],
                                          "rejected": ["the music was dull.", "the pacing was terrible.",
                                                       "the script was painful."],
                                          "subset": s} for i, s in enumerate(["Focus", "Ties"])]), rb2)
    params = tiny_params("train.max_steps=2", f'evaluate.suites=["{rb1}", "{rb2}"]', model=str(tiny_decoder))
    results = run_steps(params, root, "download", "tokenize", "filter", "train", "evaluate", "push")
    return root, results


def test_a_row_whose_answers_give_the_same_token_ids_is_set_aside(pipeline, tmp_path):
    """Answers that differ only where the tokenizer does not look (here words it does not know, both
    <unk>; in AlpacaEval, case under an uncased tokenizer) tie but for rounding: the verdict was noise.
    Set aside as filter and score set them aside, and so are answers the cut to the model's length
    leaves the same."""
    root, _ = pipeline
    scorer = RewardScorer(Layout(root).model)
    long = "the acting was superb and " * 60
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "I watched this film and", "chosen": "the acting was superb.", "rejected": "the acting was dull."},
        {"prompt": "I watched this film and", "chosen": "the acting was qqqq.", "rejected": "the acting was zzzz."},
        {"prompt": "", "chosen": "superb. " + long, "rejected": "dull. " + long}])
    assert scorer.encode([{"role": "user", "content": "qqqq"}]) == scorer.encode([{"role": "user", "content": "zz"}])
    entry = suites.evaluate_suite(suites.parse_entry(str(path)), scorer)
    assert entry["rows"] == 1 and entry["skipped_by_reason"] == {"identical_after_truncation": 1,
                                                                 "identical_tokens": 1}
    assert [(a["row"], a["reason"]) for a in entry[suites.SET_ASIDE]] == [(2, "identical_tokens"),
                                                                         (3, "identical_after_truncation")]


def test_a_model_trained_under_the_drop_policy_has_its_suite_prompts_read_whole(pipeline):
    """filter.policy=drop (the default) cut no pair, it set long prompts aside: a suite's long prompt is
    scored whole, as RewardScorer.score scores it, not cut to a limit training never cut to."""
    root, _ = pipeline
    scorer = RewardScorer(Layout(root).model)
    assert scorer.saved["lengths"]["policy"] == "drop" and scorer.max_prompt is None
    prompt = [{"role": "user", "content": "I watched this film and " * 9}]
    answer = [{"role": "assistant", "content": "the acting was superb."}]
    ids = scorer.encode(prompt + answer)
    length = scorer.prompt_length(prompt)
    assert scorer.saved["lengths"]["max_prompt_token_length"] < length and len(ids) <= scorer.max_length
    assert scorer.fit(ids, "item", length) == (ids, False)
    assert scorer.score_ids([ids], prompt_lengths=[length]).rewards == scorer.score([prompt + answer])


def test_the_step_reports_suites_in_report_metrics_summary_and_card(pipeline):
    root, results = pipeline
    layout = Layout(root)
    report = json.loads((layout.evaluation / "report.json").read_text())
    rb1, rb2 = report["suites"]["rb1"], report["suites"]["rb2"]
    assert (rb1["layout"], rb1["rows"], rb2["layout"], rb2["rows"]) == ("pairwise", 3, "best_of_n", 2)
    # a row that cannot be scored is counted in the report and written beside it, with its reason
    assert (rb1["skipped"], rb1["skipped_by_reason"]) == (1, {"identical": 1}) and "set_aside" not in rb1
    (aside,) = [json.loads(line) for line in (layout.evaluation / "suites.rejects.jsonl").read_text().splitlines()]
    assert (aside["suite"], aside["row"], aside["reason"], aside["data"]["id"]) == ("rb1", 4, "identical", 3)
    assert set(rb1["per_subset"]) == {"easy", "hard"} and set(rb2["per_subset"]) == {"Focus", "Ties"}
    # the step's accuracy is the rule applied to the model's own rewards (its recorded template)
    scorer = RewardScorer(layout.model)
    prompt = [{"role": "user", "content": "The second half of the drama is where"}]
    answers = ["the music was brilliant.", "the music was dull.", "the pacing was terrible.", "the script was painful."]
    r = scorer.score([prompt + [{"role": "assistant", "content": a}] for a in answers])
    assert rb2["accuracy"] == float(r[0] > max(r[1:]))
    metrics = json.loads((layout.evaluation / "metrics.json").read_text())
    assert metrics["suite_rb2_accuracy"] == rb2["accuracy"] and "suite_rb1__easy_accuracy" in metrics
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert "suite rb2 (best_of_n, 2 rows)" in results["evaluate"].summary()
    card = (layout.release / "README.md").read_text()
    # in the project: named from it
    assert f"| `rb2` | `rb2.parquet` | best_of_n | 2 | 0 | {rb2['accuracy']:.4f} |" in card
    # the rows skipped are on the card, with why: its accuracy is of the rows scored (it showed neither)
    assert f"| `rb1` | `rb1.jsonl` | pairwise | 3 | 1 (identical 1) | {rb1['accuracy']:.4f} |" in card
    assert "a row whose sides are the same text, or the same tokens for this model, is skipped" in card


def test_a_suite_of_pairs_the_model_trained_on_is_said_to_be_one(pipeline):
    """The held-out pairs are counted against the prompts the model trained on; a suite was not, and a suite
    of training pairs was published as a benchmark with no word of it."""
    from rm_lib.data import trained_prompts
    from rm_lib.publish import model_card

    root, _ = pipeline
    layout = Layout(root)
    scorer, trained = RewardScorer(layout.model), trained_prompts.read(layout.model)
    entry = suites.evaluate_suite(suites.parse_entry(str(layout.pairs / "train.jsonl")), scorer, trained)
    seen = entry[trained_prompts.SEEN]
    assert entry["rows"] * 0.9 < seen["rows"] <= entry["rows"]
    held_out = suites.evaluate_suite(suites.parse_entry(str(layout.pairs / "test.jsonl")), scorer, trained)
    assert held_out[trained_prompts.SEEN] == {"rows": 0, "accuracy_unseen": held_out["accuracy"]}
    assert suites.evaluate_suite(suites.parse_entry(str(layout.pairs / "test.jsonl")), scorer).keys() == \
        held_out.keys() - {trained_prompts.SEEN}  # no record: nothing said
    # a pair without a prompt is keyed by its two sides, as tokenize keys such a training pair
    no_prompt = [{"prompt": "", "chosen": "the acting was superb.", "rejected": "the acting was dreadful."}]
    from rm_lib.data import formats, keys

    (_, pair), = formats.Normaliser("train.jsonl")([(1, no_prompt[0])])  # as download writes a training pair
    record = {"own": [keys.digest(k) for k in keys.prompt_keys([pair])], "bases": []}
    sideways = suites.evaluate_suite(suites.parse_entry(str(write_jsonl(layout.root / "np.jsonl", no_prompt))), scorer,
                                     record)
    assert sideways[trained_prompts.SEEN]["rows"] == 1
    said = f"{seen['rows']} of {entry['rows']} rows ask a prompt the model (or a base it trained on from) trained on"
    assert f"warning: {said}" in suites.summary_lines({"train": entry})
    assert "warning" not in suites.summary_lines({"test": held_out})
    assert f"Warning: suite `train`: {said}" in model_card._suites({"suites": {"train": entry}})


def test_the_held_out_pairs_scored_as_a_suite_get_evaluates_rewards_where_the_filter_cut_prompts(tmp_path,
                                                                                                  tiny_decoder,
                                                                                                  monkeypatch):
    """A suite cut its texts to the model's length alone, not its prompts to the prompt limit training
    recorded: the held-out pairs scored as a suite read 43 of 160 texts from other ids than evaluate and
    score, and 7 verdicts flipped."""
    from rm_lib.files import read_jsonl

    params = tiny_params("filter.policy=truncate", "filter.max_token_length=40", "filter.max_prompt_token_length=10",
                         "train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    assert read_json_file(tmp_path / "data/filtered/manifest.json")["truncated"]["test"] > 0
    captured = {}
    real = suites._score_unique

    def keep(*args, **kwargs):
        rewards, truncated = real(*args, **kwargs)
        captured.update(rewards)
        return rewards, truncated

    monkeypatch.setattr(suites, "_score_unique", keep)
    entry = suites.evaluate_suite(suites.parse_entry(str(tmp_path / "data/pairs/test.jsonl")),
                                  RewardScorer(Layout(tmp_path).model))
    scores = {r["id"]: r for r in read_jsonl(tmp_path / "data/evaluation/scores.jsonl")}
    pairs = read_jsonl(tmp_path / "data/pairs/test.jsonl")
    assert entry["rows"] == len(pairs) == len(scores)
    scorer = RewardScorer(Layout(tmp_path).model)
    for pair in pairs:
        for side in ("chosen", "rejected"):
            key = suites._key(scorer, pair["prompt"] + pair[side], pair["prompt"])
            assert captured[key] == pytest.approx(scores[pair["id"]][f"reward_{side}"], abs=1e-5), (pair["id"], side)
    assert entry["accuracy"] == pytest.approx(read_json_file(tmp_path / "data/evaluation/report.json")["accuracy"])

    # one conversation in two rows under two prompt splits: each row's prompt is cut where its own split says,
    # whichever row comes first (the first row's cut reward was given to both)
    def turn(role, text):
        return [{"role": role, "content": text}]

    u1, a1 = turn("user", "the film was good and the acting was not bad at all"), turn("assistant", "the plot")
    u2, a2, r2 = turn("user", "and the humour"), turn("assistant", "was good"), turn("assistant", "was awful")
    split_late = {"id": "late", "prompt": u1 + a1 + u2, "chosen": a2, "rejected": r2}
    split_early = {"id": "early", "prompt": u1, "chosen": a1 + u2 + a2, "rejected": a1 + u2 + r2}
    assert scorer.prompt_length(split_late["prompt"]) > scorer.max_prompt
    alone = scorer.score_ids([scorer.encode(split_early["prompt"] + split_early["chosen"])],
                             prompt_lengths=[scorer.prompt_length(split_early["prompt"])]).rewards[0]
    for order in ([split_late, split_early], [split_early, split_late]):
        captured.clear()
        write_jsonl(tmp_path / "split.jsonl", order)
        suites.evaluate_suite(suites.parse_entry(str(tmp_path / "split.jsonl")), scorer)
        key = suites._key(scorer, split_early["prompt"] + split_early["chosen"], split_early["prompt"])
        assert captured[key] == pytest.approx(alone, abs=1e-5), order[0]["id"]


def read_json_file(path):
    return json.loads(path.read_text())


def test_a_suite_of_token_ids_by_any_of_trls_names_is_one_line():
    """TRL 1.x's id columns (chosen_ids, chosen_input_ids), alone or beside texts, crashed a suite with a
    KeyError once download read them as pretokenized pairs: refused in one line, as the older names were."""
    for row in ({"chosen_ids": [1, 2], "rejected_ids": [1, 3]},
                {"chosen_input_ids": [1, 2], "rejected_input_ids": [1, 3]},
                {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_ids": [1, 2], "rejected_ids": [1, 3]},
                {"input_ids_chosen": [1, 2], "input_ids_rejected": [1, 3]}):
        with pytest.raises(DataError, match=r"s.jsonl, row 1: pretokenized rows \(.*\) cannot be a suite"):
            suites.read_rows([("s.jsonl", [(1, row)])])

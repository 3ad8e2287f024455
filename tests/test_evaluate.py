"""evaluate: accuracy per subset, length dependence and calibration, numbers-only metrics for DVC,
demo figures labelled as demo."""
from __future__ import annotations

import json
import math

import pytest

from rm_lib.evaluation import plots
from rm_lib.evaluation.metrics import calibration, pair_metrics, pearson, subset_accuracy
from rm_lib.files import read_json, read_jsonl
from rm_lib.layout import Layout

from helpers import run_steps, tiny_params


def test_subset_accuracy_counts_ties_as_wrong_and_skips_unnamed_pairs():
    assert subset_accuracy([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0], ["a", "a", "b", None]) == {
        "a": {"pairs": 2, "accuracy": 0.5}, "b": {"pairs": 1, "accuracy": 0.0}}
    assert subset_accuracy([1.0], [0.0], [None]) == {}


def test_a_model_that_only_counts_tokens_is_seen_for_what_it_is():
    # reward = length: it prefers the longer answer every time and its reward follows length exactly
    lc, lr = [30, 12, 50, 8], [10, 40, 20, 9]
    m = pair_metrics([float(x) for x in lc], [float(x) for x in lr], lc, lr, buckets=2)
    assert m["prefers_longer"] == 1.0
    assert m["reward_length_correlation"] == pytest.approx(1.0)
    assert m["margin_length_correlation"] == pytest.approx(1.0)
    assert m["accuracy"] == m["longer_wins_baseline"] == 0.5
    # the opposite model, and one blind to length
    assert pair_metrics([-x for x in lc], [-x for x in lr], lc, lr)["prefers_longer"] == 0.0
    same = pair_metrics([1.0, 2.0], [0.0, 0.0], [5, 5], [5, 5])
    assert same["prefers_longer"] is None and same["reward_length_correlation"] is None  # no length to follow


def test_pearson_matches_its_definition_and_is_undefined_for_a_constant():
    xs, ys = [1.0, 2.0, 4.0, 7.0], [2.0, 1.0, 5.0, 6.0]
    mx, my = sum(xs) / 4, sum(ys) / 4
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(
        sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert pearson(xs, ys) == pytest.approx(r)
    assert pearson([1.0, 1.0], [2.0, 3.0]) is None and pearson([1.0], [1.0]) is None
    # a constant whose summed mean rounds (0.1 x 5) was a spread of 1e-17 and r = 0.0: "no length dependence"
    assert pearson(list(range(24)), [0.1] * 24) is None
    flat = pair_metrics([0.1] * 5, [0.1] * 5, [1, 2, 3, 4, 5], [5, 6, 7, 8, 9])
    assert flat["reward_length_correlation"] is None and flat["reward_std"] == 0.0
    assert all(abs(pearson(xs, [3 * x + 0.1 for x in xs])) <= 1.0 for xs in ([0.1, 0.2, 0.3, 0.7], list(range(9))))
    # a NaN stays NaN wherever it stands: not clamped to 1.0, not a constant of spread 0
    for ys in ([1.0, math.nan, 3.0, 4.0], [0.5, math.nan, 0.5, 0.5], [math.nan, 0.5, 0.5, 0.5]):
        assert math.isnan(pearson([1.0, 2.0, 3.0, 4.0], ys)), ys


def test_a_nan_reward_is_a_wrong_answer_wherever_it_stands():
    """A NaN crashed the calibration (int(nan)), and a best-of-N row was right or wrong by the NaN's place."""
    from rm_lib.evaluation.suites import row_correct

    ece, bins = calibration([math.nan, 2.0], [0.0, 0.0])
    assert sum(b["pairs"] for b in bins) == 2 and bins[0]["range"] == "0.50-0.55" and bins[0]["accuracy"] == 0.0
    assert row_correct([5.0, math.nan], [1.0]) is False and row_correct([math.nan, 5.0], [1.0]) is False
    assert row_correct([5.0], [math.nan, 1.0]) is False and row_correct([5.0, 2.0], [1.0]) is True
    assert row_correct([math.inf], [1.0]) is True  # as a pair's accuracy counts it (inf > 1)
    # nor does a NaN prefer the longer answer (NaN != x held, and a shorter chosen side counted as one)
    nan = pair_metrics([math.nan] * 4, [0.0, 1.0, 2.0, 3.0], [5] * 4, [10, 11, 12, 13])
    assert nan["prefers_longer"] == 0.0 and nan["accuracy"] == 0.0
    assert pair_metrics([1.0, 2.0, math.nan, 4.0], [0.0, 3.0, 2.0, 3.0], [5] * 4, [9] * 4)["prefers_longer"] == 0.25


def test_calibration_error_is_the_gap_between_confidence_and_accuracy():
    # margins of +-log(3): confidence sigmoid = 0.75 for every pair; 3 of 4 right -> calibrated
    m = math.log(3)
    ece, bins = calibration([m, m, m, -m], [0.0] * 4)
    assert ece == pytest.approx(0.0, abs=1e-12) and bins == [
        {"range": "0.75-0.80", "pairs": 4, "confidence": pytest.approx(0.75), "accuracy": 0.75}]  # bins hold [lo, hi)
    # the same confidence with every pair wrong: off by 0.75; a tie is a wrong guess at 0.5
    assert calibration([-m] * 2, [0.0] * 2)[0] == pytest.approx(0.75)
    ece, bins = calibration([1.0], [1.0])
    assert ece == pytest.approx(0.5) and bins[0]["range"] == "0.50-0.55"
    # very sure and right: confidence ~1 lands in the last bin, error ~0
    ece, bins = calibration([40.0], [0.0])
    assert ece == pytest.approx(0.0, abs=1e-9) and bins[0]["range"] == "0.95-1.00"


def test_reward_against_length_plots_every_answer_and_names_the_correlation():
    fig = plots.reward_vs_length_figure([10, 20], [1.0, 2.0], [15, 5], [0.5, -1.0], 0.93)
    (ax,) = fig.axes
    chosen, rejected = ax.collections
    assert chosen.get_offsets().tolist() == [[10, 1.0], [20, 2.0]]
    assert rejected.get_offsets().tolist() == [[15, 0.5], [5, -1.0]]
    assert "+0.930" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chosen", "rejected"]
    plots._pyplot().close("all")


def test_the_demo_reports_each_subset_and_says_it_is_demo_data(tmp_path, tiny_decoder):
    results = run_steps(tiny_params("train.max_steps=2", model=str(tiny_decoder)), tmp_path,
                        "download", "tokenize", "filter", "train", "evaluate")
    layout = Layout(tmp_path)
    report = json.loads((layout.evaluation / "report.json").read_text())
    assert set(report["per_subset"]) == {"easy", "medium", "hard"}
    assert sum(e["pairs"] for e in report["per_subset"].values()) == report["pairs"]
    assert report["demo_data"] is True and "demo data" in results["evaluate"].summary()
    metrics = json.loads((layout.evaluation / "metrics.json").read_text())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics
    assert {"accuracy", "accuracy_easy", "accuracy_hard", "longer_wins_baseline"} <= set(metrics)
    # length dependence and calibration: in the report, the DVC metrics, the UI summary, with a picture
    for key in ("prefers_longer", "reward_length_correlation", "calibration_ece"):
        assert key in report and key in metrics
    assert (layout.evaluation / "reward_vs_length.png").stat().st_size > 0
    assert "prefers the longer answer" in results["evaluate"].summary()
    manifest = json.loads((layout.pairs / "manifest.json").read_text())
    assert "subset" not in manifest.get("ignored_columns", {})  # read, not ignored


def test_the_report_and_card_say_how_many_held_out_pairs_the_filter_set_aside(tmp_path, tiny_decoder):
    """A filter that drops the long prompts leaves an accuracy of the short pairs only: the report, the
    summary, metrics.json and the card said only "pairs 137" (of 390)."""
    params = tiny_params("train.max_steps=2", "filter.max_prompt_token_length=12", model=str(tiny_decoder))
    results = run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate", "push")
    layout = Layout(tmp_path)
    report = json.loads((layout.evaluation / "report.json").read_text())
    held = report["held_out"]
    aside = held["set_aside_by_filter"]
    assert aside.get("prompt_too_long", 0) > 0 and held["filter_policy"] == "drop"
    assert held["pairs_before_filter"] == report["pairs"] + sum(aside.values()) == results["tokenize"].rows["test"]
    assert json.loads((layout.evaluation / "metrics.json").read_text())["pairs_before_filter"] == \
        held["pairs_before_filter"]
    said = f"{report['pairs']} pairs of {held['pairs_before_filter']} held out ({sum(aside.values())} set aside: "
    assert said in results["evaluate"].summary()
    card = (layout.release / "README.md").read_text()
    assert (f"| pairs | {report['pairs']} of {held['pairs_before_filter']} held out, {sum(aside.values())} set "
            "aside (") in card


def test_length_figures_count_the_tokens_before_truncation(tmp_path, tiny_decoder):
    """With filter.policy=truncate the model sees cut ids, but the length baselines, the length buckets and
    the reward-length correlation are about the answers: they count the tokens before the cut."""
    from rm_lib.data.tokenstore import read_rows

    run_steps(tiny_params("train.max_steps=1", "filter.policy=truncate", "filter.max_token_length=20",
                          "filter.max_prompt_token_length=null", model=str(tiny_decoder)), tmp_path,
              "download", "tokenize", "filter", "train", "evaluate")
    layout = Layout(tmp_path)
    full = {r["id"]: r for r in read_rows(layout.tokenized / "test.parquet")}
    kept = read_rows(layout.filtered / "test.parquet")
    assert any(len(r["input_ids_chosen"]) < len(full[r["id"]]["input_ids_chosen"]) for r in kept), "nothing was cut"
    scores = [json.loads(line) for line in (layout.evaluation / "scores.jsonl").read_text().splitlines()]
    expected = pair_metrics([s["reward_chosen"] for s in scores], [s["reward_rejected"] for s in scores],
                            [len(full[s["id"]]["input_ids_chosen"]) for s in scores],
                            [len(full[s["id"]]["input_ids_rejected"]) for s in scores], buckets=4)
    report = json.loads((layout.evaluation / "report.json").read_text())
    for key in ("longer_wins_baseline", "shorter_wins_baseline", "prefers_longer", "reward_length_correlation"):
        assert report[key] == pytest.approx(expected[key]), key


def test_the_figures_logged_in_training_are_evaluates_for_the_same_model(tmp_path, tiny_decoder):
    """With pairs the filter cut (policy truncate), the length baselines logged during training counted the
    cut ids: 0.25 / 0.36 where evaluate said 0.41 / 0.58 for the same model and pairs."""
    params = tiny_params("filter.policy=truncate", "filter.max_token_length=24", "filter.max_prompt_token_length=12",
                         "train.max_steps=2", "train.eval_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train", "evaluate")
    assert read_json(tmp_path / "data/filtered/manifest.json")["truncated"]["test"] > 0
    logged = [r for r in read_jsonl(tmp_path / "data/train/metrics.jsonl") if "eval_accuracy" in r][-1]
    report = read_json(tmp_path / "data/evaluation/report.json")
    for figure in ("accuracy", "longer_wins_baseline", "shorter_wins_baseline", "prefers_longer",
                   "reward_length_correlation"):
        assert logged[f"eval_{figure}"] == pytest.approx(report[figure], abs=1e-6), figure


def test_length_buckets_never_split_pairs_of_one_length():
    """Buckets cut at equal counts split the pairs of one length between two (labels 24-35 and 35-42 both
    held length 35; with 100 buckets '42-42' six times): a bucket's figures were not those of its range."""
    import random

    rng = random.Random(0)
    longest = [rng.choice([24, 35, 35, 42, 42, 42, 45]) for _ in range(200)]
    rewards = [rng.random() for _ in range(200)]
    for buckets in (4, 100):
        per = pair_metrics(rewards, [0.5] * 200, longest, [1] * 200, buckets=buckets)["per_length_bucket"]
        ranges = [tuple(map(int, b["range"].split("-"))) for b in per]
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, in order
        for (low, high), bucket in zip(ranges, per):
            inside = [i for i, n in enumerate(longest) if low <= n <= high]
            assert bucket["pairs"] == len(inside)
            assert bucket["accuracy"] == pytest.approx(sum(rewards[i] > 0.5 for i in inside) / len(inside))
    even = pair_metrics([1.0] * 8, [0.0] * 8, list(range(8)), [0] * 8, buckets=4)["per_length_bucket"]
    assert [b["pairs"] for b in even] == [2, 2, 2, 2]  # distinct lengths: equal counts as before

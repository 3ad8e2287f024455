"""evaluate: accuracy per subset, numbers-only metrics for DVC, demo figures labelled as demo."""
from __future__ import annotations

import json

from rm_lib.evaluation.metrics import subset_accuracy
from rm_lib.layout import Layout

from helpers import run_steps, tiny_params


def test_subset_accuracy_counts_ties_as_wrong_and_skips_unnamed_pairs():
    assert subset_accuracy([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0], ["a", "a", "b", None]) == {
        "a": {"pairs": 2, "accuracy": 0.5}, "b": {"pairs": 1, "accuracy": 0.0}}
    assert subset_accuracy([1.0], [0.0], [None]) == {}


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
    manifest = json.loads((layout.pairs / "manifest.json").read_text())
    assert "subset" not in manifest.get("ignored_columns", {})  # read, not ignored

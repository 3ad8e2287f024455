"""`make run`'s main job on the shipped defaults: the demo teaches (an accuracy well above the length
baselines and well below perfect), and the end of the run says where to look and what to run next."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rm_lib.data.demo import demo_pairs

from helpers import offline_env

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_is_learnable_only_in_part():
    rows = demo_pairs(3000, seed=42)
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
    shorter = sum(len(r["chosen"]) < len(r["rejected"]) for r in rows) / len(rows)
    assert longer < 0.5 < shorter < 0.6  # length misleads, a little
    assert {r["subset"] for r in rows} == {"easy", "medium", "hard"}
    assert demo_pairs(50, seed=1) == demo_pairs(50, seed=1) != demo_pairs(50, seed=2)


@pytest.mark.integration
def test_make_runs_main_job_on_the_demo_learns_but_not_perfectly(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    out = subprocess.run([sys.executable, "-m", "rm_lib", "run"], cwd=tmp_path, env=offline_env(),
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "data/evaluation/report.json").read_text())
    baseline = max(report["longer_wins_baseline"], report["shorter_wins_baseline"])
    assert baseline + 0.1 < report["accuracy"] < 0.98, report
    assert report["per_subset"]["easy"]["accuracy"] > report["per_subset"]["hard"]["accuracy"]
    tail = out.stdout[out.stdout.index("Done. What the run made:"):]
    for words in ("models/reward_model", "data/evaluation/report.json", "data/release", "demo data",
                  "data/pairs/rejects.jsonl", "data/filtered/dropped.jsonl", "http://127.0.0.1:3000", "dvc exp run"):
        assert words in tail, words
    assert (tmp_path / "data/release/README.md").read_text().count("Demo data") == 1
    # The baseline a fresh clone shows in `dvc exp show` / `dvc metrics diff` is this run's figures.
    # After a change that moves them: cp data/evaluation/metrics.json from `make run` and commit it.
    measured = json.loads((tmp_path / "data/evaluation/metrics.json").read_text())
    committed = json.loads((ROOT / "data/evaluation/metrics.json").read_text())
    assert set(committed) == set(measured)
    for key, value in measured.items():
        assert math.isclose(committed[key], value, abs_tol=2e-3), (key, committed[key], value)

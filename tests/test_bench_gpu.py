"""The GPU benchmark's summary: the ratios and the targets of the GPU goal, from the runs' figures."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


def run(tokens_per_s: float, mfu: float | None, peak: float, accuracy: float, pairs_per_s: float = 1.0) -> dict:
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gpu_mib": peak, "accuracy": accuracy,
            "pairs_per_s": pairs_per_s}


def test_targets_are_judged_against_both_trl_settings():
    ours = {"hh": run(33_000, 0.45, 17_000, 0.640, pairs_per_s=30), "alpaca": run(40_000, 0.35, 20_000, 0.80)}
    trl = {"hh": run(10_000, None, 17_400, 0.635), "alpaca": run(15_000, None, 17_800, 0.79)}
    trl_no_gc = {"hh": run(12_000, None, 30_000, 0.635), "alpaca": run(18_000, None, 31_000, 0.79)}
    cases = bench_gpu.summarize(ours, trl, trl_no_gc, (run(33_000, 0.45, 1, 0, pairs_per_s=30),
                                                       run(20_000, 0.45, 1, 0, pairs_per_s=20)))
    hh, alpaca = cases["hh"], cases["alpaca"]
    assert hh["tokens_per_s_vs_trl_default"] == pytest.approx(3.3)
    assert hh["tokens_per_s_vs_trl_no_checkpointing"] == pytest.approx(2.75)
    assert hh["targets"] == {"3x_trl_default": True, "3x_trl_no_checkpointing": False, "mfu_40": True,
                             "memory_at_most_trl": True, "accuracy_within_1_point": True}
    assert hh["shared_prompt_pairs_per_s_gain"] == pytest.approx(1.5)
    assert alpaca["targets"]["mfu_40"] is False and alpaca["targets"]["memory_at_most_trl"] is False
    assert alpaca["accuracy_points_vs_trl_default"] == pytest.approx(1.0)
    assert alpaca["targets"]["accuracy_within_1_point"]  # one point, to float rounding
    assert "shared_prompt_pairs_per_s_gain" not in alpaca

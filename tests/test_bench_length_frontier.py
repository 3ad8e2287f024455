"""The length-frontier benchmark's two pieces of arithmetic: the length regressed out of the features,
and the Bradley-Terry fit on pair differences."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_length_frontier  # noqa: E402


def test_residualised_features_are_uncorrelated_with_log_length_where_fitted():
    g = torch.Generator().manual_seed(0)
    log_len = torch.rand(200, generator=g, dtype=torch.float64) * 5
    features = torch.randn(200, 6, generator=g, dtype=torch.float64) + 3 * log_len[:, None]
    fit_on = torch.arange(150)
    content = bench_length_frontier.residualise(features, log_len, fit_on)
    for j in range(6):
        assert abs(torch.corrcoef(torch.stack([content[fit_on, j], log_len[fit_on]]))[0, 1]) < 1e-9
    assert torch.corrcoef(torch.stack([features[:, 0], log_len]))[0, 1] > 0.9  # there was length to remove


def test_pairwise_fit_recovers_the_preferred_direction():
    g = torch.Generator().manual_seed(1)
    truth = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    a, b = torch.randn(400, 3, generator=g, dtype=torch.float64), torch.randn(400, 3, generator=g, dtype=torch.float64)
    chosen_first = (a @ truth > b @ truth)[:, None]
    diffs = torch.where(chosen_first, a - b, b - a)  # chosen minus rejected
    w = bench_length_frontier.fit_pairwise(diffs, lam=0.01)
    assert torch.nn.functional.cosine_similarity(w, truth, dim=0) > 0.95
    assert (diffs @ w > 0).double().mean() > 0.95

"""Bradley-Terry loss for reward models, and the length-decorrelation term of length-debiased training."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), plus c * mean((r_c + r_r)^2) to keep rewards centred at 0."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def length_correlation(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the rewards of a batch's sequences with their log token counts; 0 where
    either is constant (nothing to follow). Differentiable in the rewards."""
    x = torch.log(lengths.to(rewards.dtype))
    x, y = x - x.mean(), rewards - rewards.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return torch.where(denominator > 1e-12, (x * y).sum() / denominator.clamp_min(1e-12), torch.zeros_like(denominator))

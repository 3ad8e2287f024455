"""Bradley-Terry loss for reward models."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), plus c * mean((r_c + r_r)^2) to keep rewards centred at 0.
    Rewards and margins are one value per pair: [B] each."""
    _check_pairs(r_chosen, r_rejected, margin)
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def _check_pairs(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None) -> None:
    """Scores of shape [B, 1] against margins of [B] would broadcast to [B, B]: every pair set against
    every other's margin, a wrong loss without an error."""
    shapes = [tuple(t.shape) for t in (r_chosen, r_rejected, margin) if t is not None]
    if r_chosen.dim() != 1 or len(set(shapes)) > 1:
        raise ValueError(f"bradley_terry_loss: chosen rewards, rejected rewards and margins must each be one value "
                         f"per pair, of one shape [B]; got {', '.join(map(str, shapes))}")

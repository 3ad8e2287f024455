"""Length-debiased training (`train.length_debias`).

Preference data rewards length: in AlpacaEval the longer answer wins 86% of pairs. A reward model
trained on it learns "longer is better", and a policy tuned on that reward learns to pad. Here the
Bradley-Terry loss sees the sum of the model's reward and a length head's score, a linear function
of the log token count; the head soaks up what length alone explains, and a penalty on the squared
correlation of the model's reward with length (over each batch's sequences) keeps the model from
learning it too. The head is trained with the model, saved in checkpoints so a resume is exact,
and dropped when the model is saved: the published reward is the model's alone.
"""
from __future__ import annotations

import torch

from rm_lib.model.loss import bradley_terry_loss, length_correlation

# The head is one scalar. At the model's learning rate (5e-5) AdamW moves it by about that much per
# step, so after an epoch of a few hundred steps it still explains next to nothing and the correlation
# penalty alone has to strip length from the model. Its own, larger rate lets it absorb length early.
HEAD_LEARNING_RATE = 0.02


class LengthHead(torch.nn.Module):
    """score = weight * log(length): starts at 0, so the first step is plain Bradley-Terry."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.log(lengths.float())


def debiased_loss(scores: torch.Tensor, length_scores: torch.Tensor, lengths: torch.Tensor, n_pairs: int,
                  margin: torch.Tensor | None, center_rewards_coefficient: float | None,
                  weight: float) -> torch.Tensor:
    """Bradley-Terry on reward + length score, plus weight * corr(reward, log length)^2.
    `scores`, `length_scores`, `lengths`: [2B], the B chosen sequences first."""
    total = scores + length_scores.to(scores.dtype)
    loss = bradley_terry_loss(total[:n_pairs], total[n_pairs:], margin, center_rewards_coefficient)
    return loss + weight * length_correlation(scores.float(), lengths) ** 2


def sequence_lengths(rows: list[dict], device: torch.device) -> torch.Tensor:
    """Token counts of a chunk's sequences in the order the batch holds them: chosen, then rejected."""
    counts = [len(r["input_ids_chosen"]) for r in rows] + [len(r["input_ids_rejected"]) for r in rows]
    return torch.tensor(counts, dtype=torch.float32, device=device)

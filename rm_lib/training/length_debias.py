"""Length-debiased training (`train.length_debias`).

Preference data rewards length: in AlpacaEval the longer answer wins 86% of pairs. A reward model
trained on it learns "longer is better", and a policy tuned on that reward learns to pad. Here the
Bradley-Terry loss sees the sum of the model's reward and a length head's score, a linear function
of the log token count; the head soaks up what length alone explains, and a penalty on the squared
correlation of the model's reward with length keeps the model from learning it too. The head is
trained with the model, saved in checkpoints so a resume is exact, and dropped when the model is
saved: the published reward is the model's alone.

The correlation is the pooled one, over the whole train split, as evaluation measures it: a batch's
rewards and log lengths are set against the split's means and spreads (the lengths' known up front,
the rewards' running ones), not the batch's own. Batches grouped by length hold sequences of similar length,
and a correlation within each batch would miss a reward that is high for the long batches and low
for the short ones. The penalty's gradient is that of the split's squared correlation, its
correlation factor taken from running values (`LengthHead.penalty` says why). The trainer lets the
head observe a step's rewards once all its forwards ran, so every forward of a step is judged against
the same running values and a step split into several forwards trains as one; with several processes
it observes all of the step's rewards, summed over them (`LengthHead.sums`), so they train as one. Its
first step, before any were observed, has no penalty.
"""
from __future__ import annotations

import torch

from rm_lib.model.batching import to_device
from rm_lib.model.loss import bradley_terry_loss

# The head is one scalar. At the model's learning rate (5e-5) AdamW moves it by about that much per
# step, so after an epoch of a few hundred steps it still explains next to nothing and the correlation
# penalty alone has to strip length from the model. Its own, larger rate lets it absorb length early.
HEAD_LEARNING_RATE = 0.02
# The running mean and variance of the rewards follow the model over about 1 / (1 - REWARD_MOMENTUM) steps.
REWARD_MOMENTUM = 0.9
# The penalty's push on a reward is 2 c x / sigma: at the start of training the rewards of a new score
# head spread over a few hundredths, so it would outweigh Bradley-Terry a hundredfold, and the reward
# never grows a spread of its own. Below one logit of spread the push is that of a reward spread over one.
SPREAD_FLOOR = 1.0


def _running(old: torch.Tensor, new: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """The running value after `new`; `new` itself the first time."""
    return torch.where(observed, REWARD_MOMENTUM * old + (1 - REWARD_MOMENTUM) * new, new)


class LengthHead(torch.nn.Module):
    """score = weight * log(length): starts at 0, so the first step is plain Bradley-Terry. Its buffers
    are what the penalty measures against: the mean and spread of the train split's log token counts,
    and running values of the rewards' mean, variance and covariance with log length (in checkpoints
    with the weight, so a resume is exact)."""

    def __init__(self, log_length_mean: float = 0.0, log_length_std: float = 1.0) -> None:
        super().__init__()
        # one element, not a scalar: FSDP shards no 0-dimensional parameter
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("log_length_mean", torch.tensor(float(log_length_mean)))
        self.register_buffer("log_length_std", torch.tensor(float(log_length_std)))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_var", torch.zeros(()))
        self.register_buffer("covariance", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    @classmethod
    def for_rows(cls, rows: list[dict]) -> LengthHead:
        logs = sequence_lengths(rows, torch.device("cpu")).double().log()
        spread = float(logs.std()) if len(logs) > 1 else 0.0
        return cls(float(logs.mean()), spread if spread > 0 else 1.0)

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.log(lengths.float())

    def _centred(self, rewards: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised log lengths (the split's mean and spread) and rewards less the running mean
        (this batch's own mean before any was observed)."""
        x = (torch.log(lengths.to(rewards.dtype)) - self.log_length_mean) / self.log_length_std
        # copies: observe() updates the buffers in place before this graph's backward has run
        return x, rewards - torch.where(self.observed.clone(), self.reward_mean.clone(), rewards.detach().mean())

    def running_correlation(self) -> torch.Tensor:
        """The split's corr(reward, log length) as the running values hold it (0 before any were)."""
        return torch.where(self.observed, self.covariance / torch.sqrt(self.reward_var + 1e-12), 0.0)

    def penalty(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """corr(reward, log length)^2 over the split, as the running values hold it before this batch
        (this batch's own on the first): the same for every forward of a step. Its gradient in this
        batch's rewards is 2 c x / (B sigma): c and sigma are the running correlation and reward spread
        from before this batch (this batch's own on the first), held fixed, so the penalty lowers the
        rewards' covariance with length; sigma is at least SPREAD_FLOOR.

        Squaring one batch's own estimate instead would add its sampling variance to the objective:
        with batches grouped by length, that is the spread of the batches' mean rewards, so the
        penalty would press every batch's mean towards the running mean and shrink the reward's
        scale, content and all, where the split's correlation is zero. Letting sigma move would
        reward spreading the rewards out at random, which also lowers a correlation."""
        x, y = self._centred(rewards, lengths)
        observed = self.observed.clone()
        covariance = (x * y).mean()
        detached = covariance.detach()
        spread = (y.detach() ** 2).mean()
        sigma = torch.sqrt(torch.where(observed, self.reward_var.clone(), spread) + 1e-12)
        before = torch.where(observed, self.covariance.clone(), detached) / sigma
        return before ** 2 + 2 * before * (covariance - detached) / sigma.clamp(min=SPREAD_FLOOR)

    @torch.no_grad()
    def observe(self, rewards: torch.Tensor, lengths: torch.Tensor) -> None:
        """Moves the running reward mean, variance and covariance with log length towards those of
        these rewards (a step's; on the device: no host sync)."""
        self.observe_sums(self.sums(rewards, lengths))

    @torch.no_grad()
    def sums(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What `observe_sums` needs of these rewards: [count, sum r, sum r^2, sum x, sum x r] (x the
        standardised log length), in float64. Sums add up over processes: a step split over several
        observes what one process holding all its pairs would."""
        r = rewards.detach().double()
        x = ((torch.log(lengths.double()) - self.log_length_mean) / self.log_length_std).to(r.device)
        # filled on the device: torch.tensor(...) there would copy from host memory and wait for the GPU
        count = torch.full((), float(r.numel()), dtype=torch.float64, device=r.device)
        return torch.stack([count, r.sum(),
                            (r * r).sum(), x.sum(), (x * r).sum()])

    @torch.no_grad()
    def observe_sums(self, sums: torch.Tensor) -> None:
        """`observe` from the `sums` of a step's rewards. Against the new running mean m:
        mean((r - m)^2) = E[r^2] - 2 m E[r] + m^2 and mean(x (r - m)) = E[x r] - m E[x]."""
        _, r, r2, x, xr = (sums / sums[0]).unbind()
        mean = _running(self.reward_mean.double(), r, self.observed)
        variance = (r2 - 2 * mean * r + mean * mean).clamp(min=0)
        self.reward_var.copy_(_running(self.reward_var.double(), variance, self.observed))
        self.covariance.copy_(_running(self.covariance.double(), xr - mean * x, self.observed))
        self.reward_mean.copy_(mean)
        self.observed.fill_(True)


def debiased_loss(scores: torch.Tensor, length_scores: torch.Tensor, lengths: torch.Tensor, n_pairs: int,
                  margin: torch.Tensor | None, center_rewards_coefficient: float | None,
                  weight: float, head: LengthHead) -> torch.Tensor:
    """Bradley-Terry on reward + length score, plus weight * (the split's corr(reward, log length))^2.
    `scores`, `length_scores`, `lengths`: [2B], the B chosen sequences first."""
    total = scores + length_scores.to(scores.dtype)
    loss = bradley_terry_loss(total[:n_pairs], total[n_pairs:], margin, center_rewards_coefficient)
    return loss + weight * head.penalty(scores.float(), lengths)


def sequence_lengths(rows: list[dict], device: torch.device) -> torch.Tensor:
    """Token counts of a chunk's sequences in the order the batch holds them: chosen, then rejected."""
    counts = [len(r["input_ids_chosen"]) for r in rows] + [len(r["input_ids_rejected"]) for r in rows]
    return to_device(torch.tensor(counts, dtype=torch.float32), device)  # no wait for a GPU copy

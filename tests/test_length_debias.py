"""train.length_debias: a length head soaks up length during training, the published reward is
decorrelated from length, and the head never reaches the saved model."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rm_lib.evaluation.metrics import pair_metrics, pearson
from rm_lib.training.length_debias import LengthHead, debiased_loss

from helpers import run_steps, tiny_params


def _exact_squared_correlation(head: LengthHead, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """corr(reward, log length)^2 over a whole split, the log lengths set against the split's mean and
    spread as the head has them; for autograd, the rewards' spread held fixed (the penalty lowers the
    covariance, it does not spread the rewards out)."""
    x = (lengths.log() - head.log_length_mean) / head.log_length_std
    y = rewards - rewards.mean()
    return ((x * y).mean() / (y * y).mean().sqrt().detach()) ** 2


def _split(lengths: list[float]) -> LengthHead:
    half = len(lengths) // 2
    return LengthHead.for_rows([{"input_ids_chosen": [0] * int(c), "input_ids_rejected": [0] * int(r)}
                                for c, r in zip(lengths[:half], lengths[half:])])


def test_on_a_first_batch_holding_the_whole_split_the_penalty_is_the_squared_correlation():
    rewards, lengths = [0.9, 3.6, -1.5, 6.0, 0.3, 1.2], [10.0, 30.0, 7.0, 64.0, 12.0, 20.0]  # spread over 1
    head = _split(lengths)
    logs = torch.tensor(lengths).log()
    # the split's spread is the sample std; Pearson's r is the same whatever the scale of x
    r = pearson(logs.tolist(), rewards) * float(logs.std(correction=0) / logs.std())
    got = torch.tensor(rewards, requires_grad=True)
    penalty = head.penalty(got, torch.tensor(lengths))
    assert penalty.item() == pytest.approx(r * r, abs=1e-6)
    penalty.backward()
    exact = torch.tensor(rewards, requires_grad=True)
    _exact_squared_correlation(head, exact, torch.tensor(lengths)).backward()
    assert torch.allclose(got.grad, exact.grad, atol=1e-6), (got.grad, exact.grad)


def test_the_push_does_not_grow_as_a_new_heads_rewards_shrink():
    """A new score head's rewards spread over hundredths: a push that grew as 1 / spread would drown
    Bradley-Terry, and the reward would never grow. Below a spread of one, the same correlation gets
    the same push, whatever the scale."""
    rewards, lengths = torch.tensor([0.9, 3.6, -1.5, 6.0, 0.3, 1.2]), torch.tensor([10.0, 30.0, 7.0, 64.0, 12.0, 20.0])
    grads = []
    for scale in (0.01, 0.1):
        leaf = (rewards * scale / rewards.std()).requires_grad_(True)
        _split(lengths.tolist()).penalty(leaf, lengths).backward()
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().max() > 0.01


def test_a_reward_that_follows_length_across_batches_is_penalised_though_flat_within_each():
    """Length-grouped batches: all short sequences in one, all long in the other. A reward near 0 on
    the short batch and near 1 on the long one, lower for the longer sequences inside each, is
    anti-correlated with length inside either batch; pooled, it follows length. The penalty sees
    that once the running values have seen both batches."""
    short, long = torch.tensor([10.0, 11.0, 10.0, 11.0]), torch.tensor([100.0, 101.0, 100.0, 101.0])
    head = _split([10, 100, 11, 101])
    low, high = torch.tensor([0.1, 0.0, 0.1, 0.0]), torch.tensor([1.1, 1.0, 1.1, 1.0])
    assert pearson(long.log().tolist(), high.tolist()) == pytest.approx(-1.0)  # within the batch
    pooled = pearson(torch.cat([short, long]).log().tolist(), torch.cat([low, high]).tolist())
    assert pooled > 0.9  # what evaluation measures over the split
    for _ in range(40):
        head.observe(low, short)
        head.observe(high, long)
    assert head.reward_mean.item() == pytest.approx(0.55, abs=0.05)
    assert head.running_correlation().item() > 0.8
    for rewards, lengths in ((low, short), (high, long)):
        assert head.penalty(rewards, lengths).item() > 0.5
    # descent on the penalty alone, batch after batch, the running values following: the correlation
    # evaluation measures goes to zero
    rewards = [low.clone(), high.clone()]
    for _ in range(100):
        for k, lengths in enumerate((short, long)):
            leaf = rewards[k].clone().requires_grad_(True)
            head.penalty(leaf, lengths).backward()
            rewards[k] = rewards[k] - leaf.grad
            head.observe(rewards[k], lengths)
    assert abs(pearson(torch.cat([short, long]).log().tolist(), torch.cat(rewards).tolist())) < 0.1
    flat = _split([10, 100, 11, 101])
    for _ in range(40):
        flat.observe(torch.tensor([0.5, 0.6, 0.5, 0.6]), short)
        flat.observe(torch.tensor([0.5, 0.6, 0.5, 0.6]), long)
    assert abs(flat.running_correlation().item()) < 0.2  # not following length across batches



def test_a_step_observed_in_shares_on_several_processes_moves_the_head_as_one_process_would():
    """Each process sums its own share of a step's rewards (uneven shares, one of them empty); the
    sums added up give the running values of one process observing every reward of the step."""
    rng = torch.Generator().manual_seed(0)
    steps = [(torch.randn(9, generator=rng), torch.randint(5, 80, (9,), generator=rng).float()) for _ in range(3)]
    one, shared = _split([5, 30, 80, 12]), _split([5, 30, 80, 12])
    mean = var = cov = None
    for rewards, lengths in steps:
        one.observe(rewards, lengths)
        shares = [(rewards[:6], lengths[:6]), (rewards[6:], lengths[6:]), (rewards[:0], lengths[:0])]
        shared.observe_sums(sum(shared.sums(r, n) for r, n in shares))
        # the running values by their definition, over the step's rewards
        x = (lengths.log() - one.log_length_mean) / one.log_length_std
        mean = rewards.mean() if mean is None else 0.9 * mean + 0.1 * rewards.mean()
        y = rewards - mean
        var = (y * y).mean() if var is None else 0.9 * var + 0.1 * (y * y).mean()
        cov = (x * y).mean() if cov is None else 0.9 * cov + 0.1 * (x * y).mean()
    for head in (one, shared):
        got = torch.stack([head.reward_mean, head.reward_var, head.covariance])
        torch.testing.assert_close(got, torch.stack([mean, var, cov]), rtol=1e-5, atol=1e-6)

def test_a_reward_uncorrelated_with_length_over_the_split_is_not_pushed_by_one_batchs_own_correlation():
    """One batch of a few sequences can show a strong correlation by chance. Squaring each batch's
    estimate would penalise that noise (and so the reward's spread); the penalty's gradient follows
    the split's correlation, which here is zero."""
    lengths = torch.tensor([10.0, 20.0, 10.0, 20.0])
    head = _split([10, 20, 10, 20])
    for _ in range(40):
        head.observe(torch.tensor([0.0, 1.0, 1.0, 0.0]), lengths)  # no covariance with length
    assert abs(head.running_correlation().item()) < 1e-6
    noisy = torch.tensor([0.0, 1.0, 0.4, 0.6])  # longer scores higher, within this batch
    alone = noisy.clone().requires_grad_(True)
    own = _split([10, 20, 10, 20]).penalty(alone, lengths)  # this batch as if it were the split
    own.backward()
    assert own.item() > 0.3 and alone.grad.abs().max() > 0.1
    got = noisy.clone().requires_grad_(True)
    penalty = head.penalty(got, lengths)
    penalty.backward()
    assert penalty.item() < 0.01 and got.grad.abs().max() < 1e-6


def test_the_debiased_loss_starts_as_bradley_terry_and_penalises_a_reward_that_follows_length():
    scores, lengths = torch.tensor([2.0, 1.0, 0.0, 0.5]), torch.tensor([40.0, 30.0, 10.0, 12.0])
    head = _split([40, 30, 10, 12])
    plain = -torch.nn.functional.logsigmoid(scores[:2] - scores[2:]).mean()
    loss = debiased_loss(scores, head(lengths), lengths, 2, None, None, weight=0.0, head=head)
    assert loss.item() == pytest.approx(plain.item())  # the head starts at 0
    penalised = debiased_loss(scores, head(lengths), lengths, 2, None, None, weight=1.0, head=head)
    squared = _exact_squared_correlation(head, scores, lengths).item()
    assert squared > 0.25  # longer sequences score higher here
    assert penalised.item() == pytest.approx(plain.item() + squared)


def _length_only_pairs(n: int, seed: int) -> list[dict]:
    """Pretokenized pairs whose chosen side is always the longer one, the content random."""
    rng = random.Random(seed)
    return [{"id": i, "input_ids_chosen": [1] + [rng.randrange(6, 60) for _ in range(rng.randrange(20, 40))] + [2],
             "input_ids_rejected": [1] + [rng.randrange(6, 60) for _ in range(rng.randrange(5, 20))] + [2],
             "margin": None, "prompt_length": 1} for i in range(n)]


def test_a_debiased_model_does_not_learn_what_length_alone_says(tmp_path, tiny_decoder):
    from accelerate import Accelerator

    from rm_lib.model.inference import score_pairs
    from rm_lib.model.modeling import load_reward_model, load_tokenizer
    from rm_lib.training.trainer import fit

    train, test = _length_only_pairs(256, 0), _length_only_pairs(128, 1)
    pad = load_tokenizer(str(tiny_decoder)).pad_token_id
    correlation = {}
    for debias in (False, True):
        params = tiny_params("train.max_steps=40", "train.batch_size=8", "train.learning_rate=1e-3",
                             f"train.length_debias={str(debias).lower()}", model=str(tiny_decoder))
        torch.manual_seed(0)
        model = load_reward_model(str(tiny_decoder), pad_token_id=pad)
        fitted = fit(params.train, model, train, pad_token_id=pad, checkpoints=tmp_path / f"run-{debias}",
                     fingerprint=str(debias), accelerator=Accelerator(cpu=True))
        logged = [r.get("length_correlation") for r in fitted.history]
        r_c, r_r = score_pairs(model, test, pad_token_id=pad)
        m = pair_metrics(r_c, r_r, [len(r["input_ids_chosen"]) for r in test],
                         [len(r["input_ids_rejected"]) for r in test])
        correlation[debias] = m["reward_length_correlation"]
        if debias:  # the training log says what the penalty holds down, near what evaluation measures
            assert abs(logged[-1] - correlation[True]) < 0.15, (logged, correlation)
        else:
            assert logged == [None] * len(logged)
    assert correlation[False] > 0.5  # the plain model learned length, the only signal there is
    assert abs(correlation[True]) <= correlation[False] / 2, correlation


def test_the_length_head_learns_at_its_own_rate(tmp_path, tiny_decoder):
    """On pairs where the longer answer always wins, the head alone (no correlation penalty) takes up
    length within 40 steps: at the model's learning rate AdamW could move it by 0.04 at most."""
    from accelerate import Accelerator

    from rm_lib.model.modeling import load_reward_model, load_tokenizer
    from rm_lib.training.trainer import fit

    pad = load_tokenizer(str(tiny_decoder)).pad_token_id
    params = tiny_params("train.max_steps=40", "train.batch_size=8", "train.learning_rate=1e-3",
                         "train.length_debias=true", "train.length_debias_weight=0", "train.save_steps=40",
                         model=str(tiny_decoder))
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_decoder), pad_token_id=pad)
    fit(params.train, model, _length_only_pairs(256, 0), pad_token_id=pad, checkpoints=tmp_path / "run",
        fingerprint="head", accelerator=Accelerator(cpu=True))
    (weights,) = sorted(tmp_path.glob("run/step-*"))[-1].glob("model*.safetensors")
    assert load_file(weights)["length_head.weight"].item() > 0.2


def test_the_length_head_is_in_the_checkpoints_and_not_in_the_published_model(tmp_path, tiny_decoder):
    params = tiny_params("train.max_steps=2", "train.length_debias=true", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    saved = load_file(tmp_path / "models/reward_model/model.safetensors")
    assert not any("length_head" in k for k in saved)
    checkpoint = sorted(Path(tmp_path / "models/checkpoints").glob("step-*"))[-1]
    (weights,) = checkpoint.glob("model*.safetensors")
    assert "length_head.weight" in load_file(weights)  # a resume continues with the head it had
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "models/reward_model")  # loads as is

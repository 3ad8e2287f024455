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


def test_on_a_first_batch_holding_the_whole_split_the_penalty_is_pearson_on_log_lengths():
    rewards, lengths = [0.3, 1.2, -0.5, 2.0, 0.1, 0.4], [10.0, 30.0, 7.0, 64.0, 12.0, 20.0]
    rows = [{"input_ids_chosen": [0] * int(c), "input_ids_rejected": [0] * int(r)}
            for c, r in zip(lengths[:3], lengths[3:])]
    head = LengthHead.for_rows(rows)
    logs = torch.tensor(lengths).log()
    # the split's spread is the sample std; Pearson's r is the same whatever the scale of x
    expected = pearson(logs.tolist(), rewards) * float(logs.std(correction=0) / logs.std())
    got = head.pooled_correlation(torch.tensor(rewards), torch.tensor(lengths)).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_a_reward_that_follows_length_across_batches_is_penalised_though_flat_within_each():
    """Length-grouped batches: all short sequences in one, all long in the other. A reward near 0 on
    the short batch and near 1 on the long one, lower for the longer sequences inside each, is
    anti-correlated with length inside either batch; pooled, it follows length. The penalty sees
    that, once the running mean has seen both batches."""
    short, long = torch.tensor([10.0, 11.0, 10.0, 11.0]), torch.tensor([100.0, 101.0, 100.0, 101.0])
    rows = [{"input_ids_chosen": [0] * 10, "input_ids_rejected": [0] * 11},
            {"input_ids_chosen": [0] * 100, "input_ids_rejected": [0] * 101}]
    head = LengthHead.for_rows(rows)
    low, high = torch.tensor([0.1, 0.0, 0.1, 0.0]), torch.tensor([1.1, 1.0, 1.1, 1.0])
    assert pearson(long.log().tolist(), high.tolist()) == pytest.approx(-1.0)  # within the batch
    for _ in range(40):
        head.observe(low)
        head.observe(high)
    assert head.reward_mean.item() == pytest.approx(0.55, abs=0.05)
    assert head.pooled_correlation(high, long).item() > 0.8
    assert head.pooled_correlation(low, short).item() > 0.8
    pooled = pearson(torch.cat([short, long]).log().tolist(), torch.cat([low, high]).tolist())
    assert pooled > 0.9  # what evaluation measures over the split
    flat = torch.tensor([0.5, 0.6, 0.5, 0.6])  # not following length across batches
    assert abs(head.pooled_correlation(flat, long).item()) < 0.2


def test_the_debiased_loss_starts_as_bradley_terry_and_penalises_a_reward_that_follows_length():
    scores, lengths = torch.tensor([2.0, 1.0, 0.0, 0.5]), torch.tensor([40.0, 30.0, 10.0, 12.0])
    head = LengthHead.for_rows([{"input_ids_chosen": [0] * 40, "input_ids_rejected": [0] * 10},
                                {"input_ids_chosen": [0] * 30, "input_ids_rejected": [0] * 12}])
    plain = -torch.nn.functional.logsigmoid(scores[:2] - scores[2:]).mean()
    loss = debiased_loss(scores, head(lengths), lengths, 2, None, None, weight=0.0, head=head)
    assert loss.item() == pytest.approx(plain.item())  # the head starts at 0
    penalised = debiased_loss(scores, head(lengths), lengths, 2, None, None, weight=1.0, head=head)
    r = head.pooled_correlation(scores, lengths).item()
    assert r > 0.5  # longer sequences score higher here
    assert penalised.item() == pytest.approx(plain.item() + r * r)


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
        fit(params.train, model, train, pad_token_id=pad, checkpoints=tmp_path / f"run-{debias}",
            fingerprint=str(debias), accelerator=Accelerator(cpu=True))
        r_c, r_r = score_pairs(model, test, pad_token_id=pad)
        m = pair_metrics(r_c, r_r, [len(r["input_ids_chosen"]) for r in test],
                         [len(r["input_ids_rejected"]) for r in test])
        correlation[debias] = m["reward_length_correlation"]
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

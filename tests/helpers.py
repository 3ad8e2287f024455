"""Small builders shared by tests."""
from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

from rm_lib.layout import Layout
from rm_lib.settings import load_params

# What every test and every process it starts runs under: no request to the Hub, W&B or DVC's analytics.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1"}


def offline_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, offline, plus `extra`."""
    return {**os.environ, **OFFLINE_ENV, **extra}


def set_offline(monkeypatch) -> None:
    """This process offline and without a Hub token (a pytest MonkeyPatch)."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def tiny_params(*overrides: str, model: str = "default"):
    """Settings that make a full pipeline run take seconds."""
    base = [f"model.name_or_path={model}", "download.demo_pairs=60", "filter.max_token_length=64",
            "filter.max_prompt_token_length=32", "train.max_steps=4", "train.batch_size=4", "train.logging_steps=1",
            "train.save_steps=2", "evaluate.batch_size=8",
            # a 4-step model on a dozen held-out pairs is not meant to pass the gate
            "push.min_accuracy=0", "push.min_test_pairs=1", "push.compare_with_release=false"]
    return load_params(None, base + list(overrides))


def run_steps(params, root: Path, *steps: str):
    from rm_lib import steps as registry

    layout = Layout(root)
    return {s: registry.run(s, params, layout) for s in steps}


def committed_project(root: Path, monkeypatch) -> None:
    """`root` as its own git checkout with everything in it committed, holding the code that runs and the base
    model: the model card then claims what a commit of the project remakes (the code here lies in another
    checkout, the tests' tiny models in a folder of their own)."""
    import subprocess

    from rm_lib.publish import model_card
    from rm_lib.steps import push

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    (root / ".gitignore").write_text("/data/\n/models/\n")  # the steps' outputs: DVC's, as in the project
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "project"], cwd=root, check=True)
    monkeypatch.setattr(push, "base_doubts", lambda *args: [])
    monkeypatch.setattr(model_card, "code_checkout",
                        lambda *args: {"code_untracked": [], "code_changed": False, "code_elsewhere": None,
                                       "code_commit": None})


def fit_tiny(root: Path, tiny_decoder: Path, *overrides: str, on_eval=None, model=None):
    """Train the tiny decoder (or `model`, loaded from it) in this process with `fit` itself; returns
    (result, weights, rows)."""
    import torch
    from accelerate import Accelerator

    from rm_lib.data.tokenstore import read_rows
    from rm_lib.layout import Layout
    from rm_lib.model.modeling import load_reward_model, load_tokenizer
    from rm_lib.training.trainer import fit

    params = tiny_params("train.max_steps=3", *overrides, model=str(tiny_decoder))
    if not (Layout(root).filtered / "train.parquet").exists():
        run_steps(params, root, "download", "tokenize", "filter")
    rows = read_rows(Layout(root).filtered / "train.parquet")
    pad = load_tokenizer(str(tiny_decoder)).pad_token_id
    torch.manual_seed(0)
    model = model or load_reward_model(str(tiny_decoder), pad_token_id=pad)
    result = fit(params.train, model, rows, pad_token_id=pad, checkpoints=root / "checkpoints",
                 fingerprint=str(overrides), accelerator=Accelerator(cpu=True), on_eval=on_eval)
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}, rows


def shared_prompt_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token-id pairs that share a prompt of 3-30 tokens (one pair shares nothing, one differs in its
    last token only)."""
    rng = random.Random(seed)
    seq = lambda lo, hi: [rng.randrange(5, vocab) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    pairs = []
    for _ in range(n):
        prompt = seq(3, 30)
        pairs.append({"input_ids_chosen": prompt + seq(1, 15), "input_ids_rejected": prompt + seq(1, 15),
                      "margin": rng.random()})
    pairs[0]["input_ids_rejected"] = [4] + pairs[0]["input_ids_rejected"]  # nothing shared
    pairs[1]["input_ids_rejected"] = pairs[1]["input_ids_chosen"][:-1] + [4]  # all but the last token
    return pairs


def gradient_step(model, margin):
    """`step(compute)`: scores from `compute()` (chosen of every pair, then rejected), their Bradley-Terry
    loss with `margin` backpropagated into `model`; returns the scores, the loss and every gradient."""
    from rm_lib.model.loss import bradley_terry_loss

    n = len(margin)

    def step(compute):
        model.zero_grad()
        scores = compute()
        loss = bradley_terry_loss(scores[:n], scores[n:], margin, None)
        loss.backward()
        return scores.detach(), loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()
                                               if p.grad is not None}

    return step


def assert_same_step(got, expected) -> None:
    """Two `gradient_step` results agree: scores, loss and every gradient, to fp32 rounding."""
    import pytest
    import torch

    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
    assert got[1] == pytest.approx(expected[1], abs=1e-6)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], atol=1e-5, rtol=1e-3, msg=name)


def alias_bomb(depth: int = 9) -> str:
    """YAML of a few hundred bytes whose value is 9**depth items: each list holds 9 references to the last."""
    parts = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth + 1)]
    return "[" + ", ".join(parts) + "]"

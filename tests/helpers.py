"""Small builders shared by tests."""
from __future__ import annotations

import gzip
import json
import os
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
            "push.min_accuracy=0", "push.compare_with_release=false"]  # a 4-step model is not meant to pass the gate
    return load_params(None, base + list(overrides))


def run_steps(params, root: Path, *steps: str):
    from rm_lib import steps as registry

    layout = Layout(root)
    return {s: registry.run(s, params, layout) for s in steps}


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

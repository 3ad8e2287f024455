"""Small builders shared by tests."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from rm_lib.layout import Layout
from rm_lib.settings import load_params


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
            "train.save_steps=2", "evaluate.batch_size=8"]
    return load_params(None, base + list(overrides))


def run_steps(params, root: Path, *steps: str):
    import importlib

    layout = Layout(root)
    return {s: importlib.import_module(f"rm_lib.steps.{s}").run(params, layout) for s in steps}

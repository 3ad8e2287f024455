"""The model card: everything needed to reproduce, judge and load the model."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def render(*, repo_id: str, params: dict, metrics: dict, lineage: dict, pictures: list[str]) -> str:
    buckets = "\n".join(f"| {b['range']} | {b['pairs']} | {b['accuracy']:.4f} | {b['longer_wins']:.4f} |"
                        for b in metrics.get("per_length_bucket", []))
    pics = "\n".join(f"![{Path(p).stem}]({p})" for p in pictures)
    train = json.dumps(params.get("train", {}), indent=2, sort_keys=True)
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [reward-model, rlhf, rm-pipeline]
base_model: {params['model']['name_or_path']}
---
# {repo_id}

A reward model (one score per text) trained with Bradley-Terry loss on preference pairs.

- Base model: `{params['model']['name_or_path']}` (revision `{params['model'].get('revision')}`)
- Dataset: `{params['download']['source']}` (revision `{lineage.get('dataset_revision')}`)

## Evaluation (held-out pairs)

| metric | value |
|---|---|
| pairs | {metrics.get('pairs')} |
| accuracy (a tie counts as wrong) | {metrics.get('accuracy', float('nan')):.4f} |
| tie rate | {metrics.get('tie_rate', float('nan')):.4f} |
| longer-wins baseline | {metrics.get('longer_wins_baseline', float('nan')):.4f} |
| shorter-wins baseline | {metrics.get('shorter_wins_baseline', float('nan')):.4f} |
| loss | {metrics.get('loss', float('nan')):.4f} |
| reward mean / std | {metrics.get('reward_mean', float('nan')):.4f} / {metrics.get('reward_std', float('nan')):.4f} |

| pair length (tokens) | pairs | accuracy | longer wins |
|---|---|---|---|
{buckets}

{pics}

## How to use

```python
from transformers import pipeline
rm = pipeline("text-classification", model="{repo_id}", function_to_apply="none")
rm("User: How do I boil an egg?\\n\\nAssistant: Put it in boiling water for eight minutes.")
```

With this project's scoring API (conversations are rendered with the training template):

```python
from rm_lib.scoring import RewardScorer
scorer = RewardScorer("{repo_id}")          # or a local folder
scorer.score([[{{"role": "user", "content": "hi"}}, {{"role": "assistant", "content": "hello"}}]])
```

In TRL: `GRPOTrainer(..., reward_funcs=RewardScorer("{repo_id}").reward_function())`, or pass the
folder as `reward_model` to `PPOTrainer`. `config.json` holds `reward_mean` and `reward_std` for
normalising rewards.

## Training parameters

```json
{train}
```

## Lineage

| what | value |
|---|---|
| git commit | `{lineage.get('git_commit')}` |
| data (DVC content hash of the filtered pairs) | `{lineage.get('data_hash')}` |
| model fingerprint | `{lineage.get('fingerprint')}` |
| W&B run | {lineage.get('wandb')} |

Reproduce: check out the commit, then `dvc repro` (or `python -m rm_lib run`) with the parameters above.
"""

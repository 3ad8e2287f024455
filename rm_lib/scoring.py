"""Score texts or conversations with a trained reward model, for evaluation and RLHF.

    scorer = RewardScorer("models/reward_model")
    scorer.score(["User: hi\\n\\nAssistant: hello"])
    scorer.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    GRPOTrainer(..., reward_funcs=scorer.reward_function())
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import templates, tokenization
from .modeling import load_reward_model, load_tokenizer, rewards


class RewardScorer:
    def __init__(self, model_dir: str | Path, *, template: str | None = None, device: str | None = None,
                 batch_size: int = 32, normalize: bool = False) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(str(model_dir))
        self.model = load_reward_model(str(model_dir))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.special = tokenization.special_tokens(self.tokenizer)
        manifest = self.model_dir / "rm_lib.json"
        saved = json.loads(manifest.read_text()) if manifest.exists() else {}
        self.template = templates.resolve(template or saved.get("template", "auto"), self.tokenizer)
        self.mean = getattr(self.model.config, "reward_mean", 0.0) if normalize else 0.0
        self.std = getattr(self.model.config, "reward_std", 1.0) if normalize else 1.0

    def encode(self, item: str | list[dict]) -> list[int]:
        """Text is tokenized as is; a conversation is rendered with the training template."""
        text = item if isinstance(item, str) else templates.render(item, self.template, self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return tokenization.add_special(ids, self.special)

    @torch.no_grad()
    def score(self, items: Sequence[str | list[dict]]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            seqs = [self.encode(item) for item in items[start:start + self.batch_size]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, seq in enumerate(seqs):
                ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
            scores = rewards(self.model, ids.to(self.device), mask.to(self.device))
            out += ((scores - self.mean) / (self.std or 1.0)).tolist()
        return out

    def reward_function(self) -> Callable[..., list[float]]:
        """A function with the signature TRL's GRPOTrainer takes in `reward_funcs`:
        f(prompts, completions, **kwargs) -> list of floats, for text or conversational data."""
        def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
            items = [p + c if isinstance(p, list) else p + c for p, c in zip(prompts, completions)]
            return self.score(items)

        reward.__name__ = f"reward_model_{self.model_dir.name}"
        return reward

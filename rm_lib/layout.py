"""Where every step reads and writes. DVC stages and Dagster assets use the same paths."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    @property
    def pairs(self) -> Path:  # download: normalised pairs, rejects, manifest
        return self.root / "data" / "pairs"

    @property
    def tokenized(self) -> Path:
        return self.root / "data" / "tokenized"

    @property
    def filtered(self) -> Path:
        return self.root / "data" / "filtered"

    @property
    def model(self) -> Path:  # the final model, loadable by from_pretrained
        return self.root / "models" / "reward_model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "checkpoints"

    @property
    def train_logs(self) -> Path:
        return self.root / "data" / "train"

    @property
    def evaluation(self) -> Path:
        return self.root / "data" / "evaluation"

    @property
    def release(self) -> Path:  # push: exactly what is (or would be) uploaded
        return self.root / "data" / "release"

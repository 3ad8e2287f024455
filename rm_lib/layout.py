"""Where every step reads and writes. DVC stages and Dagster assets use the same paths."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
# The Layout properties each step writes: its lock covers them, and its start clears their stale temporaries.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "download": ("pairs",), "tokenize": ("tokenized",), "filter": ("filtered",),
    "train": ("model", "checkpoints", "train_logs"), "evaluate": ("evaluation",), "push": ("release",)}


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    @property
    def sources(self) -> Path:  # the user's own data files: a dependency of download and evaluate under DVC
        return self.root / "data" / "sources"

    @property
    def pairs(self) -> Path:  # download: normalised pairs, rejects, manifest
        return self.root / "data" / "pairs"

    @property
    def tokenized(self) -> Path:
        return self.root / "data" / "tokenized"

    @property
    def refused(self) -> Path:  # tokenize: the pairs the chat template refused, with its words (filter counts them)
        return self.tokenized / "refused.jsonl"

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
    def live_log(self) -> Path:
        """The metrics log of the training run in progress, beside its checkpoints; published to
        train_logs/metrics.jsonl when the run ends, so an interrupted run leaves the last run's log
        there as it was, with the model and run.json it belongs to."""
        return self.checkpoints / "metrics.jsonl"

    @property
    def evaluation(self) -> Path:
        return self.root / "data" / "evaluation"

    @property
    def release(self) -> Path:  # push: exactly what is (or would be) uploaded
        return self.root / "data" / "release"

    def outputs(self, step: str) -> tuple[Path, ...]:
        return tuple(getattr(self, name) for name in OUTPUTS[step])

    def lock(self, step: str) -> Path:  # held while `step` runs in this folder (rm_lib/pipeline/locking.py)
        return self.root / ".rm_lib" / "locks" / f"{step}.lock"


def project_above(folder: Path) -> Path | None:
    """The nearest folder above `folder` that is a project of this kind (a params.yaml beside a .rm_lib
    folder, or beside a dvc.yaml that runs rm_lib); None where there is none."""
    for parent in folder.absolute().parents:
        if not (parent / "params.yaml").is_file():
            continue
        stages = parent / "dvc.yaml"
        try:
            runs_rm_lib = stages.is_file() and "rm_lib" in stages.read_text(encoding="utf-8", errors="replace")
        except OSError:
            runs_rm_lib = False
        if (parent / ".rm_lib").is_dir() or runs_rm_lib:
            return parent
    return None

"""push: the model folder + a generated model card -> data/release, then to the Hub if asked.

Without push.repo_id (or with push.dry_run) it writes exactly what would be uploaded and says so;
no request leaves the machine and no token is needed. Otherwise data/release is uploaded as one
revision of the repository (created private when push.private, the default) and tagged with the
training run (`run-<fingerprint>`). A failed push keeps the model and data/release as they are.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import hub, model_card
from ..atomic import atomic_dir, write_json
from ..jsonl import read_json
from ..layout import Layout
from ..settings import Params

PICTURES = ("rewards.png", "accuracy_by_length.png")  # from data/evaluation
LOSS_PICTURE = "loss.png"  # from data/train


@dataclass
class PushResult:
    release_dir: Path
    uploaded: bool
    url: str | None
    commit: str | None
    files: list[str]
    repo_id: str | None = None
    tag: str | None = None

    def summary(self) -> str:
        if self.uploaded:
            return (f"push: uploaded {len(self.files)} files from {self.release_dir} to {self.url} "
                    f"(revision {self.commit}, tag {self.tag})")
        return (f"push: nothing uploaded (no push.repo_id, or push.dry_run); the {len(self.files)} files that "
                f"would be published are in {self.release_dir}")


def _copy_pictures(layout: Layout, out: Path) -> list[str]:
    sources = [layout.evaluation / name for name in PICTURES] + [layout.train_logs / LOSS_PICTURE]
    pictures = []
    for source in sources:
        if source.exists():
            shutil.copy2(source, out / source.name)
            pictures.append(source.name)
    return pictures


def build_release(params: Params, layout: Layout, out: Path) -> None:
    metrics = read_json(layout.evaluation / "report.json")
    summary = read_json(layout.train_logs / "summary.json")
    manifest = read_json(layout.pairs / "manifest.json")
    for item in sorted(layout.model.iterdir()):
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    pictures = _copy_pictures(layout, out)
    lineage = model_card.lineage(layout.root.resolve(), summary, manifest)
    repo_id = params.push.repo_id or "reward-model"
    (out / "README.md").write_text(model_card.render(repo_id=repo_id, params=params.as_dict(), metrics=metrics,
                                                     lineage=lineage, pictures=pictures), encoding="utf-8")
    write_json(out / "evaluation.json", metrics)


def run_tag(layout: Layout) -> str:
    """The tag of a pushed revision: the training run's fingerprint (settings + data)."""
    return f"run-{read_json(layout.train_logs / 'summary.json')['fingerprint']}"


def run(params: Params, layout: Layout) -> PushResult:
    cfg = params.push
    with atomic_dir(layout.release) as out:
        build_release(params, layout, out)
    files = sorted(p.relative_to(layout.release).as_posix() for p in layout.release.rglob("*") if p.is_file())
    if cfg.repo_id is None or cfg.dry_run:
        return PushResult(layout.release, False, None, None, files)
    info = hub.upload(layout.release, cfg.repo_id, private=cfg.private, commit_message=cfg.commit_message,
                      tag=run_tag(layout))
    return PushResult(layout.release, True, info["url"], info["commit"], files, info["repo_id"], info["tag"])

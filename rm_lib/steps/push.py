"""push: the model folder + a generated model card -> data/release, then to the Hub if asked.

Without push.repo_id (or with push.dry_run) it writes exactly what would be uploaded and says so."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import hub, model_card
from ..atomic import atomic_dir, write_json
from ..jsonl import read_json
from ..layout import Layout
from ..settings import Params

PICTURES = ("rewards.png", "accuracy_by_length.png")


@dataclass
class PushResult:
    release_dir: Path
    uploaded: bool
    url: str | None
    commit: str | None
    files: list[str]

    def summary(self) -> str:
        if self.uploaded:
            return f"push: uploaded {len(self.files)} files to {self.url} (commit {self.commit})"
        return (f"push: nothing uploaded (no push.repo_id, or push.dry_run); the {len(self.files)} files that "
                f"would be published are in {self.release_dir}")


def build_release(params: Params, layout: Layout, out: Path) -> None:
    metrics = read_json(layout.evaluation / "report.json")
    summary = read_json(layout.train_logs / "summary.json")
    pairs = read_json(layout.pairs / "manifest.json")
    for item in sorted(layout.model.iterdir()):
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    pictures = []
    for name in PICTURES:
        if (layout.evaluation / name).exists():
            shutil.copy2(layout.evaluation / name, out / name)
            pictures.append(name)
    lineage = {"git_commit": model_card.git_commit(layout.root.resolve()), "data_hash": summary.get("data_hash"),
               "fingerprint": summary.get("fingerprint"), "wandb": summary.get("wandb"),
               "dataset_revision": pairs.get("revision")}
    repo_id = params.push.repo_id or "reward-model"
    (out / "README.md").write_text(model_card.render(repo_id=repo_id, params=params.as_dict(), metrics=metrics,
                                                     lineage=lineage, pictures=pictures), encoding="utf-8")
    write_json(out / "evaluation.json", metrics)


def run(params: Params, layout: Layout) -> PushResult:
    cfg = params.push
    with atomic_dir(layout.release) as out:
        build_release(params, layout, out)
    files = sorted(str(p.relative_to(layout.release)) for p in layout.release.rglob("*") if p.is_file())
    if cfg.repo_id is None or cfg.dry_run:
        return PushResult(layout.release, False, None, None, files)
    summary = read_json(layout.train_logs / "summary.json")
    tag = f"run-{summary.get('fingerprint')}"
    info = hub.upload(layout.release, cfg.repo_id, private=cfg.private, commit_message=cfg.commit_message, tag=tag)
    return PushResult(layout.release, True, info["url"], info["commit"], files)

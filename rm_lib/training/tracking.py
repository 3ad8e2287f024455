"""Metrics go to a local JSONL file always, and to W&B when a project is configured."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rm_lib import network
from rm_lib.errors import SettingsError, UserError
from rm_lib.files import atomic_file

# the modes wandb.init takes (dryrun and run: W&B's older names for offline and online)
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def wandb_mode(setting: str) -> str:
    """auto: WANDB_MODE if set, else online with an API key, else offline (sync later)."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"].strip()
        if mode not in WANDB_MODES:  # else W&B's own validation error, after the model has loaded
            raise SettingsError(f"the environment variable WANDB_MODE is '{mode}', which W&B does not take "
                                f"(train.wandb_mode is auto, so it follows WANDB_MODE): set it to one of "
                                f"{', '.join(WANDB_MODES[:3])}, or unset it")
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_dir(root: Path) -> Path:
    """The folder W&B keeps its `wandb/` of run files in: WANDB_DIR when set (as W&B reads it), else the
    project's root. A `dvc exp run --queue` or `--temp` experiment runs in a copy of the project under
    .dvc/tmp/exps that DVC deletes afterwards: its runs go to the project's own `wandb/`, where
    `wandb sync wandb/offline-run-*` finds them later."""
    if os.environ.get("WANDB_DIR"):
        return Path(os.environ["WANDB_DIR"])
    parts = root.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


class Tracker:
    def __init__(self, metrics_path: Path, *, project: str | None, mode: str, config: dict, run_dir: Path,
                 enabled: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.enabled, self.metrics_path, self.project, self.mode = enabled, metrics_path, project, mode
        self.on_log = on_log  # e.g. a front-end that streams each record to its UI
        self.config, self.run_dir = config, run_dir
        self.wandb_run = None
        self.wandb_url: str | None = None
        self.wandb_id: str | None = None

    def check(self) -> None:
        """Refuse a W&B mode W&B would refuse, before any work is done."""
        if self.enabled and self.project:
            wandb_mode(self.mode)

    def start(self, resume_lines: int | None = None, saved: Path | None = None, *, wandb_id: str | None = None,
              wandb_url: str | None = None, reused: bool = False) -> None:
        """Open the metrics file (keeping a resumed run's earlier lines) and the W&B run. `saved`: the copy
        of the file in the checkpoint resumed from, read first: the file itself may have been started
        afresh by a run with other settings since. `wandb_id`: the W&B run a resumed run continues (online).
        `reused`: a run that had finished and trains nothing opens no W&B run; `wandb_url` (the one the
        run was logged to) stays its record."""
        if not self.enabled:
            return
        metrics_path, project, run_dir, config = self.metrics_path, self.project, self.run_dir, self.config
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if resume_lines is not None:  # a resumed run keeps its lines up to the checkpoint
            source = saved if saved is not None and saved.exists() else metrics_path
            lines = source.read_text().splitlines() if source.exists() else []
            kept = "".join(line + "\n" for line in lines[:resume_lines])
        # A new file, never a write into the old one: DVC may have left that as a (read-only) link
        # into its cache, and truncating or appending to it would change the cached copy.
        with atomic_file(metrics_path) as handle:
            handle.write(kept)
        if reused:
            self.wandb_id, self.wandb_url = wandb_id, wandb_url
            return
        resolved = wandb_mode(self.mode)
        if project and resolved != "disabled":
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            # Online only: W&B resumes no offline run, and two offline folders of one id do not sync as one
            # run (the later replaces the earlier); offline, a resumed run's part is a run of its own.
            resume = {"id": wandb_id, "resume": "allow"} if wandb_id and resolved == "online" else {}
            self.wandb_run = _init_wandb(wandb, project=project, mode=resolved, dir=str(run_dir), config=config,
                                         reinit="finish_previous", **resume)
            # kept for a resume online only: an offline run's id resumed online would collide with it at sync
            self.wandb_id = self.wandb_run.id if resolved == "online" else None
            self.wandb_url = getattr(self.wandb_run, "url", None) or f"wandb ({resolved}) run {self.wandb_run.id}"

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        if self.on_log is not None:
            self.on_log(record)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        if self.wandb_run is not None and rows:
            import wandb

            columns = sorted(rows[0])
            self.wandb_run.log({name: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                               step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(wandb: Any, *, mode: str, **kwargs: Any) -> Any:
    """wandb.init, online within the network time limit (rm_lib.network): a W&B server that does not
    answer ends the step with a transient error instead of the client's own 90 s wait, or longer."""
    if mode != "online":
        return wandb.init(mode=mode, **kwargs)
    limit = network.timeout_s()
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=limit), **kwargs)
    except wandb.errors.CommError as exc:
        raise UserError(f"W&B did not start the run within {limit:g} s ({network.TIMEOUT_VARIABLE}) or could not "
                        f"be reached ({network.first_line(exc)}); retryable: check the network, or set "
                        "train.wandb_mode=offline and sync later", transient=True) from None
    except wandb.errors.AuthenticationError as exc:
        raise UserError(f"W&B refused the API key ({network.first_line(exc)}): set WANDB_API_KEY to a valid key, or "
                        "set train.wandb_mode=offline") from None


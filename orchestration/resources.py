"""Dagster resources: the project folder and its settings, the Hugging Face Hub, W&B, the DVC remote.

Only dagster and the light parts of rm_lib (settings, layout, errors) are imported here, so the
code server loads fast; torch and transformers are imported by the steps, inside the assets.
"""
import contextlib
import enum
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from rm_lib.errors import SettingsError
from rm_lib.layout import Layout
from rm_lib.settings import WANDB_SETTING_MODES, Params, load_params


def project_root() -> str:
    """The project folder of the code location's runs: RM_ROOT, else the folder Dagster starts in."""
    return os.environ.get("RM_ROOT", ".")


def project_params_file() -> Path:
    """The params.yaml those runs read (the `project` resource of definitions.py)."""
    return Path(project_root()).expanduser().resolve() / "params.yaml"


class ProjectResource(dg.ConfigurableResource):
    """Where the project lives (data/, models/, the same paths the DVC stages use) and the settings
    every step runs with: params.yaml, the one source of defaults, plus run-wide overrides."""

    root: str = Field(default=".", description="Project folder that holds data/ and models/. Relative paths are "
                                               "read from the folder `dagster dev` was started in.")
    params_file: str = Field(default="params.yaml",
                             description="Settings file; a relative path is read inside `root`.")
    overrides: list[str] = Field(default=[], description="Run-wide `section.key=value` overrides applied to "
                                                         "every step, e.g. `model.name_or_path=...`.")

    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    def layout(self) -> Layout:
        return Layout(self.root_path())

    def params_path(self) -> Path:
        path = Path(self.params_file).expanduser()
        return path if path.is_absolute() else self.root_path() / path

    def load_params(self, extra: Sequence[str] = ()) -> Params:
        """params.yaml, then this resource's overrides, then `extra` (later wins); validated."""
        path = self.params_path()
        if not path.is_file():
            # rm_lib falls back to built-in defaults for a missing params.yaml; here that would hide
            # a wrong `root`, so say so instead.
            raise SettingsError(f"{path}: no such settings file; set the `project` resource's root/params_file")
        return load_params(path, [*self.overrides, *extra])


class HubResource(dg.ConfigurableResource):
    """The Hugging Face Hub. The token is optional: definitions.py binds it to `dg.EnvVar("HF_TOKEN")`
    when that variable is set; without it the Hub client uses the login of `hf auth login`."""

    token: Optional[str] = Field(default=None, description="Hub token (bind to an environment variable, "
                                                           "e.g. HF_TOKEN; never type it into run config).")

    @contextlib.contextmanager
    def credentials(self) -> Iterator[None]:
        """Expose the token as HF_TOKEN for the duration of the block (rm_lib passes no token: the Hub
        client reads HF_TOKEN, else the `hf auth login` file). Process-wide: each step is its own process."""
        if not self.token:
            yield
            return
        before = os.environ.get("HF_TOKEN")
        os.environ["HF_TOKEN"] = self.token
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("HF_TOKEN", None)
            else:
                os.environ["HF_TOKEN"] = before

    def dataset_fingerprint(self, name: str, revision: Optional[str]) -> Optional[str]:
        """The commit sha the Hub serves for a dataset now, or None when it cannot be reached."""
        from rm_lib.data.sources import hub_fingerprint

        with self.credentials():
            return hub_fingerprint(name, revision)


# train.wandb_mode's values as a config enum: the Launchpad offers them and refuses another value before the
# run starts (a string was refused by train, after download, tokenize and filter had run)
WandbMode = enum.Enum("WandbMode", {mode: mode for mode in WANDB_SETTING_MODES})


class WandbResource(dg.ConfigurableResource):
    """Weights & Biases for the training step. Unset fields keep params.yaml's train.wandb_*."""

    project: Optional[str] = Field(default=None, description="W&B project (train.wandb_project); "
                                                             "unset: params.yaml's value (null = no W&B).")
    mode: Optional[WandbMode] = Field(default=None, description="auto | online | offline | disabled "
                                                                "(train.wandb_mode); unset: params.yaml's value.")

    def overrides(self) -> list[str]:
        out = []
        if self.project:
            out.append(f"train.wandb_project={self.project}")
        if self.mode:
            out.append(f"train.wandb_mode={WandbMode(self.mode).value}")
        return out


class DvcResource(dg.ConfigurableResource):
    """Record every materialization in DVC, as `dvc repro` would: dvc.lock updated, outputs in the DVC
    cache and pushed to a remote. Remote credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ...) are
    read by DVC from the environment or from `.dvc/config.local`; none is stored here."""

    enabled: bool = Field(default=True, description="Record materializations in DVC when the project folder "
                                                    "is a DVC repository.")
    remote: Optional[str] = Field(default=None, description="DVC remote to push to; unset: the project's "
                                                            "default remote (core.remote).")
    push: bool = Field(default=True, description="Push the recorded outputs to the remote.")
    lock_wait_s: float = Field(default=600.0, description="How long to wait for the DVC repository lock held "
                                                          "by another DVC process (a `dvc repro`, another run).")

    def record(self, root: Path, stage: str, params: Params, run_id: Optional[str] = None,
               re_executes: Sequence[str] = ()):
        """rm_lib.pipeline.dvc_record.record with this resource's settings: Recorded or NotRecorded. With
        `run_id`, a run with settings other than params.yaml's is recorded as the DVC experiment
        dagster-<run id> (a re-execution's, of the runs `re_executes`, as dvc_record.experiment_of says)."""
        from rm_lib.pipeline.dvc_record import NotRecorded, record

        if not self.enabled:
            return NotRecorded("DVC recording is off (the dvc resource's enabled is false)")
        return record(root, stage, params, remote=self.remote, push=self.push, lock_wait_s=self.lock_wait_s,
                      run_id=run_id, re_executes=re_executes)

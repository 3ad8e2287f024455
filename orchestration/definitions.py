"""Dagster definitions of the reward-model pipeline, and of orchestration/defs (yours).

    make ui     # or: dg dev   or: DAGSTER_HOME=$PWD/.dagster_home dagster dev -m orchestration.definitions

(see docs/dagster.md). Six assets call the rm_lib steps and write the same paths as the DVC stages:
preference_source (observed) -> raw_preferences -> tokenized_preferences -> filtered_preferences ->
reward_model -> evaluation -> hub_release.
"""
import os
from pathlib import Path

import dagster as dg

import orchestration.defs

# Absolute imports, so that `dagster dev -f orchestration/definitions.py` works as well as `-m`.
from orchestration.assets import ASSETS
from orchestration.checks import CHECKS
from orchestration.launcher import TrainLauncherResource
from orchestration.resources import DvcResource, HubResource, ProjectResource, WandbResource, project_root
from orchestration.sensors import (
    checks_after_failed_run,
    dvc_lock_changed,
    pipeline_job,
    recheck_job,
    release_automation,
    source_data_changed,
    weekly_retraining,
)
from orchestration.source import preference_source


def optional_env(name: str):
    """dg.EnvVar(name) when the variable is set, else None: an unset EnvVar fails every run that
    uses the resource, even the runs that never need it (a token for a dry release, say)."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def pipeline_definitions() -> dg.Definitions:
    """The reward-model pipeline: assets, checks, job, schedule, sensors and the resources they use.
    A function, not a module-level object: a code location holds one Definitions at module scope."""
    return dg.Definitions(
        assets=[preference_source, *ASSETS],
        asset_checks=CHECKS,
        jobs=[pipeline_job, recheck_job],
        schedules=[weekly_retraining],
        sensors=[source_data_changed, dvc_lock_changed, release_automation, checks_after_failed_run],
        resources={
            # RM_ROOT: the project folder, when dagster is not started inside it.
            "project": ProjectResource(root=project_root(), params_file="params.yaml"),
            "hub": HubResource(token=optional_env("HF_TOKEN")),
            "wandb": WandbResource(),
            # every materialization is committed to dvc.lock and the DVC cache and pushed to the project's
            # default remote; the remote's credentials are DVC's own (environment, .dvc/config.local)
            "dvc": DvcResource(),
            # training in the step's own process; separate_process=True launches `accelerate launch`
            # (several GPUs, an accelerate config) and streams its metrics back through Dagster Pipes
            "trainer": TrainLauncherResource(),
        },
    )


# What `dg scaffold defs ...` added under orchestration/defs: loaded beside the pipeline, sharing its resources.
defs = dg.Definitions.merge(pipeline_definitions(),
                            dg.load_defs(orchestration.defs, project_root=Path(__file__).resolve().parents[1]))

"""Asset checks: thin adapters that show rm_lib.evaluation.quality's verdicts in the UI. The rules and their
thresholds (params.yaml: push.min_accuracy, push.min_test_pairs, push.compare_with_release,
push.min_subset_accuracy, push.max_length_correlation, push.max_test_seen_by_base, download.max_reject_ratio)
live in rm_lib, so the CLI and `dvc repro` enforce the same release gate in the push step.

Blocking checks (a failure stops everything downstream in the same run):
  raw_preferences.pairs_well_formed, reward_model.loss_is_finite, evaluation.release_gate.

A check that reads settings judges by those its asset has in the same run (the asset's Launchpad fields,
over the project's settings): rejects_ratio by raw_preferences' download settings, release_gate by
hub_release's push settings. Checked alone, or under automation, it reads the project's settings.
"""
from collections.abc import Callable

import dagster as dg

from rm_lib.errors import SettingsError
from rm_lib.evaluation import quality
from rm_lib.evaluation.visualize import printable
from rm_lib.layout import Layout

from . import assets
from .config import DownloadConfig, PushConfig, launchpad_overrides
from .resources import ProjectResource
from .run_lock import claim_project

# Under the release_automation sensor a check runs again for every new version of its asset (one that
# DVC made, say), so the blocking ones hold for automated runs as they do inside a pipeline run.
ON_UPDATE = dg.AutomationCondition.eager()


def claimed(context: dg.AssetCheckExecutionContext, project: ProjectResource):
    """The project's layout, once this run holds the folder (orchestration.run_lock): a check reads the
    files of its own run, not those another run is replacing."""
    claim_project(context, project.root_path())
    return project.layout()


def judged(context: dg.AssetCheckExecutionContext, project: ProjectResource, key: str,
           verdict: Callable[[Layout], quality.Verdict]) -> dg.AssetCheckResult:
    """`verdict` (of the project's layout) on the files of asset `key`, where they are those of its latest
    materialization, which Dagster files the result under. A check run alone after a step from the command
    line judged that step's model and showed the verdict (passed) beside the other model's figures."""
    layout = claimed(context, project)
    latest = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    version = assets.materialization_tags(latest).get("dagster/data_version")
    if version is not None and version not in assets.versions_now(project, key):
        return dg.AssetCheckResult(
            passed=False, severity=dg.AssetCheckSeverity.ERROR,
            description=f"not judged: the project holds other files for {key} than its latest materialization "
                        "(a step run from the command line, a `dvc checkout` or `dvc exp apply` since); materialize "
                        f"{key} again, or turn on the dvc_lock_changed sensor to report what `dvc repro` made, then "
                        "check it")
    return as_check_result(verdict(layout))


def as_check_result(verdict: quality.Verdict) -> dg.AssetCheckResult:
    metadata = {k: dg.MetadataValue.json(v) if isinstance(v, (list, dict)) else v
                for k, v in verdict.metadata.items()}
    return dg.AssetCheckResult(passed=verdict.passed, description=printable(verdict.description), metadata=metadata,
                               severity=dg.AssetCheckSeverity.WARN if verdict.warn_only
                               else dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=assets.raw_preferences, name="pairs_well_formed", automation_condition=ON_UPDATE, blocking=True,
                description="No written pair has an empty side or chosen == rejected. Blocking.")
def raw_pairs_well_formed(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    return judged(context, project, "raw_preferences", quality.pairs_well_formed)


@dg.asset_check(asset=assets.raw_preferences, name="no_prompt_overlap", automation_condition=ON_UPDATE,
                description="No prompt is in both the train and the test split.")
def raw_no_prompt_overlap(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    return judged(context, project, "raw_preferences", quality.no_prompt_overlap)


def download_overrides(run_config: dict) -> list[str]:
    """The download settings entered for raw_preferences in this run: the data checks on raw_preferences
    judge by the thresholds its download step ran with."""
    return launchpad_overrides(run_config, "raw_preferences", DownloadConfig)


def unreadable_settings(exc: SettingsError) -> dg.AssetCheckResult:
    """A check whose settings cannot be read (an unset {env: NAME}, a broken params.yaml) fails saying why,
    as a blocking one stops what follows; it does not end in a traceback."""
    return dg.AssetCheckResult(passed=False, description="the check's settings cannot be read: " + printable(str(exc)),
                               severity=dg.AssetCheckSeverity.ERROR)


@dg.asset_check(asset=assets.raw_preferences, name="rejects_ratio", automation_condition=ON_UPDATE,
                description="The share of rejected source rows is at most download.max_reject_ratio, as "
                            "raw_preferences has it in the same run (else params.yaml's).")
def raw_rejects_ratio(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    try:
        params = project.load_params(download_overrides(context.run.run_config))
    except SettingsError as exc:
        return unreadable_settings(exc)
    return judged(context, project, "raw_preferences",
                  lambda layout: quality.rejects_ratio(layout, params.download.max_reject_ratio))


@dg.asset_check(asset=assets.reward_model, name="loss_is_finite", automation_condition=ON_UPDATE, blocking=True,
                description="Training logged finite losses (data/train/run.json, metrics.jsonl). Blocking.")
def model_loss_is_finite(context: dg.AssetCheckExecutionContext, project: ProjectResource) -> dg.AssetCheckResult:
    return judged(context, project, "reward_model", quality.loss_is_finite)


@dg.asset_check(asset=assets.evaluation, name="beats_length_baseline", automation_condition=ON_UPDATE,
                description="Test accuracy is above max(longer-wins, shorter-wins) baselines.")
def evaluation_beats_length_baseline(context: dg.AssetCheckExecutionContext,
                                     project: ProjectResource) -> dg.AssetCheckResult:
    return judged(context, project, "evaluation", quality.beats_length_baseline)


def push_overrides(run_config: dict) -> list[str]:
    """The push settings entered for hub_release in this run's config (the Launchpad), as overrides: the
    gate in front of hub_release holds the thresholds that hub_release's push step will apply."""
    return launchpad_overrides(run_config, "hub_release", PushConfig)


@dg.asset_check(asset=assets.evaluation, name="release_gate", automation_condition=ON_UPDATE, blocking=True,
                description="The release gate of the push step: accuracy >= push.min_accuracy on at least "
                            "push.min_test_pairs held-out pairs and not below the last released model of the same "
                            "source (the description says on which test pairs each was measured), every subset "
                            ">= push.min_subset_accuracy, |reward-length correlation| <= "
                            "push.max_length_correlation, at most push.max_test_seen_by_base of the held-out "
                            "pairs asking a prompt a base model trained on, with the push settings hub_release "
                            "has in the same run (else params.yaml's). Blocking here; the push step itself "
                            "refuses such a model too.")
def evaluation_release_gate(context: dg.AssetCheckExecutionContext,
                            project: ProjectResource) -> dg.AssetCheckResult:
    try:
        params = project.load_params(push_overrides(context.run.run_config))
    except SettingsError as exc:
        return unreadable_settings(exc)
    return judged(context, project, "evaluation", lambda layout: quality.release_gate(layout, params.push))


@dg.asset_check(asset=assets.evaluation, name="scores_consistent", automation_condition=ON_UPDATE,
                description="The held-out texts score the same at batch size 1, left-padded, through the packed "
                            "training forward (also with each pair's prompt shared) and through transformers' "
                            "pipeline as in evaluation, within the tolerance report.json states. A warning only.")
def evaluation_scores_consistent(context: dg.AssetCheckExecutionContext,
                                 project: ProjectResource) -> dg.AssetCheckResult:
    return judged(context, project, "evaluation", quality.scores_consistent)


CHECKS = [raw_pairs_well_formed, raw_no_prompt_overlap, raw_rejects_ratio, model_loss_is_finite,
          evaluation_beats_length_baseline, evaluation_release_gate, evaluation_scores_consistent]

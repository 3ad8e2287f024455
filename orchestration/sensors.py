"""The pipeline job, the weekly retraining schedule, the source-data and dvc.lock sensors, the
automation sensor that carries an update down the chain, and the sensor that judges again the checks a
failed run left unevaluated."""
import json
import math
import time
from datetime import UTC, datetime
from typing import Optional

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from rm_lib.errors import UserError
from rm_lib.pipeline.dvc_record import dvc_running
from rm_lib.pipeline.locking import running_step
from rm_lib.steps import PIPELINE

from .assets import ASSETS, STEP_OF_ASSET, evaluation_metadata, materialization_tags
from .checks import CHECKS
from .resources import HubResource, ProjectResource
from .run_lock import holder_now
from .source import observation, source_fingerprint

# Every asset of the pipeline, with its checks: raw_preferences -> ... -> hub_release.
pipeline_job = dg.define_asset_job(
    name="reward_model_pipeline",
    selection=dg.AssetSelection.assets(*ASSETS),
    description="Download, tokenize, filter, train, evaluate and publish the reward model (with all checks).",
)

# Declarative automation of the assets' automation_condition (assets.AFTER_BLOCKING_CHECKS) and the
# checks' (checks.ON_UPDATE). Off until turned on, like every other sensor here.
release_automation = dg.AutomationConditionSensorDefinition(
    "release_automation",
    target=dg.AssetSelection.assets(*ASSETS),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Carries an update down the chain: a step runs after one of its inputs changed outside a "
                "whole-pipeline run (a lone materialization, a `dvc repro` reported by dvc_lock_changed), and only "
                "once the blocking checks on its inputs passed, so nothing automated publishes past a failed "
                "release gate. The checks rerun on every new version of their asset.",
)

# The checks alone, judging the files of their assets' latest materializations (as "Execute all" on a
# Checks tab does)
recheck_job = dg.define_asset_job(
    name="checks_again",
    selection=dg.AssetSelection.checks(*CHECKS),
    description="The asset checks on their assets' latest materializations, without materializing anything.",
)


RECHECK_TRIES = 3  # runs of checks_again for a check and materialization that none of them evaluated


def left_unevaluated(instance: dg.DagsterInstance) -> dict[dg.AssetCheckKey, tuple[str, int]]:
    """The checks whose latest execution a run that has ended planned and never evaluated (it failed or was
    cancelled before they ran: the UI says "Execution failed"), on an asset that has a materialization:
    {check: (that run's id, the storage id of the asset's latest materialization)}."""
    keys = [key for check in CHECKS for key in check.check_keys]
    left = {}
    for key, record in instance.event_log_storage.get_latest_asset_check_execution_by_key(keys).items():
        if record.status != AssetCheckExecutionRecordStatus.PLANNED:
            continue
        run = instance.get_run_by_id(record.run_id)
        if run is not None and not run.is_finished:
            continue  # still to run
        latest = instance.fetch_materializations(key.asset_key, limit=1).records
        if latest:  # never materialized: nothing the check could judge
            left[key] = (record.run_id, latest[0].storage_id)
    return left


def verdict_on(instance: dg.DagsterInstance, key: dg.AssetCheckKey, materialization: int,
               looked_at: int = 50) -> Optional[dg.AssetCheckEvaluation]:
    """The latest evaluation of check `key` on the materialization `materialization` (its storage id), if an
    earlier run judged those files."""
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=looked_at):
        if record.status not in (AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED):
            continue
        evaluation = record.event.dagster_event.event_specific_data if record.event is not None \
            and record.event.dagster_event is not None else None
        target = getattr(evaluation, "target_materialization_data", None)
        if target is not None and target.storage_id == materialization:
            return evaluation
    return None


@dg.sensor(
    name="checks_after_failed_run", job=recheck_job, minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A run that ends before its checks run (a settings mistake its first step refuses, a failed train, "
                "a cancel) leaves every check it planned 'Execution failed' on its asset's latest materialization, "
                "which it did not change. The verdict an earlier run gave on those files is shown again as it was "
                "(its settings too); a check that never judged them runs again in checks_again, once no run or "
                "command-line step holds the project folder, at most 3 times for one materialization. Starts no step.")
def checks_after_failed_run(context: dg.SensorEvaluationContext, project: ProjectResource):
    left = left_unevaluated(context.instance)
    verdicts, to_judge = [], []
    for key, (_, materialization) in sorted(left.items(), key=lambda item: item[0].to_user_string()):
        earlier = verdict_on(context.instance, key, materialization)
        if earlier is not None:
            verdicts.append(earlier)
        else:
            to_judge.append(key)
    # the tries, per check and the materialization it is to judge: a new one starts again from none
    state = {key: f"{key.to_user_string()}@{materialization}" for key, (_, materialization) in left.items()}
    tries = {k: v for k, v in _cursor(context.cursor).items() if k in state.values()}
    given_up = [key for key in to_judge if tries.get(state[key], 0) >= RECHECK_TRIES]
    to_judge = [key for key in to_judge if key not in given_up]
    busy = None
    if to_judge:
        holder = holder_now(project.root_path(), context.instance)
        busy = running_step(project.layout(), PIPELINE) or (
            f"run {holder['run_id']} holds the project folder" if holder else None)
    said = []
    if verdicts:
        said.append("showed again the verdicts earlier runs gave on the same files: "
                    + ", ".join(e.asset_key.to_user_string() + "." + e.check_name for e in verdicts))
    if to_judge and busy is not None:
        said.append(f"{len(to_judge)} check(s) to run again once the project folder is free: {busy}")
    if given_up:
        said.append(f"left as they are after {RECHECK_TRIES} runs of {recheck_job.name} that did not evaluate "
                    f"them: {', '.join(key.to_user_string() for key in given_up)}")
    message = "; ".join(said) or "no check left unevaluated by a run"
    if not to_judge or busy is not None:
        return dg.SensorResult(asset_events=verdicts, skip_reason=message, cursor=json.dumps(tries))
    for key in to_judge:
        tries[state[key]] = tries.get(state[key], 0) + 1
    if said:
        context.log.info(message)
    runs = sorted({left[key][0] for key in to_judge})
    request = dg.RunRequest(run_key=f"checks-after-{'-'.join(run[:8] for run in runs)}", asset_check_keys=to_judge,
                            tags={"rm_lib/checks_after_runs": ",".join(runs)})
    return dg.SensorResult(asset_events=verdicts, run_requests=[request], cursor=json.dumps(tries))


weekly_retraining = dg.ScheduleDefinition(
    name="weekly_retraining",
    target=pipeline_job,
    cron_schedule="0 3 * * 1",  # Mondays 03:00
    execution_timezone="UTC",
    description="Retrain, evaluate and (if the release gate passes) publish the reward model every week.",
    default_status=dg.DefaultScheduleStatus.STOPPED,
)


def _cursor(text: Optional[str]) -> dict:
    try:
        state = json.loads(text) if text else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


# A requested run the daemon has not created after this long was lost (or deleted before a tick saw it)
UNSEEN_RUN_S = 1800
# A run requested for a source change that ended before raw_preferences took the new data (another
# run held the project folder, a crash) is requested again, this many times in all.
SOURCE_RUN_ATTEMPTS = 3
SOURCE_TAG = "rm/source_fingerprint"
# the content hash of the local source the pairs were made of, as dvc_lock_changed reports a download
SOURCE_SHA = "source_sha256"


def _took_the_change(instance: dg.DagsterInstance, requested: dict, project: ProjectResource,
                     state: dict) -> bool:
    """Whether raw_preferences was materialized from the changed source: by a run that started after the
    change was seen (as every run requested for it does), or outside a run (a `dvc repro` that
    dvc_lock_changed reported) whose pairs are of the source's content now (their manifest's
    source_sha256): such a report comes after its repro ended, which may have read the file before it
    changed. A run that started before may have read the data before it changed."""
    latest = instance.get_latest_materialization_event(dg.AssetKey("raw_preferences"))
    if latest is None or latest.timestamp < requested["at"]:
        return False
    record = instance.get_run_record_by_id(latest.run_id) if latest.run_id else None
    if record is None or record.start_time is None:  # outside a run, or its run deleted since
        materialization = latest.asset_materialization
        if requested.get("before") is not None and materialization is not None and \
                (materialization.tags or {}).get("dagster/data_version") == requested["before"]:
            return False  # the pairs Dagster had when the change was seen, reported again
        recorded = (materialization.metadata if materialization else {}).get(SOURCE_SHA)
        now = (state.get("local") or {}).get("sha256")
        # not known (a Hub dataset, a report of an older version): taken
        return recorded is None or now is None or recorded.value == now
    return record.start_time >= requested["at"]


def _manifest(project: ProjectResource) -> dict:
    try:
        manifest = json.loads((project.layout().pairs / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _pending_source_run(context: dg.SensorEvaluationContext, project: ProjectResource, requested: dict,
                        state: dict) -> tuple[str, str]:
    """(what to do, why) for a source change whose run was requested: "done" once raw_preferences was
    materialized since; "wait" while a run for it has not ended or another run holds the project folder;
    "again" when every run for it ended without raw_preferences (or was deleted from the run list); "give
    up" after SOURCE_RUN_ATTEMPTS, or at once when the latest was cancelled (a user's decision, not a
    mishap to repair). Marks `requested` "seen" once a run for it was found."""
    from .run_lock import holder_now

    instance = context.instance
    if _took_the_change(instance, requested, project, state):
        return "done", ""
    # runs for this change only: a source that changed back (A -> B -> A) has older runs with A's tag
    since = datetime.fromtimestamp(requested["at"], UTC)
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=pipeline_job.name, tags={SOURCE_TAG: requested["tag"]},
                                                   created_after=since))
    if runs:
        requested["seen"] = True  # kept in the cursor: a later tick that finds none knows they were deleted
    elif not requested.get("seen") and time.time() - requested["at"] < UNSEEN_RUN_S:
        return "wait", "the run requested for it has not started"  # the daemon creates it after the tick
    if any(not r.is_finished for r in runs):
        return "wait", "the run requested for it has not ended"
    # none: deleted from the run list (they had ended, without the change), or never created
    latest = _latest_run(instance, runs)
    if latest is not None and latest.status == dg.DagsterRunStatus.CANCELED:
        return "give up", f"run {latest.run_id} for it was cancelled: materialize raw_preferences to take it"
    holder = holder_now(project.root_path(), instance)
    if holder is not None:
        return "wait", f"run {holder.get('run_id')} is using the project folder"
    running = running_step(project.layout(), PIPELINE)  # a step run from the command line refuses every run
    if running is not None:
        return "wait", f"{running} (from the command line or `dvc repro`)"
    dvc = dvc_running(project.root_path())  # a `dvc repro` between two stages
    if dvc is not None:
        return "wait", dvc
    mistake = _repeatable_mistake(instance, runs)
    if mistake is not None:  # bad data or settings: another run would fail the same way
        return "give up", f"{mistake}: fix it and materialize raw_preferences"
    if requested["attempts"] < SOURCE_RUN_ATTEMPTS:
        return "again", ""
    if not runs:
        return "give up", ("the runs requested for it are gone from Dagster's run list (deleted): materialize "
                           "raw_preferences to take it")
    return "give up", (f"{len(runs)} runs for it ended without materializing raw_preferences "
                       f"({', '.join(r.run_id for r in runs)}): fix what they report and materialize raw_preferences")


def _latest_run(instance: dg.DagsterInstance, runs: list) -> Optional[dg.DagsterRun]:
    """The last created of `runs`, or None (none, or deleted since)."""
    records = [r for r in (instance.get_run_record_by_id(run.run_id) for run in runs) if r is not None]
    return max(records, key=lambda record: record.create_timestamp.timestamp()).dagster_run if records else None


# the errors a run for the same data and settings meets again (orchestration.assets.mistake names them)
REPEATABLE = frozenset({"DataError", "SettingsError"})


def _repeatable_mistake(instance: dg.DagsterInstance, runs: list) -> Optional[str]:
    """How the latest of `runs` failed where its download step met bad data or settings, or None (refused
    by another process, a crash, settings that did not load or a source not there then, which
    this tick found mended: worth another run)."""
    latest = _latest_run(instance, runs)
    if latest is None:  # deleted since
        return None
    for entry in instance.all_logs(latest.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        failure = entry.dagster_event.step_failure_data.user_failure_data if entry.dagster_event else None
        metadata = failure.metadata if failure is not None else {}
        kind, own = metadata.get("error"), metadata.get("of_the_step")
        if entry.step_key == "raw_preferences" and kind is not None and kind.value in REPEATABLE \
                and own is not None and own.value is True:
            return f"run {latest.run_id} failed: {failure.description}"
    return None


def _run_for(context: dg.SensorEvaluationContext, state: dict, what: str, attempts: int,
             earlier: dict | None = None) -> dg.SensorResult:
    # No run_key: the cursor already stops repeats, and a source that changes back (A -> B -> A)
    # must run again. The observation gives preference_source its new data version in the graph.
    tag = state["fingerprint"][:16]
    # `at`: when the change was first seen; the runs for it are those created since. `before`: the pairs'
    # version then (a report of them again, by dvc_lock_changed, is not the change taken)
    if earlier is None:
        latest = context.instance.get_latest_materialization_event(dg.AssetKey("raw_preferences"))
        tags = materialization_tags(latest)
        earlier = {"at": time.time(), "before": tags.get("dagster/data_version")}
    requested = {"tag": tag, "attempts": attempts, "at": earlier["at"],
                 **({"before": earlier["before"]} if "before" in earlier else {}),
                 **({"seen": True} if earlier.get("seen") else {})}
    context.update_cursor(json.dumps({**state, "requested": requested}, sort_keys=True))
    return dg.SensorResult(run_requests=[dg.RunRequest(tags={SOURCE_TAG: tag})],
                           asset_events=[observation(state, what)])


@dg.sensor(
    name="source_data_changed",
    target=pipeline_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Runs the whole pipeline when download.source changes: the content of a local file or folder "
                "(a touch is no change), a Hub dataset's commit sha. The demo set never changes, so it triggers "
                "once, for the first cursor. A run for a change that ends before raw_preferences took the new "
                f"data (another run held the project folder) is requested again, {SOURCE_RUN_ATTEMPTS} times in all; "
                "one that failed on the data or the settings, or was cancelled, is not, and the ticks say the "
                "change is not taken until raw_preferences is materialized.",
)
def source_data_changed(context: dg.SensorEvaluationContext, project: ProjectResource, hub: HubResource):
    previous = _cursor(context.cursor)
    try:
        state, what = source_fingerprint(project, hub, previous)
    except UserError as exc:  # params.yaml that cannot be read: the tick says why, the next one looks again
        return dg.SkipReason(f"settings not readable now: {exc}")
    if state is None:
        return dg.SkipReason(what)
    if state["fingerprint"] != previous.get("fingerprint"):
        return _run_for(context, state, what, attempts=1)
    requested = dict(previous["requested"]) if previous.get("requested") else None  # marked, then compared
    if requested and "gave_up" in requested:  # not requested again, but not taken either until a run takes it
        taken = _took_the_change(context.instance, requested, project, state)
        action, why = ("done", "") if taken else ("give up", requested["gave_up"])
    else:
        action, why = _pending_source_run(context, project, requested, state) if requested else ("done", "")
    if action == "again":
        return _run_for(context, state, what, attempts=requested["attempts"] + 1, earlier=requested)
    if action == "wait":
        state["requested"] = requested
    if action == "give up":
        state["requested"] = {**requested, "gave_up": why}
    if state != previous:  # touched, or rewritten with the same bytes: remember the new stats
        context.update_cursor(json.dumps(state, sort_keys=True))
    if action == "give up":
        return dg.SkipReason(f"source changed ({what}), but {why}")
    return dg.SkipReason(f"source unchanged: {what}" + (f" ({why})" if why else ""))


ASSET_OF_STAGE = {step: key for key, step in STEP_OF_ASSET.items()}
PARENTS = {a.key.to_user_string(): [k.to_user_string() for k in a.asset_deps[a.key]] for a in ASSETS}


def _chain_position(stage: str) -> int:
    """Upstream first: a parent reported in the same tick gives its children their input versions."""
    order = list(STEP_OF_ASSET.values())
    return order.index(stage) if stage in order else len(order)


def _input_tags(instance: dg.DagsterInstance, key: str, reported: dict[str, str], locked: dict,
                held: dict[str, bool]) -> dict[str, str]:
    """The provenance Dagster writes on a materialization it makes: each input's data version (and its
    event), so the graph's staleness compares them with the inputs' current ones. Called only where the
    stage was made from the data the workspace holds (its dvc.lock data deps match). An input is given
    only where that is its own dvc.lock version: the workspace holds the input stage's dvc.lock outputs
    and Dagster's current version of it (reported in this tick, or recorded before) is that one. Any
    other input, and preference_source (which revision of the source DVC's download read is not known
    here), is left out: the asset then shows a new dependency, as it should."""
    tags = {}
    for parent in PARENTS[key]:
        stage = STEP_OF_ASSET.get(parent)
        if stage not in locked or not held.get(stage):
            continue
        version, pointer = reported.get(parent), "NULL"
        if version is None:
            record = instance.get_latest_data_version_record(dg.AssetKey(parent))
            event = record.asset_event if record is not None else None
            version = (event.tags or {}).get("dagster/data_version") if event is not None else None
            pointer = str(record.storage_id) if record is not None else "NULL"
        if version != locked[stage].version:
            continue
        tags[f"dagster/input_data_version/{parent}"] = version
        tags[f"dagster/input_event_pointer/{parent}"] = pointer
    return tags


def _input_versions(tags: dict[str, str]) -> dict[str, str]:
    """The inputs' data versions among a materialization's tags (not their event pointers)."""
    return {k: v for k, v in tags.items() if k.startswith("dagster/input_data_version/")}


def _figures(key: str, project: ProjectResource) -> dict:
    """What the asset's own materialization shows of outputs that the workspace holds as dvc.lock names them:
    an evaluation's accuracy and baselines (the series under Plots went on with the model before), a
    model's steps and loss; none where the files do not say."""
    layout = project.layout()
    try:
        if key == "evaluation":
            return evaluation_metadata(json.loads((layout.evaluation / "report.json").read_text("utf-8")), layout)
        if key == "reward_model":
            summary = json.loads((layout.train_logs / "summary.json").read_text("utf-8"))
            return {name: dg.MetadataValue.float(float(summary[name])) if name != "steps"
                    else dg.MetadataValue.int(int(summary[name])) for name in ("steps", "final_loss")
                    if isinstance(summary.get(name), (int, float)) and math.isfinite(summary[name])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # an older or damaged record: no figures
        return {}
    return {}


@dg.sensor(
    name="dvc_lock_changed",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Reports what DVC did outside Dagster (a `dvc repro`, `dvc pull`, `git checkout` + `dvc checkout`): "
                "when dvc.lock names other outputs for a stage than Dagster last recorded, and the workspace "
                "holds them, the asset gets a materialization with the DVC hash as its data version, so the UI's "
                "staleness follows DVC. Waits while a `dvc repro` runs.",
)
def dvc_lock_changed(context: dg.SensorEvaluationContext, project: ProjectResource):
    from rm_lib.pipeline.code_version import code_hash
    from rm_lib.pipeline.dvc_record import locked_stages

    from .run_lock import holder_now

    root = project.root_path()
    holder = holder_now(root, context.instance)
    if holder is not None:  # its steps commit to dvc.lock before Dagster records them
        return dg.SkipReason(f"run {holder.get('run_id')} is using the project folder: dvc.lock is read after it ends")
    # a `dvc repro` midway: its stages so far would be reported, and release_automation would start runs
    # into the rest of it (to do again what it is doing)
    busy = dvc_running(root) or running_step(project.layout(), PIPELINE)
    if busy is not None:
        return dg.SkipReason(f"{busy}: dvc.lock is read after it ends")
    try:
        locked = locked_stages(root)
    except UserError as exc:  # dvc.lock with a merge conflict in it: named, and tried again next tick
        return dg.SkipReason(str(exc))
    # per stage: whether the workspace held dvc.lock's outputs when its files had these sizes and times
    seen = json.loads(context.cursor) if context.cursor else {}
    seen = {s: v for s, v in seen.items() if isinstance(v, dict)}  # a cursor of the older form holds none
    checked, events, versions = {}, [], {}
    for stage, entry in sorted(locked.items(), key=lambda item: _chain_position(item[0])):
        key = ASSET_OF_STAGE.get(stage)
        if key is None:
            continue
        signature, cached = entry.signature(root), seen.get(stage, {})
        same = cached.get("lock") == entry.version and cached.get("signature") == signature
        if same and "inputs_match" in cached:
            matches, inputs_match = cached["matches"], cached["inputs_match"]
        else:
            matches = entry.in_workspace(root)
            inputs_match = matches and entry.inputs_in_workspace(root)
        checked[stage] = {"lock": entry.version, "signature": signature, "matches": matches,
                          "inputs_match": inputs_match}
        if not matches:
            # the workspace holds other outputs than dvc.lock's (a run with other settings, in its DVC
            # experiment): what Dagster last recorded is what is there
            continue
        latest = context.instance.get_latest_materialization_event(dg.AssetKey(key))
        tags = materialization_tags(latest)
        code_version = code_hash(stage) if entry.current_code else f"dvc.lock:{entry.version[:12]}"
        held = {s: c["matches"] for s, c in checked.items()}
        inputs = _input_tags(context.instance, key, versions, locked, held) if inputs_match else {}
        # a parent reported in this tick whose new version dvc.lock says this stage was made from
        took_new_input = any(f"dagster/input_data_version/{parent}" in inputs
                             for parent in PARENTS[key] if parent in versions)
        # dvc.lock says the code here made it, where Dagster's record says other code (an upgrade's `dvc repro`
        # remade the same outputs); the other way round (code edited since) is left to the record
        newer_code = entry.current_code and tags.get("dagster/code_version") != code_version
        # the sensor's own record names other inputs than dvc.lock says it was made from (none claimed: the
        # record stands, and the automation runs the step as DVC would)
        other_inputs = bool(latest and not latest.run_id and inputs
                            and _input_versions(tags) != _input_versions(inputs))
        recorded = tags.get("dagster/data_version") == entry.version and not newer_code and not other_inputs
        if recorded and not took_new_input:
            # Reported again where the record says other code, or (the sensor's own) other inputs: the graph
            # kept those steps stale; and with a parent reported in this tick that it was made from:
            # release_automation runs a step whose input was updated and it was not (the pairs reported
            # alone, the whole chain ran again)
            continue
        versions[key] = entry.version
        # which content of the source the repro's pairs are of: source_data_changed asks it of this report
        read = _manifest(project).get(SOURCE_SHA) if key == "raw_preferences" else None
        events.append(dg.AssetMaterialization(
            asset_key=key,
            description=f"dvc.lock names other outputs for stage {stage}: made outside Dagster",
            metadata={"dvc_hash": entry.version, "recorded_by": "dvc.lock",
                      "made_by_current_code": entry.current_code,
                      **({SOURCE_SHA: read} if isinstance(read, str) else {}), **_figures(key, project)},
            # the code version only when dvc.lock's code deps are the files here now
            tags={"dagster/data_version": entry.version, "dagster/code_version": code_version, **inputs}))
    context.update_cursor(json.dumps(checked, sort_keys=True))
    if not events:
        return dg.SkipReason("dvc.lock agrees with what Dagster last recorded, or the workspace holds other outputs "
                             "than dvc.lock's" if locked else "no dvc.lock")
    return dg.SensorResult(asset_events=events)

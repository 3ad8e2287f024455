"""The six pipeline assets. Each one calls its rm_lib step, which writes the files at the
rm_lib.layout paths that the DVC stages use too; nothing passes through an IO manager. Then the
asset records the step in DVC as `dvc repro` would (dvc.lock, cache, remote: rm_lib.pipeline.dvc_record), and
the DVC hash of what it wrote is its data version.

Heavy modules (torch, transformers, the rm_lib step modules) are imported inside the asset bodies.
"""
import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

from rm_lib import network
from rm_lib.data.trained_prompts import SEEN
from rm_lib.errors import DataError, SettingsError, UserError
from rm_lib.evaluation import quality
from rm_lib.evaluation.visualize import printable
from rm_lib.files import dvc_md5
from rm_lib.layout import SPLITS, Layout
from rm_lib.pipeline.code_version import code_hash
from rm_lib.pipeline.dvc_record import (
    VERSION_OUTS,
    NotRecorded,
    Recorded,
    RecordError,
    combined_hash,
    is_dvc_repo,
    locked_stages,
    workspace_note,
)
from rm_lib.pipeline.preflight import check_before
from rm_lib.settings import Params

from .config import (
    DownloadConfig,
    EvaluateConfig,
    FilterConfig,
    PushConfig,
    StepConfig,
    TokenizeConfig,
    TrainConfig,
    run_overrides,
)
from .launcher import TrainLauncherResource
from .resources import DvcResource, HubResource, ProjectResource, WandbResource
from .run_lock import claim_project
from .source import GROUP, preference_source

# Every asset whose step may reach the network (download, tokenize, train and evaluate load from the Hub,
# train starts W&B, evaluate reads Hub suites, push uploads): a transient error (UserError.transient) is
# retried after about 30 s, 90 s, 210 s ((2^n - 1) x 30 s, +-30 s). Under Dagster this policy is the only
# retry layer: the step runs inside rm_lib.network.single_attempt(), whose docstring holds the whole
# policy. Anything else (bad settings, bad data, a refused token, a diverged loss, a crash) is
# dg.Failure(allow_retries=False): no retry (`retried_only_when_transient`).
NETWORK_RETRY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

# Declarative automation (the release_automation sensor, off until turned on): a step runs after one of
# its inputs was updated outside a whole-pipeline run (a lone materialization, a `dvc repro` that
# dvc_lock_changed reported), and only once every blocking check on its inputs passed for their latest
# version, or runs in the same run (which then stops at a failing check). So an automated run never
# publishes past a failed release gate. raw_preferences has none: source_data_changed starts it.
# Nor while an input is about to go stale: one whose own input runs in this tick while it does not.
# Dagster evaluates a tick's checks after some assets and before others, so after a run that stopped in
# train (its loss_is_finite planned, never run) a tick can request train and hub_release but not
# evaluation: the release would be judged by the last model's evaluation.
INPUTS_SETTLED = ~dg.AutomationCondition.any_deps_match(
    dg.AutomationCondition.any_deps_match(dg.AutomationCondition.will_be_requested())
    & ~dg.AutomationCondition.will_be_requested()).with_label("an input about to go stale")
AFTER_BLOCKING_CHECKS = (dg.AutomationCondition.eager()
                         & dg.AutomationCondition.all_deps_blocking_checks_passed()
                         & INPUTS_SETTLED).with_label(
    "an input updated, its blocking checks passed, and no input is about to go stale")


# ---------------------------------------------------------------- helpers

def described(step: str, error: object) -> str:
    """`<step>: <message>`, the step named once: many of rm_lib's messages start with it already. Control
    characters from the data are written as escapes, as the CLI prints them (Dagster's console shows it), and
    a URL's credentials (an HF_ENDPOINT's) are left out."""
    message = printable(network.without_credentials(str(error)))
    return message if message.startswith(f"{step}: ") else f"{step}: {message}"


def mistake(step: str, error: UserError, description: str | None = None, *, of_the_step: bool = True) -> dg.Failure:
    """The step's failure for a UserError, not retried. Its metadata names the error's kind, and whether the
    step itself met it (`of_the_step`; not: the settings did not load then, the source was not there): a run
    for a changed source whose download met a DataError or a SettingsError in the data or settings as they
    still are is not requested again (sensors._pending_source_run), where one refused by another process
    (StepRunning), or one that met what a tick since finds mended, is."""
    return dg.Failure(description=description or described(step, error), allow_retries=False,
                      metadata={"error": type(error).__name__, "of_the_step": of_the_step})


def retried_only_when_transient(step: str) -> Callable:
    """For an asset under NETWORK_RETRY, which retries whatever it raises but a dg.Failure that forbids it:
    a transient error (UserError.transient; a network error rm_lib did not wrap, as rm_lib.network.is_transient
    tells) is raised as it is, for the RetryPolicy; any other error becomes a dg.Failure without retries."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def asset_body(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except dg.Failure:
                raise
            except (KeyboardInterrupt, DagsterExecutionInterruptedError) as exc:
                # Dagster turns an interrupt into a retry under a RetryPolicy: with the in-process executor a
                # run stopped (SIGTERM, Ctrl-C) trained on from its checkpoint to the end
                raise dg.Failure(description=f"{step}: stopped before it ended; not run again (a stopped run stays "
                                             "stopped: train resumes from its last checkpoint when run again)",
                                 allow_retries=False) from exc
            except UserError as exc:
                if exc.transient:
                    raise
                raise mistake(step, exc) from exc
            except Exception as exc:
                if network.is_transient(exc):
                    raise
                said = network.first_line(exc, None)  # a URL's credentials never reach the event log
                first = type(exc).__name__ + ("" if said == type(exc).__name__ else f": {printable(said)}")
                raise dg.Failure(description=f"{step}: {first} (not retried: not a "
                                             "transient network error; the traceback is in this step's log)",
                                 allow_retries=False) from exc
        asset_body.retried_only_when_transient = step
        return asset_body
    return decorate


def _settings(context: dg.AssetExecutionContext, step: str, config: StepConfig, project: ProjectResource,
              extra: Sequence[str] = (), hub: Optional[HubResource] = None) -> tuple[Params, Layout]:
    """params.yaml + the project's run-wide overrides + `extra` (from resources) + the run config, once
    this run holds the project folder (orchestration.run_lock: one run at a time). `hub`: the credentials
    the run's first step reads the base model with (a gated model), where a later step of the run loads it."""
    if not project.params_path().is_file():  # a wrong root: said before the claim writes .rm_lib/locks there
        try:
            project.load_params()
        except SettingsError as exc:
            raise mistake(step, exc, of_the_step=False) from exc
    claim_project(context, project.root_path())
    try:
        # the whole run's settings first: a mistake in train's must stop the run before download replaces
        # data/pairs, as the CLI's `run` refuses it before any work; what only the model or the files the
        # settings name can judge, by the run's first step
        whole = project.load_params([*extra, *run_overrides(context.run.run_config, STEP_OF_ASSET)])
        steps = _steps_of_run(context) or {step}
        if step == min(steps, key=list(STEP_OF_ASSET.values()).index):  # in the order the steps run
            with network.single_attempt(), (hub.credentials() if hub else contextlib.nullcontext()):
                check_before(steps, whole)
    except SettingsError as exc:
        if exc.transient:
            raise  # the Hub did not answer: the RetryPolicy tries again
        raise mistake(step, exc, f"{step}: not run, nothing changed: this run's settings hold a mistake: "
                                 f"{printable(str(exc))}", of_the_step=False) from exc
    try:
        params = project.load_params([*extra, *config.overrides()])
    except SettingsError as exc:
        raise mistake(step, exc, of_the_step=False) from exc
    return params, project.layout()


def _steps_of_run(context: dg.AssetExecutionContext) -> set[str]:
    """The steps whose assets this run materializes: the step keys it executes (a re-execution from
    failure names the rest alone), else its asset selection, else every asset of its job."""
    run = context.run
    names = (run.step_keys_to_execute or [key.to_user_string() for key in run.asset_selection or ()]
             or [node.name for node in context.job_def.nodes_in_topological_order])
    return {STEP_OF_ASSET[name] for name in names if name in STEP_OF_ASSET}


def _run_step(context: dg.AssetExecutionContext, step: str, params: Params, layout: Layout):
    """rm_lib.steps.<step>.run, trying each network call once; a UserError becomes a one-paragraph
    dg.Failure, except a transient one, which is raised as it is for the asset's RetryPolicy."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as the CLI does
    from rm_lib import steps

    try:
        with network.single_attempt():
            result = steps.run(step, params, layout)
    except UserError as exc:
        if exc.transient:
            raise  # the RetryPolicy tries again
        raise mistake(step, exc) from exc
    context.log.info(printable(result.summary()))
    return result


def _train_in_own_process(context: dg.AssetExecutionContext, trainer: TrainLauncherResource,
                          project: ProjectResource, overrides: Sequence[str]):
    """The train step under `accelerate launch`, with the settings this asset resolved; its metrics
    stream into the event log, and its summary.json is read back for the asset's metadata."""
    from rm_lib.steps.train import result_from_summary

    layout = project.layout()
    summary = layout.train_logs / "summary.json"
    before = summary.stat().st_mtime_ns if summary.exists() else None
    problem = trainer.problem(project.root_path())
    if problem is not None:
        raise dg.Failure(description=f"train: not launched: {printable(problem)}", allow_retries=False)
    command = trainer.command(project.root_path(), project.params_path(), overrides)
    code, messages, why = trainer.launch(context, command, cwd=project.root_path())
    errors = [m for m in messages if isinstance(m, dict) and "error" in m]
    if errors:  # a transient one (the Hub down while the model loads) is left to the RetryPolicy
        raise dg.Failure(description=described("train", errors[0]["error"]),
                         allow_retries=bool(errors[0].get("transient")))
    if code != 0:
        said = f": {printable(why)}" if why else ""
        raise dg.Failure(description=f"train: the training process exited with code {code}{said}; its whole output is "
                                     "in this step's stdout/stderr logs", allow_retries=False)
    # a finished run reused as it was (its checkpoints gone) leaves summary.json as it was, and says so
    reported = [m for m in messages if isinstance(m, dict) and "summary" in m]
    reused = bool(reported) and reported[-1].get("reused") is True
    if not summary.exists() or (summary.stat().st_mtime_ns == before and not reused):
        raise dg.Failure(description=f"train: the training process wrote no new {summary}", allow_retries=False)
    result = result_from_summary(layout)
    if reused:
        result = dataclasses.replace(result, reused=True)
    context.log.info(printable(result.summary()))
    return result


def re_executed_runs(context: dg.AssetExecutionContext) -> list[str]:
    """The runs this run re-executes, nearest first: its parent, the parent's parent, ..., the root (Dagster
    gives a re-execution of a re-execution the first run as its root)."""
    chain, run = [], context.run
    while run is not None and run.parent_run_id and run.parent_run_id not in chain:
        chain.append(run.parent_run_id)
        run = context.instance.get_run_by_id(run.parent_run_id)
    if context.run.root_run_id and context.run.root_run_id not in chain:  # a run between them deleted
        chain.append(context.run.root_run_id)
    return chain


def _recordable(dvc: DvcResource, project: ProjectResource, step: str, layout: Layout) -> None:
    """Where the step's DVC record would fail once it has run (rm_lib.steps.check_recordable): said before."""
    from rm_lib import steps

    if dvc.enabled and is_dvc_repo(project.root_path()):
        try:
            steps.check_recordable(step, layout)
        except UserError as exc:
            raise mistake(step, exc) from exc


def _record_in_dvc(context: dg.AssetExecutionContext, dvc: DvcResource, project: ProjectResource, stage: str,
                   params: Params, fallback: Optional[str]) -> tuple[dict, Optional[dg.DataVersion]]:
    """Record the step in DVC. Returns the metadata saying what was recorded (and pushed where) and the
    data version: the DVC hash of the stage's VERSION_OUTS (rm_lib.pipeline.dvc_record; default: all its outs);
    `fallback` when nothing was recorded (no DVC repository, settings that are not params.yaml's)."""
    try:
        # a re-execution joins the experiment of a run it re-executes where that lacks the stage (rm_lib decides)
        outcome = dvc.record(project.root_path(), stage, params, run_id=context.run.run_id,
                             re_executes=re_executed_runs(context))
    except RecordError as exc:
        raise dg.Failure(description=record_failed(stage, exc), allow_retries=False) from exc
    except (KeyboardInterrupt, DagsterExecutionInterruptedError) as exc:
        # not "stopped before it ended" (retried_only_when_transient): the step had ended
        raise dg.Failure(description=record_stopped(stage), allow_retries=False) from exc
    if isinstance(outcome, NotRecorded):
        context.log.info(printable(f"{stage}: not recorded in DVC: {outcome.reason}"))
        return _not_recorded_metadata(outcome), dg.DataVersion(fallback) if fallback else None
    if outcome.experiment:
        context.log.info(printable(f"{stage}: recorded in the DVC experiment {outcome.experiment}; "
                                   f"{outcome.push_note}; {workspace_note(outcome.experiment, project.root_path())}"))
    elif not outcome.pushed:
        context.log.warning(printable(f"{stage}: recorded in dvc.lock and the DVC cache but not pushed: "
                                      f"{outcome.push_note}"))
    version = combined_hash(outcome.outs, list(VERSION_OUTS.get(stage, ())) or None)
    return _recorded_metadata(outcome, version), dg.DataVersion(version)


def materialization_tags(event: Optional[dg.EventLogEntry]) -> dict:
    """A materialization event's tags: none for no event, and for one reported by hand (the UI's Report
    materialization), which has None."""
    materialization = event.asset_materialization if event is not None else None
    return (materialization.tags if materialization is not None else None) or {}


def versions_now(project: ProjectResource, key: str) -> set[str]:
    """The data versions a materialization of asset `key` records for the files the project holds now
    (_record_in_dvc): the DVC hash of its stage's outputs, where dvc.lock names them, and the asset's own
    where DVC recorded nothing (the pairs' content hash, the run fingerprint, the report's sha256)."""
    root, layout = project.root_path(), project.layout()
    found = set()
    locked = locked_stages(root).get(STEP_OF_ASSET[key])
    if locked is not None:
        hashes = {out: dvc_md5(root / out) for out in locked.outs}
        if None not in hashes.values():
            found.add(combined_hash(hashes))
    own = {"raw_preferences": layout.pairs / "manifest.json", "reward_model": layout.train_logs / "summary.json",
           "evaluation": layout.evaluation / "report.json"}.get(key)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if key == "evaluation":
            found.add(hashlib.sha256(own.read_bytes()).hexdigest())
        elif own is not None:
            found.add(_read_json(own).get("content_hash" if key == "raw_preferences" else "fingerprint"))
    return {v for v in found if isinstance(v, str)}


def record_failed(stage: str, error: object) -> str:
    """The step ran and replaced its outputs before DVC failed: the failure says so, and the ways on."""
    return (f"{stage}: the step ran and replaced its outputs in the workspace, but recording them in DVC failed: "
            f"{printable(str(error))}. dvc.lock and Dagster's last materialization still name the earlier outputs. "
            f"Fix the cause and materialize this asset again; or `dvc checkout dvc.yaml:{stage}` puts the recorded "
            f"outputs back; or, when the run used params.yaml's settings, `dvc commit --force dvc.yaml:{stage}` "
            "records the new ones as they are")


def record_stopped(stage: str) -> str:
    """The run was stopped after the step had replaced its outputs, while DVC recorded them."""
    again = " (train reuses the run that finished)" if stage == "train" else ""
    return (f"{stage}: stopped while DVC recorded the step's outputs; the step had ended and replaced them in the "
            "workspace. Dagster's last materialization still names the earlier outputs; dvc.lock names the earlier "
            f"ones, or the new ones where DVC had finished (`dvc status` tells). Materialize this asset again to "
            f"record them{again}; or `dvc checkout dvc.yaml:{stage}` puts the recorded outputs back")


def _recorded_metadata(outcome: Recorded, version: str) -> dict:
    remote = "none" if not outcome.remote else (
        f"{outcome.remote} ({outcome.remote_url})" if outcome.remote_url  # a remote of no url: none DVC knows here
        else f"{outcome.remote} (no url in the project's .dvc/config: see dvc_push)")
    experiment = {}
    if outcome.experiment:
        experiment = {"dvc_experiment": outcome.experiment}
        where = (f"recorded: stage {outcome.stage} in DVC experiment {outcome.experiment} (this run's settings "
                 f"are not params.yaml's): `dvc exp show` lists it, `dvc exp apply {outcome.experiment}` brings "
                 "it into the workspace")
    else:
        where = (f"recorded: stage {outcome.stage} in dvc.lock and the DVC cache "
                 "(commit dvc.lock with git to keep this version)")
    return {
        "dvc": where,
        **experiment,
        "dvc_hash": version,
        "dvc_outs": _table(["out", "DVC hash"], sorted(outcome.outs.items())),
        "dvc_hashes": dg.MetadataValue.json(outcome.outs),
        "dvc_pushed": outcome.pushed,
        "dvc_remote": remote,
        "dvc_push": outcome.push_note,
        "dvc_lock_entry": outcome.lock_entry,
    }


def _not_recorded_metadata(outcome: NotRecorded) -> dict:
    metadata = {"dvc": f"not recorded: {outcome.reason}"}
    if outcome.details:
        metadata["dvc_differences"] = dg.MetadataValue.md("\n".join(f"- `{d}`" for d in outcome.details))
    return metadata


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _image(path: Path, title: str) -> dg.MetadataValue:
    """A PNG inline in the UI (markdown with a data URI); the file path when it is missing."""
    if not path.is_file():
        return dg.MetadataValue.text(f"{path} not written")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{data})")


def _table(header: list[str], rows: list[list]) -> dg.MetadataValue:
    """A table the UI shows as one (typed columns, sortable), not a markdown link."""
    def kind(values: list) -> str:
        if values and all(isinstance(v, bool) for v in values):
            return "bool"
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return "int"
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return "float"
        return "string"

    kinds = [kind([row[i] for row in rows]) for i in range(len(header))]
    columns = [dg.TableColumn(name, k) for name, k in zip(header, kinds)]
    records = [dg.TableRecord({name: (v if k != "string" else str(v)) for name, k, v in zip(header, kinds, row)})
               for row in rows]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def _text(value) -> str:
    return "none" if value is None else str(value)


def _number(value) -> dg.MetadataValue:
    """A float for the UI (plotted across materializations); None, NaN and inf as text."""
    if value is None:
        return dg.MetadataValue.text("none")
    value = float(value)
    return dg.MetadataValue.float(value) if math.isfinite(value) else dg.MetadataValue.text(str(value))


def _link(value: str | None) -> dg.MetadataValue:
    if value and value.startswith(("http://", "https://")):
        return dg.MetadataValue.url(value)
    return dg.MetadataValue.text(value or "not logged (no train.wandb_project, or W&B disabled)")


# ---------------------------------------------------------------- assets

@dg.asset(group_name=GROUP, code_version=code_hash("download"), deps=[preference_source], retry_policy=NETWORK_RETRY,
          kinds={"huggingface"},
          description="download: the source (params.yaml download.source: demo, a local file/folder or a Hub "
                      "dataset) -> normalised pairs split into train/test, rejects by reason (data/pairs).")
@retried_only_when_transient("download")
def raw_preferences(context: dg.AssetExecutionContext, config: DownloadConfig, project: ProjectResource,
                    hub: HubResource, dvc: DvcResource) -> dg.MaterializeResult:
    params, layout = _settings(context, "download", config, project, hub=hub)
    _recordable(dvc, project, "download", layout)
    from rm_lib.data.sources import source_kind

    try:
        source_kind(params.download.source)  # a missing local file: no retry, no credentials
    except DataError as exc:
        raise mistake("download", exc, of_the_step=False) from exc
    with hub.credentials():
        result = _run_step(context, "download", params, layout)
    manifest = _read_json(layout.pairs / "manifest.json")
    rejects = manifest.get("rejects_by_reason", {})
    rejected = int(manifest.get("rejected", sum(rejects.values())))
    rows_read = int(manifest["rows_read"])
    recorded, version = _record_in_dvc(context, dvc, project, "download", params, result.content_hash)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(result.pairs.values()),
            "source": result.source,
            "source_kind": result.kind,
            "source_revision": _text(result.revision),
            "formats": ", ".join(result.formats),
            "rows_read": rows_read,
            "train_pairs": result.pairs["train"],
            "test_pairs": result.pairs["test"],
            "rejected": rejected,
            "reject_ratio": _number(rejected / rows_read if rows_read else 0.0),
            "rejects_by_reason": dg.MetadataValue.json(rejects),
            "rejects_table": _table(["reason", "rows"], sorted(rejects.items()) or [["(none)", 0]]),
            "ignored_columns": dg.MetadataValue.json(result.ignored_columns),
            "split": manifest.get("split", ""),
            "content_hash": result.content_hash,
            "path": dg.MetadataValue.path(str(layout.pairs)),
            **recorded,
        },
        data_version=version,
    )


@dg.asset(group_name=GROUP, code_version=code_hash("tokenize"), automation_condition=AFTER_BLOCKING_CHECKS,
          deps=[raw_preferences], retry_policy=NETWORK_RETRY, kinds={"parquet"},
          description="tokenize: normalised pairs -> token ids through the chat template (data/tokenized).")
@retried_only_when_transient("tokenize")
def tokenized_preferences(context: dg.AssetExecutionContext, config: TokenizeConfig, project: ProjectResource,
                          hub: HubResource, dvc: DvcResource) -> dg.MaterializeResult:
    params, layout = _settings(context, "tokenize", config, project, hub=hub)
    _recordable(dvc, project, "tokenize", layout)
    with hub.credentials():  # the tokenizer of a gated Hub model
        result = _run_step(context, "tokenize", params, layout)
    recorded, version = _record_in_dvc(context, dvc, project, "tokenize", params, result.content_hash)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(result.rows.values()),
            "model": params.model.name_or_path,
            "template": result.template,
            "train_pairs": result.rows["train"],
            "test_pairs": result.rows["test"],
            "tokens": sum(result.tokens.values()),
            "prompts_left_out": sum(result.prompts_left_out.values()),
            "refused_by_template": sum(result.refused.values()),
            "content_hash": result.content_hash,
            "path": dg.MetadataValue.path(str(layout.tokenized)),
            **recorded,
        },
        data_version=version,
    )


# filter itself reads no network; as a run's first step it reads the base model for the later steps' checks
@dg.asset(group_name=GROUP, code_version=code_hash("filter"), automation_condition=AFTER_BLOCKING_CHECKS,
          deps=[tokenized_preferences], retry_policy=NETWORK_RETRY, kinds={"parquet"},
          description="filter: token ids -> length-filtered ids, every dropped pair counted by reason; "
                      "token-length histogram (data/filtered).")
@retried_only_when_transient("filter")
def filtered_preferences(context: dg.AssetExecutionContext, config: FilterConfig, project: ProjectResource,
                         hub: HubResource, dvc: DvcResource) -> dg.MaterializeResult:
    params, layout = _settings(context, "filter", config, project, hub=hub)
    _recordable(dvc, project, "filter", layout)
    result = _run_step(context, "filter", params, layout)
    recorded, version = _record_in_dvc(context, dvc, project, "filter", params, result.content_hash)
    reasons = sorted({r for split in SPLITS for r in result.dropped[split]})
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(result.kept.values()),
            "policy": result.policy,
            "max_token_length": params.filter.max_token_length,
            "max_prompt_token_length": _text(params.filter.max_prompt_token_length),
            "kept_train": result.kept["train"],
            "kept_test": result.kept["test"],
            "dropped": sum(sum(d.values()) for d in result.dropped.values()),
            "truncated": sum(result.truncated.values()),
            "dropped_by_reason": dg.MetadataValue.json(result.dropped),
            "dropped_table": _table(["reason", *SPLITS],
                                       [[r, *(result.dropped[s].get(r, 0) for s in SPLITS)] for r in reasons]
                                       or [["(none)", 0, 0]]),
            "token_lengths": _image(layout.filtered / "lengths.png", "Token lengths before filtering"),
            "token_lengths_png": dg.MetadataValue.path(str(layout.filtered / "lengths.png")),
            "content_hash": result.content_hash,
            "path": dg.MetadataValue.path(str(layout.filtered)),
            **recorded,
        },
        data_version=version,
    )


@dg.asset(group_name=GROUP, code_version=code_hash("train"), automation_condition=AFTER_BLOCKING_CHECKS,
          deps=[filtered_preferences], pool="gpu", retry_policy=NETWORK_RETRY, kinds={"pytorch"},
          description="train: filtered pairs -> a one-output reward model (models/reward_model); metrics, "
                      "loss curve and summary in data/train. Runs in the `gpu` pool.")
@retried_only_when_transient("train")
def reward_model(context: dg.AssetExecutionContext, config: TrainConfig, project: ProjectResource,
                 wandb: WandbResource, hub: HubResource, dvc: DvcResource,
                 trainer: TrainLauncherResource) -> dg.MaterializeResult:
    try:
        wandb_overrides = wandb.overrides()
    except SettingsError as exc:
        raise mistake("train", exc) from exc
    params, layout = _settings(context, "train", config, project, wandb_overrides, hub=hub)
    _recordable(dvc, project, "train", layout)
    with hub.credentials():  # the weights of a gated Hub model; a launched process inherits them
        if trainer.separate_process:
            result = _train_in_own_process(context, trainer, project,
                                           [*project.overrides, *wandb_overrides, *config.overrides()])
        else:
            result = _run_step(context, "train", params, layout)
    summary = _read_json(layout.train_logs / "summary.json")
    fingerprint = summary.get("fingerprint")
    losses = quality.logged_losses(layout)
    # the model is what downstream reads: checkpoints and logs do not change its version
    recorded, version = _record_in_dvc(context, dvc, project, "train", params, fingerprint)
    # a run that had finished already (the weekly schedule on unchanged data) trained nothing now: its
    # figures are those of the run that trained, and it resumed nothing
    reused = summary.get("reused") is True or result.reused
    return dg.MaterializeResult(
        metadata={
            "base_model": params.model.name_or_path,
            "steps": result.steps,
            "reused": dg.MetadataValue.bool(reused),
            "resumed_from_step": _text(None if reused else result.resumed_from),
            "final_loss": _number(result.final_loss),
            "last_logged_loss": _number(losses[-1] if losses else None),
            "final_batch_accuracy": _number(result.final_accuracy),
            "tokens_per_s": _number(result.tokens_per_s),
            "wall_s": _number(result.wall_s),
            "reward_mean": _number(result.reward_mean),
            "reward_std": _number(result.reward_std),
            "loss_curve": _image(layout.train_logs / "loss.png", "Training loss"),
            "wandb_run": _link(result.wandb_url),
            "fingerprint": _text(fingerprint),
            "data_hash": _text(summary.get("data_hash")),
            "path": dg.MetadataValue.path(str(layout.model)),
            "metrics": dg.MetadataValue.path(str(layout.train_logs / "metrics.jsonl")),
            # how the run used its device: attention, tokens per forward, layers checkpointed, predicted peak
            "device_plan": dg.MetadataValue.json(summary.get("device_plan") or {}),
            **recorded,
        },
        data_version=version,
    )


def per_subset_table(metrics: dict) -> dict:
    """Accuracy per subset as a table, where the data has subsets; none otherwise (a placeholder row,
    "(no subset column)" of 0 pairs, read as a subset of accuracy 0)."""
    rows = [[name, e["pairs"], e["accuracy"]] for name, e in metrics.get("per_subset", {}).items()]
    return {"per_subset": _table(["subset", "pairs", "accuracy"], rows)} if rows else {}


def suites_table(metrics: dict) -> dict:
    """The evaluation suites as a table, where any was scored: the rows scored and skipped, how many ask a
    prompt the model trained on ("not recorded" where the model keeps no record), and the accuracy."""
    rows = [[name, e["source"], e["layout"], e["rows"], e.get("skipped", 0),
             str((e.get(SEEN) or {}).get("rows", "not recorded")), e["accuracy"]]
            for name, e in metrics.get("suites", {}).items()]
    header = ["suite", "source", "layout", "rows", "skipped", "rows seen in training", "accuracy"]
    return {"suites": _table(header, rows)} if rows else {}


@dg.asset(group_name=GROUP, code_version=code_hash("evaluate"), automation_condition=AFTER_BLOCKING_CHECKS,
          deps=[reward_model, filtered_preferences], pool="gpu", retry_policy=NETWORK_RETRY,
          kinds={"pytorch"},
          description="evaluate: the model on the held-out pairs -> accuracy beside the length baselines, "
                      "reward distributions, accuracy per length bucket (data/evaluation).")
@retried_only_when_transient("evaluate")
def evaluation(context: dg.AssetExecutionContext, config: EvaluateConfig, project: ProjectResource,
               dvc: DvcResource) -> dg.MaterializeResult:
    params, layout = _settings(context, "evaluate", config, project)
    _recordable(dvc, project, "evaluate", layout)
    result = _run_step(context, "evaluate", params, layout)
    report = layout.evaluation / "report.json"
    recorded, version = _record_in_dvc(context, dvc, project, "evaluate", params,
                                       hashlib.sha256(report.read_bytes()).hexdigest())
    return dg.MaterializeResult(metadata={**evaluation_metadata(result.metrics, layout), **recorded},
                                data_version=version)


def evaluation_metadata(m: dict, layout: Layout) -> dict:
    """What the UI shows of an evaluation (`m`: its report), from Dagster's run or from a `dvc repro`'s
    report (dvc_lock_changed): the accuracy series under Plots continues across both."""
    baseline = quality.length_baseline(m)
    report = layout.evaluation / "report.json"
    return {
        "dagster/row_count": m["pairs"],
        "accuracy": _number(m["accuracy"]),
        "length_baseline": _number(baseline),
        "accuracy_minus_length_baseline": _number(m["accuracy"] - baseline),
        "longer_wins_baseline": _number(m["longer_wins_baseline"]),
        "shorter_wins_baseline": _number(m["shorter_wins_baseline"]),
        "tie_rate": _number(m["tie_rate"]),
        "loss": _number(m["loss"]),
        "summary": dg.MetadataValue.md(
            f"accuracy **{m['accuracy']:.4f}** vs length baseline {baseline:.4f} "
            f"(longer wins {m['longer_wins_baseline']:.4f}, shorter wins {m['shorter_wins_baseline']:.4f}) "
            f"on {m['pairs']} held-out pairs"),
        "reward_chosen_mean": _number(m["reward_chosen_mean"]),
        "reward_chosen_std": _number(m["reward_chosen_std"]),
        "reward_rejected_mean": _number(m["reward_rejected_mean"]),
        "reward_rejected_std": _number(m["reward_rejected_std"]),
        "reward_margin_mean": _number(m["reward_margin_mean"]),
        "prefers_longer": _number(m["prefers_longer"]),
        "reward_length_correlation": _number(m["reward_length_correlation"]),
        "calibration_ece": _number(m["calibration_ece"]),
        "reward_vs_length": _image(layout.evaluation / "reward_vs_length.png", "Reward against length"),
        "reward_distributions": _image(layout.evaluation / "rewards.png", "Reward distributions"),
        "accuracy_by_length": _image(layout.evaluation / "accuracy_by_length.png", "Accuracy by length"),
        "per_length_bucket": _table(["tokens", "pairs", "accuracy", "longer wins", "shorter wins"],
                                    [[b["range"], b["pairs"], b["accuracy"], b["longer_wins"],
                                      b.get("shorter_wins", 0.0)] for b in m["per_length_bucket"]]),
        **per_subset_table(m),
        **suites_table(m),
        "data": ("demo data: synthetic film reviews with 10% of the labels flipped; the accuracy says the "
                 "pipeline learns, not how good a reward model is") if m.get("demo_data")
        else _text(m.get("data_source")),
        "data_hash": _text(m.get("data_hash")),
        "report": dg.MetadataValue.path(str(report)),
    }


def hub_metadata(result, configured: Optional[str]) -> dict:
    """Where the release went, as the Hub names it: a bare push.repo_id lands in the token owner's
    namespace, so the repository is the full id the upload returned (the one the card names), with
    the commit, whether the push made it (`new_revision`) and the tag it gave it (or why it could not);
    not uploaded, the repo_id that is set, and whether the release gate refused what a dry run wrote.
    Either way, whether the release was forced past a failed gate."""
    if not result.uploaded:
        said = "not uploaded (no push.repo_id, or push.dry_run)" + (
            "; the release gate refused this model: the release's card says so" if result.refused else "")
        return {"uploaded": False, "hub_url": dg.MetadataValue.text(said), "refused_by_release_gate": result.refused,
                "forced_past_release_gate": result.forced, "repo_id": _text(configured), "commit": "none",
                "hub_tag": "none"}
    return {"uploaded": True, "hub_url": dg.MetadataValue.url(result.url), "repo_id": _text(result.repo_id),
            "forced_past_release_gate": result.forced,
            "commit": _text(result.commit), "new_revision": result.new_revision,
            "hub_tag": _text(result.tag) if result.tag else dg.MetadataValue.text(
                f"none: the revision is published, but it could not be tagged ({printable(result.tag_error or '')})")}


@dg.asset(group_name=GROUP, code_version=code_hash("push"), automation_condition=AFTER_BLOCKING_CHECKS,
          deps=[evaluation, reward_model], retry_policy=NETWORK_RETRY,
          kinds={"huggingface"},
          description="push: model + model card -> data/release, uploaded to the Hub when push.repo_id is set "
                      "(and push.dry_run is false). Runs only when the blocking release gate on `evaluation` "
                      "passes; the push step applies the same gate itself, so a lone materialization of a "
                      "model that fails it is refused (under push.force it is released, under push.dry_run "
                      "written, the card saying the gate failed).")
@retried_only_when_transient("push")
def hub_release(context: dg.AssetExecutionContext, config: PushConfig, project: ProjectResource,
                hub: HubResource, dvc: DvcResource) -> dg.MaterializeResult:
    params, layout = _settings(context, "push", config, project)
    _recordable(dvc, project, "push", layout)
    with hub.credentials():
        result = _run_step(context, "push", params, layout)
    recorded, version = _record_in_dvc(context, dvc, project, "push", params, result.commit)
    released = _read_json(layout.release / "evaluation.json")
    return dg.MaterializeResult(
        metadata={
            **hub_metadata(result, params.push.repo_id),
            "accuracy": _number(released.get("accuracy")),
            "files": len(result.files),
            "file_list": dg.MetadataValue.md("\n".join(f"- `{f}`" for f in result.files)),
            "path": dg.MetadataValue.path(str(result.release_dir)),
            **recorded,
        },
        data_version=version,
    )


ASSETS = [raw_preferences, tokenized_preferences, filtered_preferences, reward_model, evaluation, hub_release]
STEP_OF_ASSET = {"raw_preferences": "download", "tokenized_preferences": "tokenize", "filtered_preferences": "filter",
                 "reward_model": "train", "evaluation": "evaluate", "hub_release": "push"}

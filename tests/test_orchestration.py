"""Dagster orchestration: the definitions load, every asset materializes in-process on a tiny run,
every check passes and fails when it should, the schedule and the sensor request runs.

Offline: HF_HUB_OFFLINE=1 and WANDB_MODE=disabled; the model is the packaged all-MiniLM-L6-v2.
"""
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pydantic
import pytest
import torch
from dagster._core.errors import DagsterExecutionInterruptedError

from orchestration import assets, checks, definitions, sensors
from orchestration.definitions import defs
from orchestration.launcher import TrainLauncherResource
from orchestration.resources import DvcResource, HubResource, ProjectResource, WandbResource
from rm_lib.errors import SettingsError
from rm_lib.layout import Layout
from rm_lib.settings import load_params

from helpers import offline_env, run_steps, set_offline, tiny_params

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
TINY = ["filter.max_token_length=64", "filter.max_prompt_token_length=48", "train.max_steps=2",
        "train.batch_size=4", "train.logging_steps=1", "train.save_steps=1"]
KEYS = ["raw_preferences", "tokenized_preferences", "filtered_preferences", "reward_model", "evaluation",
        "hub_release"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    set_offline(monkeypatch)


def project(root, overrides=(), params_file=PARAMS) -> ProjectResource:
    return ProjectResource(root=str(root), params_file=str(params_file), overrides=[*TINY, *overrides])


def resources(root, min_accuracy=0.0, trainer=None, overrides=(), **project_kw) -> dict:
    gate = [f"push.min_accuracy={min_accuracy}", "push.min_test_pairs=1", "push.compare_with_release=false"]
    return {"project": project(root, overrides=[*gate, *overrides], **project_kw), "hub": HubResource(),
            "wandb": WandbResource(project="rm-tests"),  # W&B off: WANDB_MODE=disabled
            "dvc": DvcResource(), "trainer": TrainLauncherResource(**(trainer or {}))}


def materialize(root, selection=None, run_config=None, **kw) -> dg.ExecuteInProcessResult:
    return dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=selection, resources=resources(root, **kw),
                          run_config=run_config or {}, instance=dg.DagsterInstance.ephemeral(),
                          raise_on_error=False)


def materializations(result) -> dict[str, dg.AssetMaterialization]:
    return {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}


def evaluations(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {f"{e.asset_key.to_user_string()}.{e.check_name}": e for e in result.get_asset_check_evaluations()}


# ---------------------------------------------------------------- definitions

def test_definitions_load_and_validate():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == sorted(["preference_source", *KEYS])
    assert dg.AssetKey("preference_source") in graph.get(dg.AssetKey("raw_preferences")).parent_keys
    for upstream, downstream in zip(KEYS, KEYS[1:]):  # the chain of the issue
        assert dg.AssetKey(upstream) in graph.get(dg.AssetKey(downstream)).parent_keys
    by_key = {a.key.to_user_string(): a for a in assets.ASSETS}
    assert by_key["reward_model"].op.pool == "gpu"
    # every asset whose step may reach the Hub (or W&B) retries a transient error, and only that: filter too,
    # which as a run's first step reads the base model for the later steps' checks (rm_lib.pipeline.preflight)
    for key in KEYS:
        policy = by_key[key].op.retry_policy
        assert policy is assets.NETWORK_RETRY and policy.max_retries >= 1 and policy.backoff == dg.Backoff.EXPONENTIAL
        assert by_key[key].op.compute_fn.decorated_fn.retried_only_when_transient == assets.STEP_OF_ASSET[key]
    blocking = {f"{spec.asset_key.to_user_string()}.{spec.name}": spec.blocking
                for c in checks.CHECKS for spec in c.check_specs}
    assert blocking == {"raw_preferences.pairs_well_formed": True, "raw_preferences.no_prompt_overlap": False,
                        "raw_preferences.rejects_ratio": False, "reward_model.loss_is_finite": True,
                        "evaluation.beats_length_baseline": False, "evaluation.release_gate": True,
                        "evaluation.scores_consistent": False}
    job = defs.resolve_job_def("reward_model_pipeline")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == set(KEYS)
    assert {c.node_def.name for c in checks.CHECKS} <= {node.name for node in job.nodes}  # checks run too
    assert defs.resolve_schedule_def("weekly_retraining").cron_schedule == "0 3 * * 1"
    assert defs.resolve_sensor_def("source_data_changed") is not None
    automation = defs.resolve_sensor_def("release_automation")
    assert automation.default_status == dg.DefaultSensorStatus.STOPPED  # nothing runs until a user turns it on


@pytest.mark.integration
def test_cli_loads_the_module_without_heavy_imports(tmp_path):
    """What `dagster dev -m orchestration.definitions` loads: valid, and no torch/transformers at import."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    code = ("import sys, orchestration.definitions; "
            "print(sorted(m for m in ('torch', 'transformers', 'rm_lib.steps.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for target in (["-m", "orchestration.definitions"], ["-f", "orchestration/definitions.py"]):
        cli = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", *target],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "Validation successful" in cli.stdout + cli.stderr


@pytest.mark.integration
def test_dagster_cli_takes_string_selections(tmp_path):
    """`dagster asset list/materialize --select '<string>'` parse with Dagster's selection grammar, which
    breaks when DVC's pinned parser runtime shares the environment (dagster issue #27487)."""
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    shutil.copy(PARAMS, project_dir / "params.yaml")
    env = offline_env(DAGSTER_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO),
                      RM_ROOT=str(project_dir))
    (tmp_path / "home").mkdir()
    dagster = str(Path(sys.executable).parent / "dagster")
    listed = subprocess.run([dagster, "asset", "list", "-m", "orchestration.definitions", "--select", "*"],
                            cwd=project_dir, env=env, capture_output=True, text=True, timeout=180)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert sorted(listed.stdout.split()) == sorted(KEYS)
    run = subprocess.run([dagster, "asset", "materialize", "-m", "orchestration.definitions",
                          "--select", "key:raw_preferences", "--config-json",
                          json.dumps({"ops": {"raw_preferences": {"config": {"demo_pairs": 40}}}})],
                         cwd=project_dir, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    manifest = json.loads((project_dir / "data/pairs/manifest.json").read_text())
    assert manifest["rows_read"] == 40


@pytest.mark.integration
def test_dg_project_lists_scaffolds_and_launches(tmp_path):
    """The repository is a `dg` project: `dg scaffold defs` writes into orchestration/defs and the code
    location loads it beside the pipeline; `dg list defs` and `dg launch --assets` work as documented."""
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    for name in ("pyproject.toml", "params.yaml"):
        shutil.copy(REPO / name, project_dir / name)
    for package in ("orchestration", "rm_lib"):
        shutil.copytree(REPO / package, project_dir / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "home").mkdir()
    bin_dir = str(Path(sys.executable).parent)
    env = offline_env(DAGSTER_HOME=str(tmp_path / "home"), PATH=bin_dir + os.pathsep + os.environ["PATH"],
                      RM_ROOT=str(project_dir))

    def dg_cli(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(Path(bin_dir) / "dg"), *args], cwd=project_dir, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done

    dg_cli("scaffold", "defs", "dagster.asset", "extra_asset.py")
    assert (project_dir / "orchestration/defs/extra_asset.py").is_file()
    listed = json.loads(dg_cli("list", "defs", "--json").stdout)
    by_key = {a["asset_key"]: a for a in listed["assets"]}
    assert set(by_key) == {"preference_source", *KEYS, "extra_asset"}
    condition = by_key["hub_release"]["automation_condition"]["expanded_label"]
    assert "(all_deps_blocking_checks_passed)" in condition
    assert {s["name"] for s in listed["sensors"]} == {"source_data_changed", "dvc_lock_changed", "release_automation",
                                                 "checks_after_failed_run"}
    dg_cli("launch", "--assets", "raw_preferences", "--config-json",
           json.dumps({"ops": {"raw_preferences": {"config": {"demo_pairs": 40}}}}))
    manifest = json.loads((project_dir / "data/pairs/manifest.json").read_text())
    assert manifest["rows_read"] == 40


def test_example_instance_config_limits_pools(tmp_path):
    shutil.copy(REPO / "orchestration" / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    try:
        assert instance.global_op_concurrency_default_limit == 1
    finally:
        instance.dispose()


# ---------------------------------------------------------------- the whole pipeline, in-process

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        set_offline(mp)
        root = tmp_path_factory.mktemp("project")
        # download.demo_pairs through the Launchpad's run config, the rest through the resource
        run_config = {"ops": {"raw_preferences": {"config": {"demo_pairs": 60}}}}
        result = materialize(root, run_config=run_config)
        yield root, result


@pytest.mark.integration
def test_every_asset_materializes_with_metadata(pipeline):
    root, result = pipeline
    assert result.success
    layout = Layout(root)
    mats = materializations(result)
    assert sorted(mats) == sorted(KEYS)

    raw = mats["raw_preferences"].metadata
    manifest = json.loads((layout.pairs / "manifest.json").read_text())
    assert manifest["rows_read"] == 60 and raw["rows_read"].value == 60
    assert raw["train_pairs"].value + raw["test_pairs"].value == raw["dagster/row_count"].value == 60
    assert raw["rejects_by_reason"].data == manifest["rejects_by_reason"]
    assert raw["content_hash"].text == manifest["content_hash"]
    assert mats["raw_preferences"].tags["dagster/data_version"] == manifest["content_hash"]
    # a plain folder: nothing recorded in DVC, the content hash stays the data version
    for key in KEYS:
        assert mats[key].metadata["dvc"].text.startswith("not recorded: not a DVC repository"), key

    tok = mats["tokenized_preferences"].metadata
    assert tok["template"].text and tok["tokens"].value > 0
    tok_manifest = json.loads((layout.tokenized / "manifest.json").read_text())
    assert mats["tokenized_preferences"].tags["dagster/data_version"] == tok_manifest["content_hash"]

    filt = mats["filtered_preferences"].metadata
    filt_manifest = json.loads((layout.filtered / "manifest.json").read_text())
    assert filt["kept_train"].value == filt_manifest["kept"]["train"]
    assert filt["dropped_by_reason"].data == filt_manifest["dropped_by_reason"]
    assert filt["token_lengths"].md_str.startswith("![") and "data:image/png;base64," in filt["token_lengths"].md_str
    assert mats["filtered_preferences"].tags["dagster/data_version"] == filt_manifest["content_hash"]

    model = mats["reward_model"].metadata
    summary = json.loads((layout.train_logs / "summary.json").read_text())
    assert model["steps"].value == summary["steps"] == 2 and model["reused"].value is False
    assert math.isclose(model["final_loss"].value, summary["final_loss"])
    assert "data:image/png;base64," in model["loss_curve"].md_str
    assert "not logged" in model["wandb_run"].text and (layout.model / "config.json").exists()
    assert summary["train"]["wandb_project"] == "rm-tests"  # the W&B resource reached the step
    assert model["device_plan"].data == summary["device_plan"] and model["device_plan"].data["why"] == "on a CPU"

    ev = mats["evaluation"].metadata
    report = json.loads((layout.evaluation / "report.json").read_text())
    assert math.isclose(ev["accuracy"].value, report["accuracy"])
    assert math.isclose(ev["length_baseline"].value,
                        max(report["longer_wins_baseline"], report["shorter_wins_baseline"]))
    assert "data:image/png;base64," in ev["reward_distributions"].md_str
    assert "data:image/png;base64," in ev["reward_vs_length"].md_str
    for key in ("prefers_longer", "reward_length_correlation", "calibration_ece"):  # length dependence, calibration
        assert math.isclose(ev[key].value, report[key]), key
    buckets = ev["per_length_bucket"]
    assert [c.name for c in buckets.schema.columns] == ["tokens", "pairs", "accuracy", "longer wins", "shorter wins"]
    assert [c.type for c in buckets.schema.columns][1:3] == ["int", "float"] and len(buckets.records) >= 1

    rel = mats["hub_release"].metadata
    assert rel["uploaded"].value is False and rel["files"].value > 0
    assert (layout.release / "evaluation.json").exists() and (layout.release / "README.md").exists()

    evals = evaluations(result)
    assert set(evals) == {f"{spec.asset_key.to_user_string()}.{spec.name}"
                          for c in checks.CHECKS for spec in c.check_specs}
    for name in ("raw_preferences.pairs_well_formed", "raw_preferences.no_prompt_overlap",
                 "raw_preferences.rejects_ratio", "reward_model.loss_is_finite", "evaluation.release_gate"):
        assert evals[name].passed, (name, evals[name].description)


@pytest.mark.integration
def test_each_materialization_carries_its_step_code_as_code_version(pipeline):
    """The code version is the hash of the code the step runs: the UI marks an asset stale when it changes."""
    from rm_lib.pipeline.code_version import code_hash

    _, result = pipeline
    steps = dict(zip(KEYS, ("download", "tokenize", "filter", "train", "evaluate", "push")))
    for key, mat in materializations(result).items():
        assert mat.tags["dagster/code_version"] == code_hash(steps[key]), key


@pytest.mark.integration
def test_release_gate_blocks_hub_release_in_a_run(pipeline):
    root, first = pipeline
    assert first.success
    released = Layout(root).release / "evaluation.json"
    before = released.stat().st_mtime_ns
    accuracy = json.loads((Layout(root).evaluation / "report.json").read_text())["accuracy"]
    assert accuracy < 1.0, "this test needs a model below perfect accuracy"
    result = materialize(root, selection=dg.AssetSelection.assets("evaluation", "hub_release"),
                         min_accuracy=1.0)
    assert not result.success
    assert sorted(materializations(result)) == ["evaluation"]  # hub_release never ran
    gate = evaluations(result)["evaluation.release_gate"]
    assert not gate.passed and "below the minimum" in gate.description
    assert released.stat().st_mtime_ns == before


@pytest.mark.integration
def test_retraining_unchanged_settings_keeps_the_pipeline_going(pipeline):
    """Same settings again (the weekly schedule on unchanged data): train reuses the finished run (its
    metadata said "resumed from step 2"), and the blocking loss check still passes on the losses logged by
    the first run."""
    root, first = pipeline
    assert first.success
    result = materialize(root, selection=dg.AssetSelection.assets("reward_model"))
    assert result.success
    assert evaluations(result)["reward_model.loss_is_finite"].passed
    metadata = materializations(result)["reward_model"].metadata
    assert metadata["reused"].value is True and metadata["resumed_from_step"].text == "none"
    assert metadata["last_logged_loss"].value > 0 and metadata["steps"].value == 2


def test_checks_a_failed_run_left_unevaluated_are_judged_again_on_the_unchanged_files(tmp_path):
    """A run stopped at its first step by a settings mistake left every check it planned "Execution failed"
    on its asset's latest materialization, which it had not changed: the UI showed the release gate and
    the data checks failed for files they pass. checks_after_failed_run shows the verdict an earlier run
    gave on those files again, as it was (a gate judged by a Launchpad threshold keeps it); a check that
    never judged them runs again in checks_again while the folder is free, at most RECHECK_TRIES times;
    a check of an asset never materialized is left alone (its run would fail every check)."""
    from rm_lib.pipeline.locking import step_lock

    instance = dg.DagsterInstance.ephemeral()
    everything = [*assets.ASSETS, *checks.CHECKS]
    run = lambda selection, **kw: dg.materialize(everything, resources=resources(tmp_path),  # noqa: E731
                                                 instance=instance, raise_on_error=False, selection=selection, **kw)
    mistake = {"ops": {"raw_preferences": {"config": {"test_fraction": 2.0}}}}
    sensor = sensors.checks_after_failed_run
    tick = lambda cursor=None: sensor(dg.build_sensor_context(  # noqa: E731
        instance=instance, cursor=cursor, resources={"project": project(tmp_path)}))
    keys = [dg.AssetCheckKey(dg.AssetKey("raw_preferences"), name)
            for name in ("no_prompt_overlap", "pairs_well_formed", "rejects_ratio")]
    status = lambda: {k.name: v.status.value for k, v in  # noqa: E731
                      instance.event_log_storage.get_latest_asset_check_execution_by_key(keys).items()}
    # a first run that fails: nothing materialized, nothing to judge
    assert not run(dg.AssetSelection.assets("raw_preferences"), run_config=mistake).success
    assert sensors.left_unevaluated(instance) == {}
    assert tick().skip_reason.skip_message == "no check left unevaluated by a run"
    # judged by a threshold of its own run (its Launchpad field), then a run that fails
    judged = run(dg.AssetSelection.assets("raw_preferences"),
                 run_config={"ops": {"raw_preferences": {"config": {"max_reject_ratio": 0.0}}}})
    earlier = {e.check_name: e for e in judged.get_asset_check_evaluations()}
    assert "limit 0.0%" in earlier["rejects_ratio"].description  # params.yaml says 10%
    failed = run(dg.AssetSelection.assets("raw_preferences"), run_config=mistake)
    assert not failed.success and set(status().values()) == {"PLANNED"}  # the UI: "Execution failed"
    assert set(sensors.left_unevaluated(instance)) == set(keys)
    result = tick()
    # the earlier verdicts themselves, on the same materialization: not judged again by params.yaml's threshold
    assert not result.run_requests and {e.check_name: e for e in result.asset_events} == earlier
    assert result.skip_reason.skip_message.startswith("showed again the verdicts earlier runs gave on the same files: "
                                                      "raw_preferences.no_prompt_overlap, ")
    for event in result.asset_events:
        instance.report_runless_asset_event(event)  # as the daemon does with a tick's events
    assert set(status().values()) == {"SUCCEEDED"}
    assert sensors.left_unevaluated(instance) == {}
    # a materialization no check judged (its checks not selected), then a failed run: they run again
    assert run(dg.AssetSelection.assets("raw_preferences") - dg.AssetSelection.checks(*keys)).success
    assert not run(dg.AssetSelection.assets("raw_preferences"), run_config=mistake).success
    result = tick()
    (request,) = result.run_requests
    assert request.asset_check_keys == keys and not result.asset_events
    with step_lock(Layout(tmp_path), "train"):  # a step from the command line: wait for its end
        held = tick()
    assert not held.run_requests and json.loads(held.cursor) == {}
    assert "3 check(s) to run again once the project folder is free: train is already running" in \
        held.skip_reason.skip_message
    tries = json.loads(result.cursor)
    assert sorted(tries.values()) == [1, 1, 1] and all(k.split("@")[0] in {x.to_user_string() for x in keys}
                                                       for k in tries)
    # at most RECHECK_TRIES runs of them in a row that leave them unevaluated, for one materialization: no loop
    exhausted = json.dumps({k: sensors.RECHECK_TRIES for k in tries})
    skipped = tick(exhausted)
    assert not skipped.run_requests
    assert "left as they are after 3 runs of checks_again" in skipped.skip_reason.skip_message
    again = run(dg.AssetSelection.checks(*keys))
    assert again.success and set(status().values()) == {"SUCCEEDED"}
    assert json.loads(tick(exhausted).cursor) == {}  # nothing left: the tries are dropped
    # a later incident, on a new materialization, is tried afresh
    assert run(dg.AssetSelection.assets("raw_preferences") - dg.AssetSelection.checks(*keys)).success
    assert not run(dg.AssetSelection.assets("raw_preferences"), run_config=mistake).success
    (request,) = tick(exhausted).run_requests
    assert request.asset_check_keys == keys
    (sensor_def,) = [s for s in defs.sensors if s.name == "checks_after_failed_run"]
    assert sensor_def.default_status == dg.DefaultSensorStatus.RUNNING  # it starts no step


def test_bad_settings_fail_fast_without_retries(tmp_path):
    result = materialize(tmp_path, selection=dg.AssetSelection.assets("raw_preferences"), run_config={
        "ops": {"raw_preferences": {"config": {"test_fraction": 2.0}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "test_fraction" in failure.step_failure_data.error.message
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    # a setting of another step's section is not in this step's run config: the steps would disagree
    with pytest.raises(dg.DagsterInvalidConfigError, match="name_or_path"):
        materialize(tmp_path, selection=dg.AssetSelection.assets("raw_preferences"), run_config={
            "ops": {"raw_preferences": {"config": {"name_or_path": "other"}}}})


@pytest.mark.parametrize("asset, config, said", [
    ("reward_model", {"lr_scheduler": "cosin"}, "train.lr_scheduler"),
    # what only the model or the files named can judge (rm_lib.pipeline.preflight, as the CLI's `run`)
    ("filtered_preferences", {"max_token_length": 100_000}, "filter.max_token_length: 100000 is more than"),
    ("reward_model", {"lora": True, "lora_target_modules": ["nosuch_proj"]}, "['nosuch_proj'] match no module"),
    ("evaluation", {"suites": ["missing-suite.jsonl"]}, "evaluate.suites: file missing-suite.jsonl"),
    pytest.param("reward_model", {"mixed_precision": "fp16"}, "fp16 needs a GPU",
                 marks=pytest.mark.skipif(torch.accelerator.is_available(), reason="fp16 trains on a GPU")),
])
def test_a_mistake_in_a_later_steps_settings_stops_the_run_before_the_first_step_changes_anything(
        tmp_path, asset, config, said):
    """The CLI's `run` refuses a bad train setting before download; a Dagster run checked each step's
    settings only when that step ran, after download, tokenize and filter had replaced their outputs (a
    length past the model's, LoRA targets it lacks, a missing suite file: still, until the run's first step
    asked the model)."""
    selection = ["raw_preferences", "tokenized_preferences", "filtered_preferences", "reward_model", "evaluation"]
    result = materialize(tmp_path, selection=dg.AssetSelection.assets(*selection),
                         run_config={"ops": {asset: {"config": config}}})
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert failure.step_key == "raw_preferences" and "not run, nothing changed" in message
    assert said in message
    assert not (tmp_path / "data/pairs").exists()


def test_run_config_is_typed_and_described_from_params_yaml():
    """The Launchpad shows one typed field per setting, described by params.yaml; unset = params.yaml."""
    from orchestration.config import DownloadConfig, PushConfig, TrainConfig

    fields = TrainConfig.model_fields
    assert set(fields) == set(load_params(None).train.__dataclass_fields__)
    assert "set to log to W&B" in fields["wandb_project"].description
    assert "params.yaml's value (5e-05)" in fields["learning_rate"].description
    assert DownloadConfig(demo_pairs=60, source="x.jsonl").overrides() == ['download.source="x.jsonl"',
                                                                          "download.demo_pairs=60"]
    assert PushConfig().overrides() == []
    with pytest.raises(pydantic.ValidationError):
        TrainConfig(learning_rate="fast")
    # `auto` or a value: typed as text in the Launchpad, read back as the setting's own type
    chosen = TrainConfig(gradient_checkpointing="true", max_tokens_per_forward="4096", attention="auto")
    train = load_params(None, chosen.overrides()).train
    assert (train.gradient_checkpointing, train.max_tokens_per_forward, train.attention) == (True, 4096, "auto")


def test_launchpad_fields_describe_the_projects_params_yaml(tmp_path, monkeypatch):
    """The Launchpad's "Unset: params.yaml's value (...)" is the value the run will read: the project's
    params.yaml (RM_ROOT, else the folder Dagster starts in), not the code checkout's."""
    from orchestration.config import config_class

    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 0.001  # the project's own note\n"
                                          "  max_steps: 7\n")
    monkeypatch.setenv("RM_ROOT", str(tmp_path))
    fields = config_class("train").model_fields
    assert "params.yaml's value (0.001)" in fields["learning_rate"].description
    assert "the project's own note" in fields["learning_rate"].description
    assert "params.yaml's value (7)" in fields["max_steps"].description
    assert "set to log to W&B" in fields["wandb_project"].description  # a comment the project's file lacks
    monkeypatch.delenv("RM_ROOT")
    monkeypatch.chdir(tmp_path)
    assert "(0.001)" in config_class("train").model_fields["learning_rate"].description
    # a date YAML reads unquoted, a file YAML cannot read: the code location still loads, and the steps
    # name the mistake
    (tmp_path / "params.yaml").write_text("push:\n  commit_message: 2024-05-01\n")
    assert "(\"2024-05-01\")" in config_class("push").model_fields["commit_message"].description
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    assert "params.yaml's value (5e-05)" in config_class("train").model_fields["learning_rate"].description
    # a few hundred bytes of YAML aliases holding 9**9 values: the description printed them whole (2 GB, 25 s)
    from helpers import alias_bomb

    (tmp_path / "params.yaml").write_text(f"train:\n  max_tokens_per_forward: {alias_bomb()}\n")
    described = config_class("train").model_fields["max_tokens_per_forward"].description
    assert len(described) < 2_000 and "Unset: params.yaml's value ([[" in described
    copies = ", ".join(["*s"] * 998)  # one long text, and 998 references to it
    (tmp_path / "params.yaml").write_text(f"evaluate:\n  suites: [&s {'x' * 100_000}, {copies}]\n")
    assert len(config_class("evaluate").model_fields["suites"].description) < 2_000


def test_no_launchpad_field_is_a_setting_another_dvc_stage_depends_on():
    """A field of one asset's run config that another stage of dvc.yaml reads (evaluation's batch_size is
    a param of train) would make the run's DVC experiment say that stage changed: `dvc exp apply` then
    `dvc status` showed train changed after evaluation alone had batch_size 4. Derived from dvc.yaml."""
    from orchestration import config
    from rm_lib.pipeline.dvc_record import read_stage
    from rm_lib.settings import READ_BY_OTHER_STEPS

    classes = [config.DownloadConfig, config.TokenizeConfig, config.FilterConfig, config.TrainConfig,
               config.EvaluateConfig, config.PushConfig]
    read_by = {}  # (section, key or "" for the whole section) -> the stages whose params list it
    for stage in ("download", "tokenize", "filter", "train", "evaluate", "push"):
        for keys in read_stage(REPO, stage).params.values():
            for key in keys:
                section, _, name = key.partition(".")
                read_by.setdefault((section, name), set()).add(stage)
    for cls in classes:
        for name in cls.model_fields:
            readers = read_by.get((cls.section, ""), set()) | read_by.get((cls.section, name), set())
            assert readers <= {cls.section}, f"{cls.section}.{name} is a param of {sorted(readers)} in dvc.yaml"
    assert "batch_size" not in config.EvaluateConfig.model_fields
    shared = {(section, name) for (section, name), stages in read_by.items() if name and stages - {section}}
    assert shared == set(READ_BY_OTHER_STEPS)  # the rule rm_lib states is dvc.yaml's


def test_launchpad_text_that_looks_like_a_number_stays_text():
    """A commit message `2024`, a split named `2024`: the Launchpad passes text on quoted, and a quoted
    value stays a string (from the command line too), where it became a number the setting refused."""
    from orchestration.config import DownloadConfig, PushConfig

    for text in ("2024", "1.0", "1e3"):
        entered = PushConfig(commit_message=text).overrides() + DownloadConfig(train_split=text).overrides()
        params = load_params(None, entered)
        assert (params.push.commit_message, params.download.train_split) == (text, text)
    assert load_params(None, ['push.commit_message="2024"']).push.commit_message == "2024"
    assert load_params(None, ["push.commit_message='1e3'"]).push.commit_message == "1e3"
    assert load_params(None, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4  # unquoted: a number


def test_a_launchpad_field_of_several_kinds_takes_values_as_params_yaml_writes_them():
    """train.gradient_checkpointing (true, false or auto) and train.max_tokens_per_forward (a number or
    auto) were text fields: `true` and `4096`, as params.yaml and --set write them, were refused."""
    job = defs.resolve_job_def("reward_model_pipeline")
    for value in ({"gradient_checkpointing": True}, {"gradient_checkpointing": "auto"},
                  {"max_tokens_per_forward": 4096}, {"max_tokens_per_forward": "auto"}):
        dg.validate_run_config(job, {"ops": {"reward_model": {"config": value}}})
    from orchestration.config import TrainConfig

    entered = TrainConfig(gradient_checkpointing=True, max_tokens_per_forward=4096).overrides()
    params = load_params(None, entered)
    assert (params.train.gradient_checkpointing, params.train.max_tokens_per_forward) == (True, 4096)
    with pytest.raises(SettingsError, match="train.gradient_checkpointing"):
        load_params(None, TrainConfig(gradient_checkpointing=7).overrides())  # the settings still refuse


def test_a_setting_params_yaml_gives_is_set_to_null_through_the_project_overrides(tmp_path):
    """An empty Launchpad field is unset (params.yaml's value): null goes through the project's overrides."""
    from orchestration.config import FilterConfig

    assert FilterConfig(max_prompt_token_length=None).overrides() == []
    assert load_params(PARAMS).filter.max_prompt_token_length is not None
    params = ProjectResource(root=str(tmp_path), params_file=str(PARAMS),
                             overrides=["filter.max_prompt_token_length=null"]).load_params()
    assert params.filter.max_prompt_token_length is None


# ---------------------------------------------------------------- each check passes and fails

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def pair(i, prompt=None, chosen="good answer", rejected="bad answer") -> dict:
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return {"id": f"p{i}", "prompt": msg("user", prompt or f"prompt {i}"), "chosen": msg("assistant", chosen),
            "rejected": msg("assistant", rejected), "margin": None}


def test_pairs_well_formed_check(tmp_path):
    res = {"context": dg.build_asset_check_context(), "project": project(tmp_path)}
    assert not checks.raw_pairs_well_formed(**res).passed  # nothing written yet
    write_jsonl(tmp_path / "data/pairs/train.jsonl", [pair(1), pair(2)])
    write_jsonl(tmp_path / "data/pairs/test.jsonl", [pair(3)])
    assert checks.raw_pairs_well_formed(**res).passed
    write_jsonl(tmp_path / "data/pairs/test.jsonl", [pair(3), pair(4, chosen="  "), pair(5, chosen="same",
                                                                                       rejected="same")])
    result = checks.raw_pairs_well_formed(**res)
    assert not result.passed
    assert result.metadata["empty_side"].value == 1 and result.metadata["identical"].value == 1
    write_jsonl(tmp_path / "data/pairs/test.jsonl", [{"id": "t", "input_ids_chosen": [1, 2],
                                                      "input_ids_rejected": [1, 2], "margin": None}])
    assert not checks.raw_pairs_well_formed(**res).passed  # pretokenized, identical ids


def test_no_prompt_overlap_check(tmp_path):
    res = {"context": dg.build_asset_check_context(), "project": project(tmp_path)}
    write_jsonl(tmp_path / "data/pairs/train.jsonl", [pair(1, "shared"), pair(2)])
    write_jsonl(tmp_path / "data/pairs/test.jsonl", [pair(3)])
    assert checks.raw_no_prompt_overlap(**res).passed
    write_jsonl(tmp_path / "data/pairs/test.jsonl", [pair(3, "shared")])
    result = checks.raw_no_prompt_overlap(**res)
    assert not result.passed and result.metadata["shared_prompts"].value == 1


def rejects_ratio_in_a_run(root, overrides=(), launchpad=None) -> dg.AssetCheckEvaluation:
    """The rejects_ratio check run by Dagster (alone, or after raw_preferences with `launchpad` as its config)."""
    selection = dg.AssetSelection.checks(checks.raw_rejects_ratio)
    if launchpad is not None:
        selection = selection | dg.AssetSelection.assets("raw_preferences")
    run_config = {"ops": {"raw_preferences": {"config": launchpad}}} if launchpad is not None else {}
    result = dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=selection, run_config=run_config,
                            resources={**resources(root), "project": project(root, overrides=overrides)},
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    return evaluations(result)["raw_preferences.rejects_ratio"]


def test_rejects_ratio_check(tmp_path):
    limit = ["download.max_reject_ratio=0.1"]
    write_json(tmp_path / "data/pairs/manifest.json", {"rows_read": 100, "rejected": 5,
                                                       "rejects_by_reason": {"identical": 5}})
    assert rejects_ratio_in_a_run(tmp_path, limit).passed
    write_json(tmp_path / "data/pairs/manifest.json", {"rows_read": 100, "rejected": 40,
                                                       "rejects_by_reason": {"empty_side": 30, "identical": 10}})
    assert not rejects_ratio_in_a_run(tmp_path, limit).passed


def test_rejects_ratio_holds_the_download_settings_entered_for_raw_preferences(tmp_path):
    """A user who sets download.max_reject_ratio on raw_preferences' Launchpad gets that limit from the
    check on what that run downloaded, instead of params.yaml's 10%."""
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, [pair(i, rejected="good answer" if i < 15 else "bad answer") for i in range(60)])
    looser = rejects_ratio_in_a_run(tmp_path, launchpad={"source": str(source), "max_reject_ratio": 0.5})
    assert looser.passed and "limit 50.0%" in looser.description, looser.description
    assert looser.metadata["rejected"].value == 15 and looser.metadata["max_reject_ratio"].value == 0.5
    unset = rejects_ratio_in_a_run(tmp_path, launchpad={"source": str(source)})
    assert not unset.passed and "limit 10.0%" in unset.description
    stricter = rejects_ratio_in_a_run(tmp_path, ["download.max_reject_ratio=0.5"],
                                      launchpad={"source": str(source), "max_reject_ratio": 0.2})
    assert not stricter.passed and "limit 20.0%" in stricter.description
    assert checks.download_overrides({}) == []


def test_loss_is_finite_check(tmp_path):
    res = {"context": dg.build_asset_check_context(), "project": project(tmp_path)}
    assert not checks.model_loss_is_finite(**res).passed  # no summary
    summary = tmp_path / "data/train/run.json"
    write_json(summary, {"steps": 2, "final_loss": 0.69})
    write_jsonl(tmp_path / "data/train/metrics.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.69}])
    assert checks.model_loss_is_finite(**res).passed
    summary.write_text('{"steps": 2, "final_loss": NaN}')  # what json.dump writes for a lost loss
    assert not checks.model_loss_is_finite(**res).passed
    write_json(summary, {"steps": 2, "final_loss": 0.69})
    write_jsonl(tmp_path / "data/train/metrics.jsonl", [{"step": 1, "loss": float("inf")}])
    assert not checks.model_loss_is_finite(**res).passed


def report(accuracy, longer=0.5, shorter=0.3, data_hash="h1") -> dict:
    return {"accuracy": accuracy, "longer_wins_baseline": longer, "shorter_wins_baseline": shorter,
            "data_hash": data_hash, "pairs": 100}


def test_beats_length_baseline_check(tmp_path):
    res = {"context": dg.build_asset_check_context(), "project": project(tmp_path)}
    write_json(tmp_path / "data/evaluation/report.json", report(0.8, longer=0.5, shorter=0.3))
    assert checks.evaluation_beats_length_baseline(**res).passed
    write_json(tmp_path / "data/evaluation/report.json", report(0.6, longer=0.3, shorter=0.65))
    result = checks.evaluation_beats_length_baseline(**res)
    assert not result.passed and result.metadata["length_baseline"].value == 0.65


def release_gate_in_a_run(root, overrides=(), launchpad=None) -> dg.AssetCheckEvaluation:
    """The release_gate check run by Dagster (alone, or before hub_release with `launchpad` as its config)."""
    selection = dg.AssetSelection.checks(checks.evaluation_release_gate)
    if launchpad is not None:
        selection = selection | dg.AssetSelection.assets("hub_release")
    run_config = {"ops": {"hub_release": {"config": launchpad}}} if launchpad is not None else {}
    result = dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=selection, run_config=run_config,
                            resources={**resources(root), "project": project(root, overrides=overrides)},
                            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    return evaluations(result)["evaluation.release_gate"]


def test_release_gate_check(tmp_path):
    gate = lambda **q: release_gate_in_a_run(tmp_path, [f"push.{k}={v}" for k, v in q.items()])  # noqa: E731
    write_json(tmp_path / "data/evaluation/report.json", report(0.7))
    assert gate().passed  # default threshold 0.6, no previous release
    assert not gate(min_accuracy=0.75).passed
    write_json(tmp_path / "data/evaluation/report.json", report(0.5))
    assert not gate().passed  # below the default 0.6
    write_json(tmp_path / "data/evaluation/report.json", report(0.7))
    write_json(tmp_path / "data/release/evaluation.json", report(0.8))
    result = gate()
    assert not result.passed and "last released" in result.description
    assert gate(compare_with_release="false").passed
    write_json(tmp_path / "data/release/evaluation.json", report(0.65))
    assert gate().passed
    # on other test pairs of the same source the check says so, also when it passes
    held_out = {"source": "demo", "subset": None, "pairs": 100}
    write_json(tmp_path / "data/evaluation/report.json", {**report(0.7), "test_data": {**held_out, "hash": "a"}})
    write_json(tmp_path / "data/release/evaluation.json", {**report(0.65), "test_data": {**held_out, "hash": "b"}})
    result = gate()
    said = "measured on other test pairs (100 pairs here, 100 there, an unknown number shared)"
    assert result.passed and said in result.description
    assert result.metadata["same_test_data_as_previous"].value is False


def test_release_gate_holds_the_push_settings_entered_for_hub_release(tmp_path):
    """A user who sets push.min_accuracy on hub_release's Launchpad gets that threshold from the blocking
    check too: a stricter one stops the run before hub_release, a looser one lets hub_release's own gate
    decide, instead of params.yaml's value blocking a release the user allowed."""
    write_json(tmp_path / "data/evaluation/report.json", report(0.7))
    stricter = release_gate_in_a_run(tmp_path, launchpad={"min_accuracy": 0.75})
    assert not stricter.passed and "minimum 0.7500" in stricter.description
    looser = release_gate_in_a_run(tmp_path, ["push.min_accuracy=0.75"], launchpad={"min_accuracy": 0.65})
    assert looser.passed, looser.description
    assert not release_gate_in_a_run(tmp_path, ["push.min_accuracy=0.75"], launchpad={}).passed
    # push.force on hub_release releases the model anyway (its card says the gate failed): the check
    # warns instead of stopping the run in front of it
    forced = release_gate_in_a_run(tmp_path, ["push.min_accuracy=0.75"], launchpad={"force": True})
    assert not forced.passed and forced.severity == dg.AssetCheckSeverity.WARN
    assert "push.force=true releases it anyway" in forced.description
    # push.dry_run writes the refused release, as the CLI and dvc repro do: the check warns, hub_release runs
    dry = release_gate_in_a_run(tmp_path, ["push.min_accuracy=0.75"], launchpad={"dry_run": True})
    assert not dry.passed and dry.severity == dg.AssetCheckSeverity.WARN
    assert "push.dry_run=true writes it, saying so" in dry.description
    assert checks.push_overrides({}) == []


def test_settings_the_launchpad_takes_from_environment_variables_reach_the_checks(monkeypatch):
    """Dagster takes `{env: NAME}` for a text field; the run's config keeps it as written, and the checks
    built their settings from it: the release gate and rejects_ratio failed on a validation error."""
    monkeypatch.setenv("RM_TEST_MESSAGE", "weekly release")
    monkeypatch.setenv("RM_TEST_SOURCE", "data/sources/a.jsonl")
    run_config = {"ops": {"hub_release": {"config": {"commit_message": {"env": "RM_TEST_MESSAGE"}}},
                          "raw_preferences": {"config": {"source": {"env": "RM_TEST_SOURCE"}}}}}
    assert checks.push_overrides(run_config) == ['push.commit_message="weekly release"']
    assert checks.download_overrides(run_config) == ['download.source="data/sources/a.jsonl"']
    # a field that also takes `auto` (typed Any) gets the source as written, and the asset itself reads it
    from orchestration.config import TrainConfig

    monkeypatch.setenv("RM_TEST_CHECKPOINTING", "true")
    entered = TrainConfig(gradient_checkpointing={"env": "RM_TEST_CHECKPOINTING"}).overrides()
    assert load_params(None, entered).train.gradient_checkpointing is True
    # an unset variable is an error, as Dagster makes it for a text field, not params.yaml's value in silence
    with pytest.raises(SettingsError, match="the environment variable RM_TEST_UNSET is not set"):
        TrainConfig(max_tokens_per_forward={"env": "RM_TEST_UNSET"}).overrides()
    # ... and the checks that read it fail saying so (the release gate stops the release), not a traceback
    import types

    unset = {"ops": {"hub_release": {"config": {"commit_message": {"env": "RM_TEST_UNSET"}}}}}
    context = dg.build_asset_check_context(resources={"project": ProjectResource(root=".")})
    monkeypatch.setattr(type(context), "run", property(lambda self: types.SimpleNamespace(run_config=unset)))
    result = checks.evaluation_release_gate(context)
    assert not result.passed and "RM_TEST_UNSET is not set" in result.description


# ---------------------------------------------------------------- schedule and sensor

def test_schedule_requests_the_whole_pipeline():
    schedule = defs.resolve_schedule_def("weekly_retraining")
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance,
                                            scheduled_execution_time=datetime(2026, 1, 5, 3, tzinfo=UTC))
        data = schedule.evaluate_tick(context)
    assert len(data.run_requests) == 1
    assert schedule.job_name == "reward_model_pipeline"


def tick(root, cursor=None, overrides=(), instance=None):
    """(the run request, or the SkipReason; the new cursor). A run request comes with the observation
    of preference_source that gives it its new data version."""
    context = dg.build_sensor_context(cursor=cursor, instance=instance or dg.DagsterInstance.ephemeral(),
                                      resources={"project": project(root, overrides), "hub": HubResource()})
    result = sensors.source_data_changed(context)
    if isinstance(result, dg.SensorResult):
        [run], [seen] = result.run_requests, result.asset_events
        assert seen.asset_key == dg.AssetKey("preference_source")
        assert run.tags["rm/source_fingerprint"] == seen.tags["dagster/data_version"][:16]
        return run, context.cursor
    return result, context.cursor


def test_sensor_demo_source_triggers_once(tmp_path):
    first, cursor = tick(tmp_path)
    assert isinstance(first, dg.RunRequest) and cursor
    again, same = tick(tmp_path, cursor)
    assert isinstance(again, dg.SkipReason) and same == cursor


def _one_pair_source(tmp_path: Path) -> tuple[Path, list[str]]:
    """A local source of one pair, and the override that reads it."""
    source = tmp_path / "prefs.jsonl"
    source.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    return source, [f"download.source={source}"]


def test_sensor_local_file_source_triggers_on_change(tmp_path):
    source, overrides = _one_pair_source(tmp_path)
    first, cursor = tick(tmp_path, None, overrides)
    assert isinstance(first, dg.RunRequest)
    unchanged, _ = tick(tmp_path, cursor, overrides)
    assert isinstance(unchanged, dg.SkipReason)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # a touch
    touched, cursor = tick(tmp_path, cursor, overrides)
    assert isinstance(touched, dg.SkipReason) and "unchanged" in touched.skip_message  # the bytes decide
    source.write_text(source.read_text())  # rewritten with the same content
    assert isinstance(tick(tmp_path, cursor, overrides)[0], dg.SkipReason)
    source.write_text(source.read_text() * 2)
    changed, new_cursor = tick(tmp_path, cursor, overrides)
    assert isinstance(changed, dg.RunRequest) and new_cursor != cursor
    missing, kept = tick(tmp_path, new_cursor, [f"download.source={tmp_path / 'gone.jsonl'}"])
    assert isinstance(missing, dg.SkipReason) and kept == new_cursor


def test_a_source_change_whose_run_could_not_take_it_is_run_again(tmp_path):
    """The run the sensor requested for new data was refused (another run held the project folder): the
    next ticks wait while the folder is held, then request the run again, until raw_preferences takes the
    data, and give up after SOURCE_RUN_ATTEMPTS runs that ended without it. Before, the sensor moved on
    and never trained on the new data."""
    from dagster._core.test_utils import create_run_for_test

    source, overrides = _one_pair_source(tmp_path)

    def run_for(request, status):
        create_run_for_test(instance, job_name="reward_model_pipeline", tags=request.tags, status=status)

    with dg.instance_for_test() as instance:
        request, cursor = tick(tmp_path, None, overrides, instance)
        assert isinstance(tick(tmp_path, cursor, overrides, instance)[0], dg.SkipReason)  # not launched yet
        run_for(request, dg.DagsterRunStatus.STARTED)
        waiting, cursor = tick(tmp_path, cursor, overrides, instance)
        assert "has not ended" in waiting.skip_message
        holder = _hold_the_folder(tmp_path, "aaaaaaaa-0000-4000-8000-000000000001")
        try:
            [started] = instance.get_runs()
            instance.report_run_failed(started)  # refused by the holder
            held, cursor = tick(tmp_path, cursor, overrides, instance)
            assert "aaaaaaaa-0000-4000-8000-000000000001 is using the project folder" in held.skip_message
        finally:
            holder.kill()
            holder.wait()
        # a step run from the command line refuses every run as well: the sensor waits for it too (it asked
        # three times in ten minutes, each run refused, and gave up on the new data)
        from rm_lib.pipeline.locking import step_lock

        with step_lock(Layout(tmp_path), "train"):
            cli, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(cli, dg.SkipReason) and f"train is already running in {tmp_path.resolve()}, pid " \
            f"{os.getpid()} (from the command line or `dvc repro`)" in cli.skip_message
        with _dvc_lock_held(tmp_path):  # a `dvc repro` between two stages: no step's lock held
            between, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(between, dg.SkipReason) and "holds the DVC repository lock" in between.skip_message
        again, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(again, dg.RunRequest) and again.tags == request.tags
        run_for(again, dg.DagsterRunStatus.FAILURE)
        third, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(third, dg.RunRequest)
        run_for(third, dg.DagsterRunStatus.FAILURE)
        gave_up, cursor = tick(tmp_path, cursor, overrides, instance)
        assert "3 runs for it ended without materializing raw_preferences" in gave_up.skip_message
        later, cursor = tick(tmp_path, cursor, overrides, instance)
        # not "source unchanged": the change is still to be taken (it said so, and the UI showed it as done)
        assert isinstance(later, dg.SkipReason) and later.skip_message == gave_up.skip_message

        source.write_text(source.read_text() * 2)  # new data, taken by the run requested for it
        request, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(request, dg.RunRequest)
        run_for(request, dg.DagsterRunStatus.FAILURE)  # raw_preferences was materialized, a later step failed
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_preferences"))
        done, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(done, dg.SkipReason) and "unchanged" in done.skip_message
        assert "requested" not in json.loads(cursor)


def test_a_cancelled_run_for_a_source_change_is_not_requested_again(tmp_path):
    """A user terminated the run the sensor requested for new data: the sensor requested it again twice
    (each a whole pipeline run), as for a crash, and then said "source unchanged" of data no run took. A
    cancelled run ends the requests; the ticks say the change is not taken until raw_preferences is
    materialized, and a later change runs as any does."""
    from dagster._core.test_utils import create_run_for_test

    source, overrides = _one_pair_source(tmp_path)
    with dg.instance_for_test() as instance:
        request, cursor = tick(tmp_path, None, overrides, instance)
        run = create_run_for_test(instance, job_name="reward_model_pipeline", tags=request.tags,
                                  status=dg.DagsterRunStatus.STARTED)
        instance.report_run_canceled(run)
        stopped, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(stopped, dg.SkipReason), stopped
        assert f"but run {run.run_id} for it was cancelled: materialize raw_preferences" in stopped.skip_message
        later, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(later, dg.SkipReason) and later.skip_message == stopped.skip_message
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_preferences"))  # taken by hand
        done, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(done, dg.SkipReason) and "unchanged" in done.skip_message
        assert "requested" not in json.loads(cursor)
        source.write_text(source.read_text() * 2)
        assert isinstance(tick(tmp_path, cursor, overrides, instance)[0], dg.RunRequest)


def test_a_run_for_a_source_change_deleted_from_the_run_list_is_requested_again(tmp_path, monkeypatch):
    """The run the sensor requested for new data ended without taking it and was deleted from the run list:
    every tick after said "the run requested for it has not ended", for good. A deleted run counts as
    ended; one the daemon never created, after UNSEEN_RUN_S."""
    from dagster._core.test_utils import create_run_for_test

    from orchestration import sensors

    source, overrides = _one_pair_source(tmp_path)
    with dg.instance_for_test() as instance:
        request, cursor = tick(tmp_path, None, overrides, instance)
        run = create_run_for_test(instance, job_name="reward_model_pipeline", tags=request.tags,
                                  status=dg.DagsterRunStatus.STARTED)
        waiting, cursor = tick(tmp_path, cursor, overrides, instance)
        assert "has not ended" in waiting.skip_message
        instance.report_run_failed(run)
        instance.delete_run(run.run_id)
        again, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(again, dg.RunRequest), again
        # deleted before any tick saw it: the earlier attempt's run was seen, so none at all means deleted
        run = create_run_for_test(instance, job_name="reward_model_pipeline", tags=again.tags,
                                  status=dg.DagsterRunStatus.FAILURE)
        instance.delete_run(run.run_id)
        third, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(third, dg.RunRequest), third
        run = create_run_for_test(instance, job_name="reward_model_pipeline", tags=third.tags,
                                  status=dg.DagsterRunStatus.FAILURE)
        instance.delete_run(run.run_id)
        gave_up, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(gave_up, dg.SkipReason) and "gone from Dagster's run list (deleted)" in gave_up.skip_message

        source.write_text(source.read_text() * 2)  # a run requested and never created: waited for, not for ever
        request, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(request, dg.RunRequest)
        early, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(early, dg.SkipReason) and "has not started" in early.skip_message
        monkeypatch.setattr(sensors, "UNSEEN_RUN_S", 0)
        assert isinstance(tick(tmp_path, cursor, overrides, instance)[0], dg.RunRequest)


def test_a_source_whose_download_fails_on_its_data_is_not_run_again(tmp_path):
    """A cut-off source file failed its run at once, and the sensor asked twice more (SOURCE_RUN_ATTEMPTS),
    each run failing the same way: the run again is for runs refused or cut short, not for bad data. The
    sensor now gives up at the first such failure, saying it, and runs when the file is fixed. A run that
    found no source file (rewritten that instant) or settings that did not load, mended by the next tick,
    is requested again."""
    source = tmp_path / "prefs.jsonl"
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(20))
    source.write_text(rows + '{"prompt": "x", "chosen": ')
    overrides = [f"download.source={source}"]
    only_download = dg.Definitions(
        assets=[*assets.ASSETS], resources=resources(tmp_path, overrides=overrides),
        jobs=[dg.define_asset_job("reward_model_pipeline", selection=dg.AssetSelection.assets("raw_preferences"))])
    def run(request) -> dg.ExecuteInProcessResult:
        return only_download.resolve_job_def("reward_model_pipeline").execute_in_process(
            instance=instance, tags=request.tags, raise_on_error=False)

    with dg.instance_for_test() as instance:
        request, cursor = tick(tmp_path, None, overrides, instance)
        kept = source.read_text()
        source.unlink()  # gone while the run starts, back by the next tick
        assert not run(request).success
        source.write_text(kept)
        again, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(again, dg.RunRequest), again
        result = run(again)
        assert not result.success
        gave_up, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(gave_up, dg.SkipReason), gave_up
        assert f"but run {result.run_id} failed: download: " in gave_up.skip_message
        assert str(source) in gave_up.skip_message and gave_up.skip_message.endswith(
            ": fix it and materialize raw_preferences")
        not_again, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(not_again, dg.SkipReason) and not_again.skip_message == gave_up.skip_message
        source.write_text(rows)
        fixed, cursor = tick(tmp_path, cursor, overrides, instance)
        assert isinstance(fixed, dg.RunRequest)


def test_a_download_that_started_before_the_source_changed_does_not_take_the_change(tmp_path):
    """A run's download that began before the tick that saw the change, and ended after it, may have read
    the old data (also a run requested for an earlier change to the same data, A -> B -> A): the change's
    own run is still needed. A run started after it took it. A materialization outside a run (a `dvc repro`
    that dvc_lock_changed reported after it ended) took it only where its pairs are of the source's content
    now: a repro that read C before the source became D was taken for D's run, and D never ran."""
    from orchestration.sensors import _took_the_change
    from rm_lib.data.sources import local_fingerprint

    requested = {"tag": "abc", "at": 1000.0, "attempts": 1}
    source = tmp_path / "prefs.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n"
                              for i in range(20)))
    state = {"local": local_fingerprint(source)}
    resource = project(tmp_path, [f"download.source={source}"])

    def instance(materialized_at, started, run_id="r1", read=None):
        metadata = {"source_sha256": dg.MetadataValue.text(read)} if read else {}
        event = types.SimpleNamespace(timestamp=materialized_at, run_id=run_id,
                                      asset_materialization=dg.AssetMaterialization("raw_preferences",
                                                                                    metadata=metadata))
        record = types.SimpleNamespace(start_time=started)
        return types.SimpleNamespace(get_latest_materialization_event=lambda key: event,
                                     get_run_record_by_id=lambda run_id: record)

    def took(*args, **kwargs):
        return _took_the_change(instance(*args, **kwargs), requested, resource, state)

    assert not took(1010.0, 990.0)  # began before the change
    assert took(1010.0, 1005.0)
    assert not took(990.0, 980.0)  # before the change
    assert took(1010.0, None, run_id="")  # outside a run, by an older version: nothing to say otherwise
    run_steps(tiny_params(f"download.source={source}"), tmp_path, "download")  # the pairs of the source now
    read = json.loads((tmp_path / "data/pairs/manifest.json").read_text())["source_sha256"]
    assert read == state["local"]["sha256"]
    assert took(1010.0, None, run_id="", read=read)
    source.write_text(source.read_text() * 2)  # D, after the repro read C
    state = {"local": local_fingerprint(source)}
    assert not took(1010.0, None, run_id="", read=read)  # C's pairs: D's run is still needed
    # the pairs Dagster had when the change was seen, reported again (a Hub dataset: no hash to compare)
    requested = {**requested, "before": "v-before"}
    materialized = dg.AssetMaterialization("raw_preferences", tags={"dagster/data_version": "v-before"})
    event = types.SimpleNamespace(timestamp=1010.0, run_id="", asset_materialization=materialized)
    again = types.SimpleNamespace(get_latest_materialization_event=lambda key: event,
                                  get_run_record_by_id=lambda run_id: None)
    assert not _took_the_change(again, requested, resource, {})
    event.asset_materialization = dg.AssetMaterialization("raw_preferences", tags={"dagster/data_version": "v2"})
    assert _took_the_change(again, requested, resource, {})
    # what the report says, not data/pairs now: a run for D that wrote D's pairs and then failed is not it
    run_steps(tiny_params(f"download.source={source}"), tmp_path, "download")
    assert not took(1010.0, None, run_id="", read=read)


def test_sensor_hub_source_follows_the_commit_sha(tmp_path, monkeypatch):
    import rm_lib.data.sources

    sha = {"value": "aaa"}
    monkeypatch.setattr(rm_lib.data.sources, "hub_fingerprint", lambda name, revision: sha["value"])
    overrides = ["download.source=someone/prefs"]
    first, cursor = tick(tmp_path, None, overrides)
    assert isinstance(first, dg.RunRequest)
    assert isinstance(tick(tmp_path, cursor, overrides)[0], dg.SkipReason)
    sha["value"] = "bbb"
    assert isinstance(tick(tmp_path, cursor, overrides)[0], dg.RunRequest)
    sha["value"] = None  # offline: no change recorded
    offline, kept = tick(tmp_path, cursor, overrides)
    assert isinstance(offline, dg.SkipReason) and kept == cursor


def test_source_is_observed_by_its_content(tmp_path):
    """preference_source's data version: the bytes of the source, the same the sensor reports."""
    from dagster._core.definitions.observe import observe  # no public name in 1.13

    from orchestration.source import preference_source

    source, overrides = _one_pair_source(tmp_path)

    def observed() -> str:
        result = observe([preference_source], resources={"project": project(tmp_path, overrides),
                                                            "hub": HubResource()})
        [event] = result.get_asset_observation_events()
        return event.event_specific_data.asset_observation.data_version

    first = observed()
    run, _ = tick(tmp_path, None, overrides)
    assert run.tags["rm/source_fingerprint"] == first[:16]
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # a touch
    assert observed() == first
    source.write_text(source.read_text() * 2)
    assert observed() != first


def test_a_check_run_alone_judges_only_the_files_of_the_latest_materialization(tmp_path):
    """Dagster files a check's result under the asset's latest materialization: run alone after a train from
    the command line, loss_is_finite judged that model and showed "passed" beside the figures of the model
    Dagster had materialized."""
    chain = dg.AssetSelection.assets("raw_preferences", "tokenized_preferences", "filtered_preferences",
                                     "reward_model")
    alone = dg.AssetSelection.checks(dg.AssetCheckKey(dg.AssetKey("reward_model"), "loss_is_finite"))

    def run(selection) -> dict[str, dg.AssetCheckEvaluation]:
        result = dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=selection, resources=resources(tmp_path),
                                instance=instance, raise_on_error=False)
        return evaluations(result)

    with dg.instance_for_test() as instance:
        assert run(chain)["reward_model.loss_is_finite"].passed
        assert run(alone)["reward_model.loss_is_finite"].passed  # the same files: judged as before
        summary = tmp_path / "data/train/summary.json"
        kept = summary.read_text(encoding="utf-8")
        summary.write_text(json.dumps({**json.loads(kept), "fingerprint": "a-run-from-the-command-line"}))
        verdict = run(alone)["reward_model.loss_is_finite"]
        assert not verdict.passed and verdict.description.startswith(
            "not judged: the project holds other files for reward_model than its latest materialization")
        summary.write_text(kept, encoding="utf-8")
        assert run(alone)["reward_model.loss_is_finite"].passed


def _report(instance, key: str, check: str | None = None, passed: bool = True) -> None:
    event = (dg.AssetCheckEvaluation(asset_key=dg.AssetKey(key), check_name=check, passed=passed) if check
             else dg.AssetMaterialization(asset_key=key))
    instance.report_runless_asset_event(event)


def _requested(result) -> set[str]:
    return {r.key.to_user_string() for r in result.results if r.true_subset.size}


@pytest.mark.parametrize("condition", ["shipped", "eager only"])
def test_automated_release_waits_for_the_release_gate(condition):
    """Under release_automation, a new evaluation made outside a pipeline run (a `dvc repro` that
    dvc_lock_changed reported) releases only once its blocking release_gate passed. The same
    sequence with a plain eager condition would publish past the failed gate."""
    use = defs
    if condition == "eager only":
        specs = [spec.replace_attributes(automation_condition=dg.AutomationCondition.eager())
                 for a in assets.ASSETS for spec in a.specs]
        use = dg.Definitions(assets=specs, asset_checks=checks.CHECKS, resources={"project": project(".")})
    with dg.instance_for_test() as instance:
        for key in KEYS:
            _report(instance, key)
        for key, check in [("raw_preferences", "pairs_well_formed"), ("reward_model", "loss_is_finite"),
                           ("evaluation", "release_gate")]:
            _report(instance, key, check)
        result = dg.evaluate_automation_conditions(defs=use, instance=instance)
        assert "hub_release" not in _requested(result)  # everything up to date

        _report(instance, "evaluation")
        _report(instance, "evaluation", "release_gate", passed=False)
        result = dg.evaluate_automation_conditions(defs=use, instance=instance, cursor=result.cursor)
        if condition == "eager only":
            assert "hub_release" in _requested(result)
            return
        assert "hub_release" not in _requested(result)

        _report(instance, "evaluation")
        _report(instance, "evaluation", "release_gate", passed=True)
        result = dg.evaluate_automation_conditions(defs=use, instance=instance, cursor=result.cursor)
        assert "hub_release" in _requested(result)

        _report(instance, "evaluation")  # not checked yet: the gate runs first, the release waits
        result = dg.evaluate_automation_conditions(defs=use, instance=instance, cursor=result.cursor)
        assert "evaluation:release_gate" in _requested(result)


def _stand_in_pipeline(stop_in: dict) -> dg.Definitions:
    """The pipeline's assets and checks as Dagster sees them (keys, inputs, blocking flags, automation
    conditions) with bodies that do nothing, or raise in the asset `stop_in["step"]` names."""
    def stand_in(real):
        @dg.asset(name=real.key.path[-1], deps=list(real.asset_deps[real.key]),
                  automation_condition=next(iter(real.specs)).automation_condition)
        def body() -> None:
            if stop_in.get("step") == real.key.to_user_string():
                raise RuntimeError("stopped")
        return body

    def check(spec):
        @dg.asset_check(asset=spec.asset_key, name=spec.name, blocking=spec.blocking,
                        automation_condition=spec.automation_condition)
        def body() -> dg.AssetCheckResult:
            return dg.AssetCheckResult(passed=True)
        return body

    return dg.Definitions(assets=[stand_in(a) for a in assets.ASSETS],
                          asset_checks=[check(spec) for c in checks.CHECKS for spec in c.check_specs])


def test_automation_never_releases_with_the_last_models_evaluation():
    """A run of filter and train stopped in train (terminated, or failed), its loss_is_finite planned and
    never run: the next release_automation tick requested train and hub_release, not evaluation (Dagster
    evaluated train's check after evaluation and before hub_release), so the release was judged by the last
    model's evaluation. Now the release waits for the tick after train, and goes with its evaluation."""
    stop_in = {}
    use = _stand_in_pipeline(stop_in)

    def run(*keys: str) -> bool:
        selection = dg.AssetSelection.assets(*keys)
        job = dg.define_asset_job("part", selection=selection)
        return dg.Definitions(assets=use.assets, asset_checks=use.asset_checks, jobs=[job]).resolve_job_def(
            "part").execute_in_process(instance=instance, raise_on_error=False).success

    def tick(cursor):
        result = dg.evaluate_automation_conditions(defs=use, instance=instance, cursor=cursor)
        return {r.key.to_user_string() for r in result.results if r.true_subset.size}, result.cursor

    with dg.instance_for_test() as instance:
        assert run(*KEYS)
        requested, cursor = tick(None)
        assert requested == set()
        stop_in["step"] = "reward_model"
        assert not run("filtered_preferences", "reward_model")
        requested, cursor = tick(cursor)
        assert requested == {"reward_model", "reward_model:loss_is_finite"}, requested
        stop_in.clear()
        assert run("reward_model")
        requested, cursor = tick(cursor)
        assert {"evaluation", "evaluation:release_gate", "hub_release"} <= requested, requested


# ---------------------------------------------------------------- resources

def test_a_project_resource_with_no_settings_file_fails_the_run_writing_nothing_there(tmp_path):
    """The project resource's root named a folder without params.yaml (tests/): the run failed saying so, but
    only after claiming the folder, which left a .rm_lib/locks tree there for `git status` to show."""
    result = materialize(tmp_path, selection=["raw_preferences"], params_file=tmp_path / "params.yaml")
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert f"{tmp_path / 'params.yaml'}: no such settings file" in failure.description
    assert os.listdir(tmp_path) == []


def test_a_wandb_mode_of_no_meaning_is_refused_before_the_run_starts(tmp_path):
    """The wandb resource's mode was a string: 'bogus' was refused by train, after download, tokenize and
    filter had run (a run-wide settings check at the first step never saw it). It is an enum now: Dagster
    refuses the run config before the run exists, and the Launchpad offers the four values."""
    with pytest.raises(dg.DagsterInvalidConfigError, match="mode"):
        dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=["raw_preferences"],
                       resources={**resources(tmp_path), "wandb": WandbResource.configure_at_launch()},
                       run_config={"resources": {"wandb": {"config": {"mode": "bogus"}}}},
                       instance=dg.DagsterInstance.ephemeral())
    assert os.listdir(tmp_path) == []
    assert WandbResource(mode="offline").overrides() == ["train.wandb_mode=offline"]


def test_resources(tmp_path, monkeypatch):
    assert WandbResource(project="p", mode="offline").overrides() == ["train.wandb_project=p",
                                                                      "train.wandb_mode=offline"]
    assert WandbResource().overrides() == []
    with pytest.raises(SettingsError, match="no such settings file"):
        ProjectResource(root=str(tmp_path)).load_params()
    params = project(tmp_path, ["train.max_steps=5"]).load_params(["train.batch_size=2"])
    assert (params.train.max_steps, params.train.batch_size, params.filter.max_token_length) == (5, 2, 64)
    with HubResource(token="secret").credentials():
        assert os.environ["HF_TOKEN"] == "secret"
    assert "HF_TOKEN" not in os.environ
    assert definitions.optional_env("HF_TOKEN") is None  # an unset EnvVar would fail every run
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert isinstance(definitions.optional_env("HF_TOKEN"), dg.EnvVar)


def test_step_errors_retried_by_dagster_only_when_transient(monkeypatch):
    """The asset reads UserError.transient: a transient error goes to the RetryPolicy as it is, any other
    is a dg.Failure without retries; the step runs with rm_lib's own retries off (one retry layer)."""
    from rm_lib import network, steps
    from rm_lib.errors import DataError
    from rm_lib.publish.hub import PublishError

    tries_seen: list[int] = []

    def failing_step(step, params, layout):
        tries_seen.append(network.tries(3))
        raise error

    monkeypatch.setattr(steps, "run", failing_step)
    cases = [(PublishError("the Hub answered 503", transient=True), True),
             (DataError("could not reach the Hub", file="hf://a/b", transient=True), True),
             (PublishError("the Hub refused the token (401)"), False),
             (DataError("Hub dataset not found", file="hf://a/typo"), False)]
    for error, retried in cases:
        with pytest.raises(Exception) as raised:
            assets._run_step(None, "push", None, None)
        if retried:
            assert raised.value is error
        else:
            assert isinstance(raised.value, dg.Failure) and raised.value.allow_retries is False
    assert tries_seen == [1] * len(cases) and network.tries(3) == 3


def test_a_step_error_names_its_step_once(monkeypatch):
    """rm_lib's messages often start with their step already ("train: the loss became nan ..."): the
    asset's failure names it once, whichever way the step ran; others get it in front."""
    from rm_lib import steps
    from rm_lib.errors import TrainingDiverged

    raised_by_step: list[Exception] = []

    def failing_step(*args, **kwargs):
        raise raised_by_step[-1]

    monkeypatch.setattr(steps, "run", failing_step)
    for step in assets.STEP_OF_ASSET.values():
        for error, said in [(TrainingDiverged(f"{step}: the loss became nan at step 3"),
                             f"{step}: the loss became nan at step 3"),
                            (SettingsError("train.batch_size: must be > 0"), f"{step}: train.batch_size: must be > 0")]:
            raised_by_step.append(error)
            with pytest.raises(dg.Failure) as raised:
                assets._run_step(None, step, None, None)
            assert raised.value.description == said
            with pytest.raises(dg.Failure) as raised:
                assets.retried_only_when_transient(step)(failing_step)()
            assert raised.value.description == said
    assert assets.described("train", "training: x") == "train: training: x"


def test_an_asset_under_the_retry_policy_retries_only_a_transient_error():
    """NETWORK_RETRY retries whatever an asset raises, but a dg.Failure that forbids it: so everything in
    the asset but a transient error is such a Failure. A training that diverged, a crash, a bad setting are
    not run again; the Hub down (flagged by rm_lib, or a connection error it did not wrap) is."""
    import httpx2

    from rm_lib.errors import TrainingDiverged

    def asset_raising(error):
        def body():
            raise error
        return assets.retried_only_when_transient("train")(body)

    for error in (SettingsError("model.name_or_path: cannot load 'a/b' (503)", transient=True),
                  httpx2.ConnectError("connection refused")):
        with pytest.raises(type(error)) as raised:
            asset_raising(error)()
        assert raised.value is error
    for error in (TrainingDiverged("the loss became nan at step 3"), SettingsError("train.batch_size: must be > 0"),
                  RuntimeError("CUDA error: an illegal memory access was encountered"), KeyError("loss")):
        with pytest.raises(dg.Failure) as raised:
            asset_raising(error)()
        assert raised.value.allow_retries is False and raised.value.description.startswith("train: ")
        assert raised.value.__cause__ is error
    # an error rm_lib did not wrap (a Hub client's 401, say) is quoted without the URL's credentials, which
    # the event log and the UI would keep; a message-less one is named by its type alone
    with pytest.raises(dg.Failure) as raised:
        asset_raising(ValueError("Client error '401' for url 'https://user:s3cret@hub-proxy.corp/api/models'"))()
    assert "s3cret" not in raised.value.description and "hub-proxy.corp/api/models" in raised.value.description
    with pytest.raises(dg.Failure) as raised:
        asset_raising(KeyError())()
    assert raised.value.description.startswith("train: KeyError (not retried")
    kept = dg.Failure(description="train: the training process exited with code 1", allow_retries=False)
    with pytest.raises(dg.Failure) as raised:
        asset_raising(kept)()
    assert raised.value is kept
    # a run stopped (SIGTERM, Ctrl-C) stays stopped: Dagster retried an interrupt under the policy, and with the
    # in-process executor the stopped training resumed from its checkpoint and ran to the end
    from dagster._core.errors import DagsterExecutionInterruptedError

    for interrupt in (KeyboardInterrupt(), DagsterExecutionInterruptedError()):
        with pytest.raises(dg.Failure) as raised:
            asset_raising(interrupt)()
        assert raised.value.allow_retries is False and raised.value.description.startswith(
            "train: stopped before it ended; not run again")


def test_training_launched_as_its_own_process_is_retried_only_for_a_transient_error(tmp_path, monkeypatch):
    """The launched process tries each network call once under Dagster (every rank) and says whether its
    error is transient; the asset leaves only such an error to the RetryPolicy."""
    from orchestration import train_process
    from rm_lib import network, steps
    from rm_lib.errors import TrainingDiverged

    tries_seen: list[int] = []

    def failing_train(step, params, layout, on_log=None):
        tries_seen.append(network.tries(3))
        raise error

    monkeypatch.setattr(steps, "run", failing_train)
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", "launched")
    monkeypatch.setenv("RANK", "1")  # a rank without the Pipes connection
    error = SettingsError("model.name_or_path: cannot load 'a/b' (503)", transient=True)
    assert train_process.main(["--root", str(tmp_path), "--params", str(PARAMS)]) == 2
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT")
    assert train_process.main(["--root", str(tmp_path), "--params", str(PARAMS)]) == 2
    assert tries_seen == [1, 3]  # outside Dagster, as `python -m rm_lib train`

    trainer, res = TrainLauncherResource(separate_process=True), project(tmp_path)
    for code, messages, retried in [(2, [{"error": str(error), "transient": True}], True),
                                    (2, [{"error": str(TrainingDiverged("train: the loss became nan")),
                                          "transient": False}], False),
                                    (2, [{"error": "old message without the flag"}], False),
                                    (-9, [], False)]:
        monkeypatch.setattr(TrainLauncherResource, "launch",
                            lambda self, context, command, cwd, outcome=(code, messages, None): outcome)
        with pytest.raises(dg.Failure) as raised:
            assets._train_in_own_process(None, trainer, res, [])
        assert bool(raised.value.allow_retries) is retried and raised.value.description.startswith("train: ")
        assert not raised.value.description.startswith("train: train: ")  # said once


def test_a_launched_train_that_reuses_its_finished_run_as_it_was_succeeds(tmp_path, monkeypatch):
    """A finished run whose checkpoints are gone (a teammate's `git clone` + `dvc pull`) is reused as it was,
    summary.json untouched: the launched train said so, and the asset failed "wrote no new summary.json"."""
    set_offline(monkeypatch)
    res = project(tmp_path)
    run_steps(load_params(PARAMS, res.overrides), tmp_path, "download", "tokenize", "filter", "train")
    context = types.SimpleNamespace(log=logging.getLogger("test"))
    trainer = TrainLauncherResource(separate_process=True)
    said = {"summary": "train: already trained at step 2; reused ...", "reused": True}
    monkeypatch.setattr(TrainLauncherResource, "launch", lambda self, context, command, cwd: (0, [said], None))
    result = assets._train_in_own_process(context, trainer, res, [])
    assert result.reused and result.steps == json.loads((Layout(tmp_path).train_logs / "summary.json").read_text())[
        "steps"]
    for messages in ([], [{**said, "reused": False}]):  # said nothing, or said it trained: and wrote nothing
        monkeypatch.setattr(TrainLauncherResource, "launch",
                            lambda self, context, command, cwd, outcome=(0, messages, None): outcome)
        with pytest.raises(dg.Failure, match="the training process wrote no new"):
            assets._train_in_own_process(context, trainer, res, [])


# ---------------------------------------------------------------- training as its own process group

def _python_children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.integration
def test_training_launched_through_pipes_on_two_processes_streams_its_metrics(tmp_path):
    data = dg.AssetSelection.assets("raw_preferences", "tokenized_preferences", "filtered_preferences")
    assert materialize(tmp_path, selection=data, run_config={
        "ops": {"raw_preferences": {"config": {"demo_pairs": 60}}}}).success
    before = _python_children()
    instance = dg.DagsterInstance.ephemeral()
    trainer = {"separate_process": True, "accelerate_config": str(REPO / "configs/accelerate/cpu2.yaml")}
    result = dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=dg.AssetSelection.assets("reward_model"),
                            resources=resources(tmp_path, trainer=trainer), instance=instance, raise_on_error=False)
    assert result.success
    summary = json.loads((Layout(tmp_path).train_logs / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    # each metrics record reached the event log while the run went on, from the launched process
    streamed = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message.startswith("train step ")]
    assert [m.split(":")[0] for m in streamed] == ["train step 1", "train step 2"]
    assert "loss" in streamed[0] and "tokens_per_s" in streamed[0]
    metadata = materializations(result)["reward_model"].metadata
    assert metadata["steps"].value == 2
    assert metadata["final_loss"].value == pytest.approx(summary["final_loss"])
    assert _python_children() <= before  # no training process outlives the materialization


@pytest.mark.integration
def test_an_error_in_the_launched_training_fails_the_asset_with_its_message(tmp_path):
    data = dg.AssetSelection.assets("raw_preferences", "tokenized_preferences", "filtered_preferences")
    assert materialize(tmp_path, selection=data, run_config={
        "ops": {"raw_preferences": {"config": {"demo_pairs": 60}}}}).success
    trainer = {"separate_process": True, "num_processes": 1, "launch_args": ["--cpu"]}
    result = materialize(tmp_path, selection=dg.AssetSelection.assets("reward_model"), trainer=trainer,
                         overrides=["model.name_or_path=" + str(tmp_path / "no-such-model")])
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_failure_data.error.message.count("no such folder") == 1  # said once, not once per layer
    assert "no-such-model" in failure.step_failure_data.error.message
    # a mistake the launcher refuses: its line, not only "exited with code 2"
    result = materialize(tmp_path, selection=dg.AssetSelection.assets("reward_model"),
                         trainer={**trainer, "launch_args": ["--cpu", "--bogus-flag"]})
    said = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.message
    assert "train: the training process exited with code 2: " in said and \
        "error: unrecognized arguments: --bogus-flag" in said, said


def test_mistakes_in_the_trainer_resource_are_named_before_anything_is_launched(tmp_path):
    """A missing accelerate config, or -2 processes, were only "the training process exited with code 1"."""
    from orchestration.launcher import _why

    assert TrainLauncherResource(num_processes=-2).problem(tmp_path) == \
        "trainer.num_processes: must be 1 or more, or unset, got -2"
    assert TrainLauncherResource(accelerate_config="configs/nope.yaml").problem(tmp_path) == (
        f"trainer.accelerate_config: {tmp_path / 'configs/nope.yaml'}: no such file (a relative path is read in the "
        "project folder)")
    assert TrainLauncherResource(accelerate_config=str(REPO / "configs/accelerate/cpu2.yaml"),
                                 num_processes=2).problem(tmp_path) is None
    trailer = ["Traceback (most recent call last):", '  File "x.py", line 1', "FileNotFoundError: [Errno 2] no such "
               "file: 'nope.yaml'", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "=" * 20]
    assert _why(trailer) == "FileNotFoundError: [Errno 2] no such file: 'nope.yaml'"
    simple = ["RuntimeError: CUDA out of memory", "Traceback (most recent call last):",  # accelerate's one process
              "subprocess.CalledProcessError: Command '['python', '-m', 'x']' returned non-zero exit status 1."]
    assert _why(simple) == "RuntimeError: CUDA out of memory"
    assert _why(["train:  50%|#####| 1/2\rerror: train: out of GPU memory", "[rank1]: RuntimeError: boom"]) == \
        "RuntimeError: boom"
    assert _why(["all went well", "=" * 20]) is None




def test_a_run_stops_before_any_change_while_a_step_runs_from_the_command_line(tmp_path):
    """A scheduled run replaced data/pairs, tokenized and filtered under a `train` started from the command
    line (which takes its step's lock, not the Dagster claim): the run's train then refused, and the CLI
    train failed on its changed input. The run now stops at its first step, changing nothing."""
    from rm_lib.pipeline.locking import step_lock

    with step_lock(Layout(tmp_path), "train"):
        result = materialize(tmp_path, selection=dg.AssetSelection.assets("raw_preferences"))
    assert not result.success
    said = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.message
    assert f"train is already running in {tmp_path.resolve()}, pid {os.getpid()} (from the command line or " \
           "`dvc repro`): this run stopped before changing anything" in said
    assert not Layout(tmp_path).pairs.exists()
    assert materialize(tmp_path, selection=dg.AssetSelection.assets("raw_preferences")).success  # once it ended

def test_every_check_of_a_run_of_checks_alone_stops_while_a_step_runs_from_the_command_line(tmp_path):
    """The command-line step was looked for at a run's first claim only: in a run of checks alone, which do
    not wait for each other, the first check refused and the others judged files that step was replacing."""
    from rm_lib.pipeline.locking import step_lock

    assert materialize(tmp_path, selection=dg.AssetSelection.assets("raw_preferences")).success
    raw_checks = dg.AssetSelection.checks_for_assets(assets.raw_preferences)
    with step_lock(Layout(tmp_path), "download"):
        result = materialize(tmp_path, selection=raw_checks)
    failures = [e for e in result.all_events if e.is_step_failure]
    assert len(failures) == 3 and not result.get_asset_check_evaluations()
    assert all("download is already running" in e.step_failure_data.error.message for e in failures)
    assert materialize(tmp_path, selection=raw_checks).success  # once it ended


@pytest.mark.integration
def test_a_killed_launcher_takes_its_training_processes_with_it(tmp_path):
    """torch's elastic launcher starts each training process in a session of its own: with the launcher
    killed (SIGKILL, the out-of-memory killer), two processes trained on for another 35 s, writing
    checkpoints outside the group the asset stops and the run lock watches. They end with it."""
    import psutil

    data = dg.AssetSelection.assets("raw_preferences", "tokenized_preferences", "filtered_preferences")
    assert materialize(tmp_path, selection=data, run_config={
        "ops": {"raw_preferences": {"config": {"demo_pairs": 60}}}}).success
    trainer = TrainLauncherResource(separate_process=True, accelerate_config=str(REPO / "configs/accelerate/cpu2.yaml"))
    command = trainer.command(tmp_path, PARAMS, [*TINY, "train.max_steps=500", "train.save_steps=1"])
    launcher = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    workers = []
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "models/checkpoints").glob("step-*")) and time.time() < deadline:
            assert launcher.poll() is None, "the training ended before it could be killed"
            time.sleep(0.2)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "orchestration.train_process" in " ".join(p.cmdline())]
        assert len(workers) == 2 and all(os.getsid(p.pid) != os.getsid(launcher.pid) for p in workers)
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:  # whatever failed above, nothing trains on in the test's folder
        for p in [*workers, *psutil.Process().children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.kill()

@pytest.mark.integration
def test_stopping_a_launched_group_leaves_no_process_behind():
    import psutil

    from orchestration.launcher import stop_group

    process = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & sleep 60 & wait"], start_new_session=True)
    deadline = time.time() + 10
    while len(psutil.Process(process.pid).children()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    members = [process.pid, *(c.pid for c in psutil.Process(process.pid).children())]
    stop_group(process, timeout_s=1.0)  # bash ignores SIGTERM: SIGKILL follows
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in members)


@contextlib.contextmanager
def _dvc_lock_held(root: Path):
    """DVC's repository lock as a `dvc repro` holds it (zc.lockfile: an flock, the pid written in)."""
    import fcntl

    path = root / ".dvc" / "tmp" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(f" {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def test_a_dvc_repro_reported_by_the_sensor_shows_its_accuracy_and_loss(tmp_path):
    """After a `dvc repro`, the sensor's materializations held the DVC hash alone: the UI's latest evaluation
    showed no accuracy, and the accuracy series under Plots ended on the model before. The report's figures
    and the model's steps and loss go with them."""
    import yaml

    from orchestration.sensors import dvc_lock_changed
    from rm_lib.evaluation.metrics import pair_metrics
    from rm_lib.files import dvc_md5

    layout = Layout(tmp_path)
    metrics = pair_metrics([1.0, 0.5, 0.2, 0.9], [0.0, 0.7, 0.1, 0.3], [10, 20, 30, 5], [12, 18, 40, 9], buckets=2)
    write_json(layout.evaluation / "report.json", {**metrics, "data_source": "demo", "inputs": {}})
    write_json(layout.train_logs / "summary.json", {"steps": 12, "final_loss": 0.4375})
    (layout.model).mkdir(parents=True)
    (layout.model / "w.bin").write_text("model")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train": {"outs": [{"path": "models/reward_model", "md5": dvc_md5(layout.model)}]},
        "evaluate": {"outs": [{"path": "data/evaluation/report.json",
                               "md5": dvc_md5(layout.evaluation / "report.json")}]}}}))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance,
                                          resources={"project": ProjectResource(root=str(tmp_path))})
        events = {e.asset_key.to_user_string(): e.metadata for e in dvc_lock_changed(context).asset_events}
    assert events["evaluation"]["accuracy"].value == metrics["accuracy"] == 0.75
    assert events["evaluation"]["longer_wins_baseline"].value == metrics["longer_wins_baseline"]
    assert events["evaluation"]["dagster/row_count"].value == 4 and "per_length_bucket" in events["evaluation"]
    assert (events["reward_model"]["steps"].value, events["reward_model"]["final_loss"].value) == (12, 0.4375)
    assert events["reward_model"]["recorded_by"].value == "dvc.lock"


def test_dvc_lock_changes_made_outside_dagster_are_reported(tmp_path):
    """A `dvc repro`/`dvc pull`/`dvc checkout` outside Dagster: the sensor turns dvc.lock's outs into
    materializations with the DVC hash as data version (and the code version only where dvc.lock's
    code is the code here), once the workspace holds them: after a Dagster run with other settings
    (its DVC experiment) the workspace holds that run's outputs, and Dagster's record of them stands."""
    import hashlib

    import yaml

    from orchestration.sensors import dvc_lock_changed
    from rm_lib.files import dvc_md5
    from rm_lib.pipeline.code_version import code_hash

    code = tmp_path / "rm_lib" / "x.py"
    code.parent.mkdir()
    code.write_text("print('hi')\n")
    md5 = hashlib.md5(code.read_bytes()).hexdigest()

    def write(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        return dvc_md5(tmp_path / path.split("/w")[0]) if "/w" in path else dvc_md5(tmp_path / path)

    write("data/pairs/manifest.json", json.dumps({"source_sha256": "c" * 64}))  # the content the repro read
    pairs, report = write("data/pairs/w.jsonl", "pairs"), write("data/evaluation/report.json", "{}")

    def write_lock(model: str) -> None:
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            "download": {"deps": [{"path": "rm_lib/x.py", "md5": md5}],
                         "outs": [{"path": "data/pairs", "md5": pairs}]},
            "train": {"deps": [{"path": "rm_lib/x.py", "md5": "0" * 32}],
                      "outs": [{"path": "models/reward_model", "md5": model},
                               {"path": "models/checkpoints", "md5": "c"}]},
            # made from another model than the workspace's: not reported again with the new one
            "evaluate": {"deps": [{"path": "rm_lib/x.py", "md5": md5},
                                  {"path": "models/reward_model", "md5": "e" * 32}],
                         "outs": [{"path": "data/evaluation/report.json", "md5": report}]}}}))

    def tick(instance, cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                          resources={"project": ProjectResource(root=str(tmp_path))})
        return dvc_lock_changed(context), context.cursor

    m1 = write("models/reward_model/w.bin", "model one")
    write_lock(m1)
    with dg.instance_for_test() as instance:
        @dg.asset(name="evaluation", code_version=code_hash("evaluate"))
        def evaluated() -> dg.MaterializeResult:  # a Dagster run made this version
            return dg.MaterializeResult(data_version=dg.DataVersion(report))

        assert dg.materialize([evaluated], instance=instance).success
        # reported by hand (the UI's Report materialization): no tags; the tick failed on it
        instance.report_runless_asset_event(dg.AssetMaterialization("reward_model"))
        result, cursor = tick(instance, None)
        events = {e.asset_key.to_user_string(): e for e in result.asset_events}
        assert set(events) == {"raw_preferences", "reward_model"}  # evaluation: Dagster has that version already
        assert events["raw_preferences"].tags == {"dagster/data_version": pairs,
                                                  "dagster/code_version": code_hash("download")}
        # source_data_changed asks the report which content of the source its pairs are of
        assert events["raw_preferences"].metadata["source_sha256"].value == "c" * 64
        assert "source_sha256" not in events["reward_model"].metadata
        assert events["reward_model"].tags["dagster/data_version"] == m1  # the model, not the checkpoints
        assert events["reward_model"].tags["dagster/code_version"].startswith("dvc.lock:")  # other code made it
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        assert isinstance(tick(instance, cursor)[0], dg.SkipReason)

        m2 = write("models/reward_model/w.bin", "model two")  # a `dvc repro` trained another model
        write_lock(m2)
        # ... or a Dagster run, between its DVC commit and Dagster's record of it: not "outside Dagster"
        holder = _hold_the_folder(tmp_path, "aaaaaaaa-0000-4000-8000-000000000001")
        try:
            held, same = tick(instance, cursor)
        finally:
            holder.kill()
            holder.wait()
        assert isinstance(held, dg.SkipReason) and "aaaaaaaa-0000-4000-8000-000000000001" in held.skip_message
        assert same == cursor
        # ... or a `dvc repro` midway (DVC's lock; a step's own): its stages so far were reported, and
        # release_automation started runs into the rest of it
        from rm_lib.pipeline.locking import step_lock

        with _dvc_lock_held(tmp_path):
            midway, same = tick(instance, cursor)
        assert isinstance(midway, dg.SkipReason) and same == cursor
        assert midway.skip_message == f"a DVC command (pid {os.getpid()}) holds the DVC repository lock: dvc.lock " \
                                      "is read after it ends"
        with step_lock(Layout(tmp_path), "evaluate"):
            midway, same = tick(instance, cursor)
        assert isinstance(midway, dg.SkipReason) and "evaluate is already running" in midway.skip_message
        result, cursor = tick(instance, cursor)
        assert [e.tags["dagster/data_version"] for e in result.asset_events] == [m2]
        instance.report_runless_asset_event(result.asset_events[0])

        # a Dagster run with other settings: its model in the workspace and in Dagster, dvc.lock as it was
        experiment = write("models/reward_model/w.bin", "the experiment's model")
        instance.report_runless_asset_event(dg.AssetMaterialization("reward_model",
                                                                    tags={"dagster/data_version": experiment}))
        assert isinstance(tick(instance, cursor)[0], dg.SkipReason)
        # `dvc checkout`: dvc.lock's model is back in the workspace, and the graph follows
        write("models/reward_model/w.bin", "model two")
        result, cursor = tick(instance, cursor)
        assert [e.tags["dagster/data_version"] for e in result.asset_events] == [m2]


def test_after_a_dvc_repro_the_reported_assets_are_fresh_in_the_graph_where_dvc_is_up_to_date(tmp_path):
    """The sensor's materializations carried no inputs' versions, so the graph marked every asset a `dvc
    repro` made as having a new dependency (stale) until Dagster made it again. Where the stage was made
    from the data the workspace holds (its dvc.lock data deps match) they carry them and the graph is fresh;
    a model made from other data than the workspace's stays stale."""
    import hashlib

    import yaml
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from orchestration.definitions import defs
    from orchestration.sensors import dvc_lock_changed
    from rm_lib.files import dvc_md5

    code = tmp_path / "rm_lib" / "x.py"
    code.parent.mkdir()
    code.write_text("print('hi')\n")
    current = {"path": "rm_lib/x.py", "md5": hashlib.md5(code.read_bytes()).hexdigest()}

    def write(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        return dvc_md5(tmp_path / path)

    sources = write("data/sources/a.jsonl", "rows") and dvc_md5(tmp_path / "data/sources")
    write("data/pairs/train.jsonl", "pairs")
    tokenized = write("data/tokenized/t.parquet", "ids") and dvc_md5(tmp_path / "data/tokenized")
    filtered = write("data/filtered/train.parquet", "kept")
    model = write("models/reward_model/w.bin", "weights") and dvc_md5(tmp_path / "models/reward_model")
    report = write("data/evaluation/report.json", "{}")
    release = write("data/release/README.md", "card") and dvc_md5(tmp_path / "data/release")

    def write_lock(train_read: str, code: dict = current) -> None:
        def stage(deps: dict, outs: dict) -> dict:
            return {"deps": [code, *({"path": p, "md5": m} for p, m in deps.items())],
                    "outs": [{"path": p, "md5": m} for p, m in outs.items()]}

        pairs = dvc_md5(tmp_path / "data/pairs")
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            "download": stage({"data/sources": sources}, {"data/pairs": pairs}),
            "tokenize": stage({"data/pairs": pairs}, {"data/tokenized": tokenized}),
            "filter": stage({"data/tokenized": tokenized}, {"data/filtered/train.parquet": filtered}),
            "train": stage({"data/filtered/train.parquet": train_read}, {"models/reward_model": model}),
            "evaluate": stage({"models/reward_model": model}, {"data/evaluation/report.json": report}),
            "push": stage({"data/evaluation/report.json": report}, {"data/release": release})}}))

    def statuses(instance) -> dict[str, str]:
        resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
        return {k: resolver.get_status(dg.AssetKey(k)).value
                for k in ("raw_preferences", "tokenized_preferences", "filtered_preferences", "reward_model")}

    def tick(instance) -> list[str]:
        context = dg.build_sensor_context(instance=instance, resources={"project": ProjectResource(root=str(tmp_path))})
        result = dvc_lock_changed(context)
        events = result.asset_events if isinstance(result, dg.SensorResult) else []
        for event in events:
            instance.report_runless_asset_event(event)
        return [event.asset_key.to_user_string() for event in events]

    # which revision of the source DVC's download read is not known here: raw_preferences keeps a new
    # dependency on preference_source; every later step read its input's dvc.lock version
    write_lock(train_read=filtered)
    fresh = {"raw_preferences": "STALE", "tokenized_preferences": "FRESH", "filtered_preferences": "FRESH",
             "reward_model": "FRESH"}
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetObservation("preference_source",
                                                                tags={"dagster/data_version": "source-v1"}))
        tick(instance)
        assert statuses(instance) == fresh
    # an upgrade's `dvc repro`: the pairs get a new version (a field new to the manifest), the tokens and all
    # after them come out the same. Reported alone, the pairs made release_automation run tokenize and
    # everything after it again; reported with them, each step took its updated input
    CHAIN = ["raw_preferences", "tokenized_preferences", "filtered_preferences", "reward_model", "evaluation",
             "hub_release"]

    def automation(instance, cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        return [r.key.to_user_string() for r in result.results
                if isinstance(r.key, dg.AssetKey) and r.true_subset.size], result.cursor

    with dg.instance_for_test() as instance:
        assert tick(instance) == CHAIN
        requested, cursor = automation(instance, None)
        assert requested == []
        write("data/pairs/manifest.json", '{"source_sha256": null}')
        write_lock(train_read=filtered)
        assert tick(instance) == CHAIN
        requested, cursor = automation(instance, cursor)
        assert requested == [], requested
        assert tick(instance) == []  # reported so already
        # code edited since (dvc.lock's code deps are not the files here): no new version, nothing reported
        write_lock(train_read=filtered, code={**current, "md5": "0" * 32})
        assert tick(instance) == []
    # reported while dvc.lock's code was other than the files here, then `dvc repro` with these makes the
    # same outputs: reported again with the code here (the graph kept them stale: a new code version)
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetObservation("preference_source",
                                                                tags={"dagster/data_version": "source-v1"}))
        assert tick(instance) == CHAIN
        requested, cursor = automation(instance, None)
        assert statuses(instance)["tokenized_preferences"] == "STALE"
        write_lock(train_read=filtered)
        assert tick(instance) == CHAIN
        assert statuses(instance) == fresh
        assert automation(instance, cursor)[0] == []
    # a `dvc repro download`, a tick, then `dvc repro` of the rest making the same tokens: the tick after it
    # gives the later steps the pairs they were made from (they stayed stale for good, and a late automation
    # evaluation ran the chain)
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetObservation("preference_source",
                                                                tags={"dagster/data_version": "source-v1"}))
        write_lock(train_read=filtered)
        assert tick(instance) == CHAIN
        write("data/pairs/manifest.json", '{"source_sha256": "new"}')
        lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
        lock["stages"]["download"]["outs"][0]["md5"] = dvc_md5(tmp_path / "data/pairs")
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
        assert tick(instance) == ["raw_preferences"]  # tokenize was made from the pairs before: not claimed
        write_lock(train_read=filtered)
        assert tick(instance) == CHAIN[1:]
        assert statuses(instance) == fresh
        assert tick(instance) == []
    # a model dvc.lock says was trained from other filtered pairs than the workspace holds: not fresh
    write_lock(train_read="0" * 32)
    with dg.instance_for_test() as instance:
        tick(instance)
        assert statuses(instance) == {**fresh, "reward_model": "STALE"}
    # the workspace's filtered pairs are not dvc.lock's filter outputs (Dagster made others, which it
    # recorded): the model read those, not dvc.lock's filter version, so its input is not claimed
    write_lock(train_read=filtered)
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    lock["stages"]["filter"]["outs"][0]["md5"] = "f" * 32
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "filtered_preferences", tags={"dagster/data_version": "made-by-dagster"}))
        tick(instance)
        assert statuses(instance)["reward_model"] == "STALE"


def test_sensors_skip_naming_the_file_when_dvc_lock_or_params_yaml_cannot_be_read(tmp_path):
    """A merge conflict left in dvc.lock made every dvc_lock_changed tick a ScannerError naming no file, and a
    params.yaml that cannot be read made source_data_changed's ticks errors; each now skips saying why."""
    from orchestration.sensors import dvc_lock_changed

    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n<<<<<<< HEAD\n  train:\n    outs: []\n=======\n"
                                       "  train:\n    outs: [x]\n>>>>>>> other\n")
    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                      resources={"project": ProjectResource(root=str(tmp_path))})
    skipped = dvc_lock_changed(context)
    assert isinstance(skipped, dg.SkipReason)
    assert skipped.skip_message.startswith(f"{tmp_path / 'dvc.lock'}: not valid YAML at line ")
    assert "(a merge conflict left in it)" in skipped.skip_message
    # push's card reads dvc.lock too: one line naming it, not a bare ScannerError
    from rm_lib.errors import UserError
    from rm_lib.publish import model_card

    with pytest.raises(UserError, match=r"dvc.lock: not valid YAML at line \d+ \(a merge conflict left in it\)"):
        model_card.dvc_hashes(tmp_path, ("models/reward_model",))
    # a broken dvc.yaml while a step records itself: the record's own error (the step ran, its outputs replaced)
    from rm_lib.pipeline import dvc_record

    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages:\n  train: [unclosed\n")
    with pytest.raises(dvc_record.RecordError, match=r"DVC cannot read stage 'train'.*dvc.yaml: not valid YAML"):
        dvc_record.record(tmp_path, "train", load_params(None))
    bad = tmp_path / "params.yaml"
    bad.write_text("download: [unclosed\n")
    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources={
        "project": ProjectResource(root=str(tmp_path), params_file=str(bad)), "hub": HubResource()})
    skipped = sensors.source_data_changed(context)
    assert isinstance(skipped, dg.SkipReason) and "settings not readable now" in skipped.skip_message
    assert "params.yaml" in skipped.skip_message
    # a source URL with a password: the tick (kept in the UI's history) never shows it, whether read as a
    # file or as a Hub name
    bad.write_text("download:\n  demo_pairs: 60\n")
    for source in ("https://user:s3cr3t@example.com/prefs.jsonl", "https://user:s3cr3t@example.com/prefs"):
        context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources={
            "project": ProjectResource(root=str(tmp_path), overrides=[f"download.source={source}"]),
            "hub": HubResource()})
        skipped = sensors.source_data_changed(context)
        assert isinstance(skipped, dg.SkipReason), skipped
        assert "s3cr3t" not in skipped.skip_message and "example.com/prefs" in skipped.skip_message


HOLD_THE_FOLDER = """
import sys, time, types
from pathlib import Path
import dagster as dg
from orchestration.run_lock import claim_project
run = dg.DagsterRun(job_name="reward_model_pipeline", run_id=sys.argv[2])
claim_project(types.SimpleNamespace(run=run, instance=None), Path(sys.argv[1]))
print("claimed", flush=True)
time.sleep(300)
"""


def _hold_the_folder(root: Path, run_id: str) -> subprocess.Popen:
    """A step of run `run_id` in another process (a `dagster job execute` started first), still running."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_FOLDER, str(root), run_id], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "claimed"
    return holder


def _claim(root: Path, run_id: str, instance=None) -> None:
    from orchestration.run_lock import claim_project

    run = dg.DagsterRun(job_name="reward_model_pipeline", run_id=run_id)
    claim_project(types.SimpleNamespace(run=run, instance=instance), root)


def test_a_second_run_in_the_project_folder_stops_before_changing_anything(tmp_path):
    """Two `dagster job execute` 25 s apart (the daemon's queue orders only the runs it launches): run A's
    evaluation scored run B's model and released it. Now run A holds the folder from its first step until
    it has ended, and every asset and check of run B stops at once, naming A, before any change. A run
    killed midway holds nothing once its processes are gone, nor one that Dagster records as ended."""
    first, second = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
    holder = _hold_the_folder(tmp_path, first)
    try:
        for key in KEYS:
            result = materialize(tmp_path, selection=dg.AssetSelection.assets(key))
            [failure] = [e for e in result.all_events if e.is_step_failure]
            said = failure.step_failure_data.error.message
            assert f"another Dagster run, {first}, is using the project folder {tmp_path}" in said, (key, said)
        result = materialize(tmp_path, selection=dg.AssetSelection.all_asset_checks())
        refused = [e for e in result.all_events if e.is_step_failure
                   and "another Dagster run" in e.step_failure_data.error.message]
        assert len(refused) == sum(len(c.check_specs) for c in checks.CHECKS)
        assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
        _claim(tmp_path, first)  # another step of run A itself goes on
    finally:
        holder.kill()  # kill -9 midway: the kernel reaps it, nobody lets go of the claim
        holder.wait()
    _claim(tmp_path, second)
    ended = tmp_path / "ended"
    holder = _hold_the_folder(ended, first)
    try:
        with pytest.raises(dg.Failure, match="another Dagster run"):
            _claim(ended, second)
        from dagster._core.test_utils import create_run_for_test

        with dg.instance_for_test() as instance:  # run A ended; its process lingers a moment
            create_run_for_test(instance, job_name="reward_model_pipeline", run_id=first,
                                status=dg.DagsterRunStatus.SUCCESS)
            _claim(ended, second, instance)
    finally:
        holder.kill()
        holder.wait()


def test_a_training_group_whose_step_was_killed_holds_the_folder_while_it_lives(tmp_path):
    """trainer.separate_process: the group outlives a killed step process and writes the model; Dagster
    may record the run as ended then, and a second run's evaluation would score a model being written."""
    from dagster._core.test_utils import create_run_for_test

    from orchestration.run_lock import hold_group

    first, second = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
    _claim(tmp_path, first)
    group = subprocess.Popen(["sleep", "300"], start_new_session=True)  # what the launcher starts
    try:
        hold_group(types.SimpleNamespace(run=dg.DagsterRun(job_name="reward_model_pipeline", run_id=first)),
                   tmp_path, group.pid)
        with dg.instance_for_test() as instance:  # the step that claimed is gone; Dagster says the run failed
            create_run_for_test(instance, job_name="reward_model_pipeline", run_id=first,
                                status=dg.DagsterRunStatus.FAILURE)
            with pytest.raises(dg.Failure, match="another Dagster run"):
                _claim(tmp_path, second, instance)
            group.kill()
            group.wait()
            _claim(tmp_path, second, instance)
    finally:
        group.kill()
        group.wait()


def test_a_run_whose_process_was_killed_is_marked_failed_by_run_monitoring(tmp_path):
    """With the default launcher a run killed outside Dagster stayed "Started" for ever, and with one run
    at a time every later run (the schedule's too) queued behind it. The shipped launcher tells run
    monitoring once the run's processes are gone; the run is marked failed, and its slots free as below."""
    from dagster._core.events import ComputeLogsCaptureData, EngineEventData
    from dagster._core.test_utils import create_run_for_test
    from dagster._daemon.monitoring.run_monitoring import monitor_started_run

    from orchestration.run_launcher import WatchedRunLauncher, process_alive

    shutil.copy(REPO / "orchestration/dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.run_launcher, WatchedRunLauncher) and instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["poll_interval_seconds"] == 30

        def started(worker: int | None, step: int | None = None) -> dg.DagsterRun:
            run = create_run_for_test(instance, job_name="__ephemeral_asset_job__",
                                      status=dg.DagsterRunStatus.STARTED)
            if worker is not None:  # what Dagster's run worker records as it starts, and as a step starts
                instance.report_engine_event(f"Started process for run (pid: {worker}).", run,
                                             EngineEventData.in_process(worker))
            if step is not None:
                instance.report_dagster_event(dg.DagsterEvent(
                    event_type_value="LOGS_CAPTURED", job_name=run.job_name,
                    message=f"Capturing logs for process (pid: {step}).",
                    event_specific_data=ComputeLogsCaptureData(file_key="step", step_keys=["reward_model"])),
                    run.run_id)
            return run

        def monitored(run: dg.DagsterRun) -> dg.DagsterRunStatus:
            record = instance.get_run_record_by_id(run.run_id)
            monitor_started_run(instance, None, record, logging.getLogger("test"))
            return instance.get_run_by_id(run.run_id).status

        def killed(process: subprocess.Popen) -> None:
            process.kill()  # left unreaped: a zombie is gone too
            deadline = time.monotonic() + 10
            while process_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)  # the signal lands a moment later
            assert Path(f"/proc/{process.pid}").exists()

        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        worker, step = subprocess.Popen(sleeper), subprocess.Popen(sleeper)
        try:
            run, unknown = started(worker.pid, step.pid), started(None)
            assert monitored(run) == dg.DagsterRunStatus.STARTED
            killed(worker)  # the step's process goes on writing the project's files: the run still runs
            assert monitored(run) == dg.DagsterRunStatus.STARTED
            killed(step)
            assert monitored(run) == dg.DagsterRunStatus.FAILURE
        finally:
            for process in (worker, step):
                process.kill()
                process.wait()
        assert monitored(unknown) == dg.DagsterRunStatus.STARTED  # no process id recorded: nothing to judge by
        # a training launched as its own process group (TrainLauncherResource) outlives a killed step process
        group = subprocess.Popen(sleeper, start_new_session=True)
        try:
            launched = started(worker.pid)
            instance.report_engine_event(f"train: launched (process group: {group.pid}).", launched)
            assert monitored(launched) == dg.DagsterRunStatus.STARTED
        finally:
            group.kill()
            group.wait()
        assert monitored(launched) == dg.DagsterRunStatus.FAILURE
        # recorded before the machine booted: a number given out again (a process group too)
        from orchestration.run_launcher import _boot_time

        assert process_alive(os.getpid()) and process_alive(os.getpid(), time.time())
        assert not process_alive(os.getpid(), _boot_time() - 3600)
        assert not process_alive(os.getpgid(0), _boot_time() - 3600, group=True)
        assert process_alive(os.getpgid(0), time.time(), group=True)
        gone = started(worker.pid)  # reaped now: no such process
        assert monitored(gone) == dg.DagsterRunStatus.FAILURE
        messages = [e.dagster_event.message or "" for e in instance.all_logs(gone.run_id) if e.dagster_event]
        assert any(f"processes [{worker.pid}] are gone" in m for m in messages), messages


def test_a_run_that_ended_without_giving_back_its_gpu_slot_frees_it(tmp_path, monkeypatch):
    """A training run killed outside Dagster (the out-of-memory killer) keeps its "gpu" pool slot: every
    later gpu step waited for ever. With the shipped instance settings, once the run is marked ended (in
    the UI) the daemon gives the slot back within 30 s."""
    from datetime import timedelta

    from dagster._core.test_utils import create_run_for_test
    from dagster._daemon.monitoring import concurrency

    shutil.copy(REPO / "orchestration/dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        slots = instance.event_log_storage
        slots.set_concurrency_slots("gpu", 1)
        run = create_run_for_test(instance, job_name="__ephemeral_asset_job__", status=dg.DagsterRunStatus.STARTED)
        slots.claim_concurrency_slot("gpu", run.run_id, "reward_model")
        instance.report_run_failed(run)  # what terminating the dead run in the UI records
        assert slots.get_concurrency_info("gpu").active_slot_count == 1
        monkeypatch.setattr(concurrency, "get_current_datetime", lambda: datetime.now(UTC) + timedelta(seconds=31))
        list(concurrency.execute_concurrency_slots_iteration(types.SimpleNamespace(instance=instance),
                                                             logging.getLogger("test")))
        assert slots.get_concurrency_info("gpu").active_slot_count == 0


# ---------------------------------------------------------------- recording in DVC, unit by unit

class _Recorder:
    """A dvc resource that records what it was asked, or fails as DVC would."""

    def __init__(self, error: Exception | None = None):
        self.error, self.run_ids = error, []

    def record(self, root, stage, params, run_id=None, re_executes=()):
        self.run_ids.append((run_id, list(re_executes)))
        if self.error:
            raise self.error
        from rm_lib.pipeline.dvc_record import NotRecorded

        return NotRecorded("a test")


def _step_context(run_id: str, root_run_id: str | None = None, parent_run_id: str | None = None,
                  runs: tuple = ()):
    run = dg.DagsterRun(job_name="reward_model_pipeline", run_id=run_id, root_run_id=root_run_id,
                        parent_run_id=parent_run_id or root_run_id)
    known = {r.run_id: r for r in runs}
    return types.SimpleNamespace(run=run, run_id=run_id, log=logging.getLogger("test"),
                                 instance=types.SimpleNamespace(get_run_by_id=known.get))


def test_a_re_executed_step_joins_its_root_runs_dvc_experiment(tmp_path):
    """Re-execute from failure of a run with settings of its own: the re-executed hub_release records in
    the experiment that holds the earlier run's stages, not in a new one that lacks them; a stage that
    experiment recorded already starts the re-execution's own, from it. The nearest run re-executed with
    an experiment decides (Dagster gives a re-execution of a re-execution the first run as its root)."""
    from rm_lib.pipeline.dvc_record import EXPERIMENTS, experiment_of

    first, again, third = "1" * 36, "2" * 36, "3" * 36
    dvc = _Recorder()
    assets._record_in_dvc(_step_context(again, root_run_id=first), dvc, project(tmp_path), "push", None, None)
    assets._record_in_dvc(_step_context(first), dvc, project(tmp_path), "push", None, None)
    parent = dg.DagsterRun(job_name="reward_model_pipeline", run_id=again, root_run_id=first, parent_run_id=first)
    assets._record_in_dvc(_step_context(third, root_run_id=first, parent_run_id=again, runs=(parent,)), dvc,
                          project(tmp_path), "push", None, None)
    assert dvc.run_ids == [(again, [first]), (first, []), (third, [again, first])]
    assert experiment_of(tmp_path, "train", again, [first]) == (again, None)  # the root made no experiment
    state = {"params": "p", "lock": "l", "stages": ["download", "tokenize", "filter"]}
    write_json(tmp_path / EXPERIMENTS / "dagster-11111111.json", state)
    assert experiment_of(tmp_path, "train", again, [first]) == (first, state)  # from failure
    assert experiment_of(tmp_path, "filter", again, [first]) == (again, {**state, "stages": []})
    assert experiment_of(tmp_path, "filter", first) == (first, state)
    own = {**state, "stages": ["filter"]}
    write_json(tmp_path / EXPERIMENTS / "dagster-22222222.json", own)
    assert experiment_of(tmp_path, "train", again, [first]) == (again, own)
    # a re-execution (from failure) of that re-execution: its experiment, not the root's
    assert experiment_of(tmp_path, "train", third, [again, first]) == (again, own)
    assert experiment_of(tmp_path, "filter", third, [again, first]) == (third, {**own, "stages": []})
    older = {"params": "p", "lock": "l"}  # an older version's record: which stages it holds is not known
    write_json(tmp_path / EXPERIMENTS / "dagster-11111111.json", older)
    assert experiment_of(tmp_path, "train", third, [first]) == (third, {**older, "stages": []})


def test_hub_release_names_the_repository_commit_and_tag_the_hub_has(tmp_path, monkeypatch):
    """A bare push.repo_id lands in the token owner's namespace: hub_release shows `alice/tiny-bare`,
    as the card and the Hub do, with the revision and tag the push made."""
    from rm_lib import steps
    from rm_lib.steps.push import PushResult

    write_json(tmp_path / "data/release/evaluation.json", report(0.7))
    pushed = PushResult(tmp_path / "data/release", True, "https://hub/alice/tiny-bare", "a1b2c3", ["README.md"],
                        repo_id="alice/tiny-bare", tag="run-0123abcd")
    monkeypatch.setattr(steps, "run", lambda step, params, layout: pushed)
    result = materialize(tmp_path, selection=dg.AssetSelection.assets("hub_release"),
                         run_config={"ops": {"hub_release": {"config": {"repo_id": "tiny-bare"}}}})
    shown = materializations(result)["hub_release"].metadata
    assert shown["repo_id"].text == "alice/tiny-bare"  # as the card and the Hub name it
    assert (shown["commit"].text, shown["hub_tag"].text) == ("a1b2c3", "run-0123abcd")
    assert shown["hub_url"].value == "https://hub/alice/tiny-bare" and shown["uploaded"].value is True
    dry = assets.hub_metadata(PushResult(tmp_path, False, None, None, ["README.md"]), "tiny-bare")
    assert (dry["uploaded"], dry["repo_id"], dry["hub_tag"], dry["refused_by_release_gate"]) == (
        False, "tiny-bare", "none", False)
    refused = assets.hub_metadata(PushResult(tmp_path, False, None, None, ["README.md"], refused=True), None)
    assert refused["refused_by_release_gate"] is True and "the release gate refused" in refused["hub_url"].text
    assert shown["new_revision"].value is True
    again = assets.hub_metadata(PushResult(tmp_path, True, "https://hub/a/b", "a1b2c3", ["README.md"], "a/b",
                                           "run-0123abcd", new_revision=False), "a/b")
    assert again["new_revision"] is False and again["forced_past_release_gate"] is False
    forced = assets.hub_metadata(PushResult(tmp_path, True, "https://hub/a/b", "a1b2c3", ["README.md"], "a/b",
                                            "run-0123abcd", forced=True), "a/b")
    assert forced["forced_past_release_gate"] is True and dry["forced_past_release_gate"] is False
    untagged = assets.hub_metadata(PushResult(tmp_path, True, "https://hub/a/b", "a1b2c3", ["README.md"], "a/b",
                                              None, tag_error="the Hub answered 409"), "a/b")
    assert untagged["hub_tag"].text.startswith("none: the revision is published, but it could not be tagged (the Hub "
                                               "answered 409)")


def test_a_failed_dvc_record_says_the_step_replaced_its_outputs(tmp_path):
    """DVC fails after the step wrote its outputs: the failure says the workspace holds the new outputs
    while dvc.lock and Dagster name the earlier ones, and how to record them or put the old ones back."""
    from rm_lib.pipeline.dvc_record import RecordError

    dvc = _Recorder(RecordError("`dvc commit` failed: ERROR: unexpected error"))
    with pytest.raises(dg.Failure) as raised:
        assets._record_in_dvc(_step_context("1" * 36), dvc, project(tmp_path), "download", None, None)
    said = raised.value.description
    assert said.startswith("download: the step ran and replaced its outputs in the workspace")
    assert "unexpected error" in said and "still name the earlier outputs" in said
    assert "`dvc checkout dvc.yaml:download`" in said and "`dvc commit --force dvc.yaml:download`" in said
    assert raised.value.allow_retries is False


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, DagsterExecutionInterruptedError])
def test_a_run_stopped_while_dvc_records_says_the_step_had_replaced_its_outputs(tmp_path, interrupt):
    """A run stopped after training had ended, while `dvc commit` ran, said "stopped before it ended ...
    train resumes from its last checkpoint": the new model was in the workspace, and no record named it."""
    dvc = _Recorder(interrupt())
    with pytest.raises(dg.Failure) as raised:
        assets._record_in_dvc(_step_context("1" * 36), dvc, project(tmp_path), "train", None, None)
    said = raised.value.description
    assert said.startswith("train: stopped while DVC recorded the step's outputs; the step had ended and replaced "
                           "them in the workspace") and "still names the earlier outputs" in said
    assert "train reuses the run that finished" in said and "`dvc checkout dvc.yaml:train`" in said
    assert raised.value.allow_retries is False
    # the asset's own wrapper keeps it as it is, not "stopped before it ended"
    wrapped = assets.retried_only_when_transient("train")(
        lambda: assets._record_in_dvc(_step_context("1" * 36), dvc, project(tmp_path), "train", None, None))
    with pytest.raises(dg.Failure, match="stopped while DVC recorded"):
        wrapped()


def test_the_evaluation_shows_accuracy_per_subset_only_where_the_data_has_subsets():
    """Data without subsets showed a table with one row, "(no subset column)" of 0 pairs and accuracy 0.0,
    which reads as a subset the model always gets wrong."""
    assert assets.per_subset_table({"per_subset": {}}) == {} == assets.per_subset_table({})
    table = assets.per_subset_table({"per_subset": {"easy": {"pairs": 3, "accuracy": 1.0},
                                                    "hard": {"pairs": 2, "accuracy": 0.5}}})["per_subset"]
    assert [c.name for c in table.schema.columns] == ["subset", "pairs", "accuracy"]
    assert [(r.data["subset"], r.data["pairs"], r.data["accuracy"]) for r in table.records] == [
        ("easy", 3, 1.0), ("hard", 2, 0.5)]


def test_the_evaluation_shows_each_suites_skipped_rows_and_rows_seen_in_training():
    """The suites table showed rows scored and accuracy only: a suite of training pairs read as a benchmark."""
    assert assets.suites_table({}) == {}
    entry = {"source": "s.jsonl", "layout": "pairwise", "rows": 4, "skipped": 1, "accuracy": 0.75}
    table = assets.suites_table({"suites": {"seen": {**entry, "seen_in_training": {"rows": 4}}, "other": entry}})
    assert [(r.data["suite"], r.data["skipped"], r.data["rows seen in training"]) for r in table["suites"].records] \
        == [("seen", 1, "4"), ("other", 1, "not recorded")]

def test_control_characters_from_the_data_reach_dagsters_logs_escaped(tmp_path):
    """The CLI printed a column named with terminal escapes escaped; Dagster's console (`dagster dev`'s
    terminal) got them raw from the step's summary and its failure description."""
    source = tmp_path / "prefs.jsonl"
    column = "\x1b]0;PWNED\x07\x1b[32mALL CHECKS PASSED\x1b[0m"
    source.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no", column: 1}) + "\n"
                              for i in range(20)))
    missing = tmp_path / "gone\x1b[2K.jsonl"
    for where, succeeds in ((source, True), (missing, False)):
        instance = dg.DagsterInstance.ephemeral()
        result = dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=dg.AssetSelection.assets("raw_preferences"),
                                resources=resources(tmp_path / "p", overrides=[f"download.source={where}"]),
                                instance=instance, raise_on_error=False)
        assert result.success is succeeds
        shown = "\n".join(entry.user_message for entry in instance.all_logs(result.run_id))
        shown += "\n".join(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)
        assert "\x1b" not in shown and "\x07" not in shown, where
        assert ("\\x1b]0;PWNED\\x07" if succeeds else "gone\\x1b[2K.jsonl") in shown
    # a check naming a subset from the data (the subset gate) says it escaped too
    from rm_lib.evaluation.quality import Verdict

    verdict = Verdict("subset_accuracy", False, "subset 'a\x1b[2Kb' below 0.6")
    assert checks.as_check_result(verdict).description == "subset 'a\\x1b[2Kb' below 0.6"
    # a setting named with escapes (params.yaml, a resource's overrides), and a DVC failure quoting a path
    with pytest.raises(SettingsError) as unknown:
        load_params(None, ["train.nope\x1b]0;PWNED\x07=1"])
    for shown in (checks.unreadable_settings(unknown.value).description,
                  assets.record_failed("train", OSError("cannot write /tmp/a\x1b[2Kb"))):
        assert "\x1b" not in shown and "\x07" not in shown and "\\x1b" in shown


def test_a_runs_first_step_checks_the_later_steps_with_the_hubs_credentials_and_retries_a_hub_that_did_not_answer(
        tmp_path, monkeypatch):
    """A run from filter on reads the base model for train's checks at filter: a gated model needs the hub
    resource's token there, and a Hub that did not answer is retried (filter had no retry policy: the run
    failed at once with a traceback)."""
    from orchestration.config import FilterConfig

    seen = []

    def check_before(steps, params):
        seen.append((set(steps), os.environ.get("HF_TOKEN")))
        raise SettingsError("model.name_or_path: cannot load 'org/gated' (503)", transient=True)

    monkeypatch.setattr(assets, "check_before", check_before)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = dg.DagsterRun(job_name="reward_model_pipeline", run_id="3" * 36,
                        step_keys_to_execute=["filtered_preferences", "reward_model", "reward_model_loss_is_finite"])
    context = types.SimpleNamespace(run=run, run_id=run.run_id, instance=dg.DagsterInstance.ephemeral(),
                                    log=logging.getLogger("test"))
    settings = functools.partial(assets._settings, context, "filter", FilterConfig(), project(tmp_path),
                                 hub=HubResource(token="hf_gated"))
    with pytest.raises(SettingsError) as raised:  # as it is: the RetryPolicy tries again
        assets.retried_only_when_transient("filter")(settings)()
    assert raised.value.transient and seen == [({"filter", "train"}, "hf_gated")]
    assert "HF_TOKEN" not in os.environ

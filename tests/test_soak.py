"""Ten scheduled retraining runs in a row, in one Dagster instance, on a tiny model: every run
succeeds, and processes, memory and disk stay bounded. Each week brings new data (another demo seed),
so every run really trains, and the checkpoints of the previous week's run must go. The release gate
is reduced to accuracy >= 0: a tiny model trained for three steps is not better every week."""
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psutil
import pytest

from orchestration import assets, checks, sensors
from orchestration.launcher import TrainLauncherResource
from orchestration.resources import (
    DvcResource,
    HubResource,
    ProjectResource,
    WandbResource,
)
from rm_lib.files import read_json
from rm_lib.layout import Layout

from helpers import set_offline

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
RUNS = 10
TINY = ["download.demo_pairs=60", "filter.max_token_length=64", "filter.max_prompt_token_length=48",
        "train.max_steps=3", "train.batch_size=4", "train.logging_steps=1", "train.save_steps=1",
        "train.save_total_limit=2", "evaluate.batch_size=16"]


def disk_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture
def offline(monkeypatch):
    set_offline(monkeypatch)


@pytest.mark.integration
def test_ten_scheduled_retraining_runs_stay_bounded(tmp_path, tiny_decoder, offline):
    root = tmp_path / "project"
    root.mkdir()
    defs = dg.Definitions(
        assets=assets.ASSETS, asset_checks=checks.CHECKS, jobs=[sensors.pipeline_job],
        schedules=[sensors.weekly_retraining],
        resources={"project": ProjectResource(root=str(root), params_file=str(PARAMS),
                                              overrides=[f"model.name_or_path={tiny_decoder}", *TINY,
                                                         "push.min_accuracy=0", "push.min_test_pairs=1",
                                                         "push.compare_with_release=false"]),
                   "hub": HubResource(), "wandb": WandbResource(),
                   "dvc": DvcResource(), "trainer": TrainLauncherResource()})
    schedule = defs.resolve_schedule_def("weekly_retraining")
    job = defs.resolve_job_def(schedule.job_name)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    rss, disk = [], []
    monday = datetime(2026, 1, 5, 3, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        for week in range(RUNS):
            context = dg.build_schedule_context(instance=instance,
                                                scheduled_execution_time=monday + timedelta(weeks=week))
            (request,) = schedule.evaluate_tick(context).run_requests
            run_config = {"ops": {"raw_preferences": {"config": {"seed": week}}}}
            result = job.execute_in_process(run_config=run_config, instance=instance, tags=request.tags,
                                            raise_on_error=False)
            failures = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
            assert result.success, f"run {week + 1} failed: {failures}"
            summary = read_json(Layout(root).train_logs / "summary.json")
            assert summary["steps"] == 3 and summary["resumed_from"] is None  # a new week trains from the start
            rss.append(psutil.Process().memory_info().rss)
            disk.append(disk_bytes(root))
    checkpoints = sorted(p.name for p in Layout(root).checkpoints.glob("step-*"))
    assert checkpoints == ["step-2", "step-3"]  # only this week's newest two
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before
    # after the first runs have warmed every cache, neither memory nor disk keeps growing
    assert max(rss[3:]) - rss[2] < 300 * 2**20, [r // 2**20 for r in rss]
    assert max(disk[2:]) < 1.2 * disk[1], disk

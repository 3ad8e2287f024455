"""One Dagster run at a time in a project folder, however the runs were started.

The daemon's queue (`max_concurrent_runs: 1`) orders only the runs it launches: `dagster job execute`
and `dagster asset materialize` start theirs at once. Two runs in one folder interleave their steps,
and the per-step locks of rm_lib never meet: one run's evaluation scored the model the other run's
train had just written, and released it. So every step of a run (assets and checks) first claims the
folder for its run (rm_lib.pipeline.locking.claim) and stops, before any change, when another run
holds it.

A run holds the folder from its first step until it has ended: until Dagster records it finished, or
until every process that claimed for it (its step processes and, under the multiprocess executor, its
run worker) is gone, so a run killed midway (kill -9, the machine rebooted) never blocks the next one. A
training process group the run launched (trainer.separate_process) holds the folder while it lives,
even past the run's end in Dagster's records. A process runs one run at a time, so
the runs that came before in the same process (in-process runs, one after another) hold nothing.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Optional

import dagster as dg

from rm_lib.files import start_ticks
from rm_lib.layout import Layout
from rm_lib.pipeline.locking import RUN_CLAIM, claim, running_step
from rm_lib.steps import PIPELINE

from .run_launcher import process_alive

CLAIM = RUN_CLAIM  # <root>/.rm_lib/locks/dagster-run.lock: rm_lib's steps read it to name the run


def _alive(process: list) -> bool:
    pid, ticks = process
    return process_alive(pid) and (ticks is None or start_ticks(pid) == ticks)


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _this_runs_processes() -> list[list]:
    """This step's process and, for a step of the multiprocess executor, the run worker that spawned it:
    it lives between the run's steps."""
    pids = [os.getpid()]
    parent = multiprocessing.parent_process()
    # a run of the in-process executor that a code server spawned (the UI, the schedule, the sensors) has
    # the code server for parent, which outlives every run
    if parent is not None and parent.pid and b"grpc" not in _command_line(parent.pid):
        pids.append(parent.pid)
    return [[pid, start_ticks(pid)] for pid in pids]


def still_runs(holder: dict, instance: Optional[dg.DagsterInstance]) -> bool:
    """Whether the run that `holder` records still uses the folder. A training process group it launched
    holds it while any process of the group lives, whatever Dagster records of the run: a group whose
    step process was killed goes on writing the model."""
    here = holder.get("host") == socket.gethostname()
    if here and any(process_alive(g, group=True) for g in holder.get("groups", [])):
        return True
    run = instance.get_run_by_id(holder["run_id"]) if instance is not None and holder.get("run_id") else None
    if run is not None and run.is_finished:
        return False
    if holder.get("host") != socket.gethostname():  # its processes cannot be seen from here
        return True
    return any(_alive(p) for p in holder.get("processes", []) if p[0] != os.getpid())


def _decide(run_id: str, instance: Optional[dg.DagsterInstance]):
    def decide(current: dict) -> Optional[dict]:
        if current.get("run_id") not in (None, run_id) and still_runs(current, instance):
            return None
        mine = current.get("run_id") == run_id and current.get("host") == socket.gethostname()
        kept = [p for p in current.get("processes", []) if mine and _alive(p)]
        processes = kept + [p for p in _this_runs_processes() if p not in kept]
        since = current["since"] if mine else time.time()
        groups = [g for g in current.get("groups", []) if mine and process_alive(g, group=True)]
        return {"run_id": run_id, "host": socket.gethostname(), "processes": processes, "groups": groups,
                "since": since}
    return decide


def hold_group(context, root: Path, pgid: int) -> None:
    """Record the training process group that this run's step launched (its own session), which the
    step's claim does not cover once the step process is gone."""
    try:
        run_id = context.run.run_id
    except dg.DagsterError:
        return

    def add(current: dict) -> Optional[dict]:
        if current.get("run_id") != run_id:  # the step claimed first: no other run can hold it now
            return None
        return {**current, "groups": [*current.get("groups", []), pgid]}

    claim(Layout(root), CLAIM, add)


def holder_now(root: Path, instance: Optional[dg.DagsterInstance]) -> Optional[dict]:
    """The record of the run that holds the project folder now, or None: for a sensor, which claims nothing."""
    holder = claim(Layout(root), CLAIM, lambda current: None)  # read under the file's flock, never written
    return holder if holder and holder.get("run_id") and still_runs(holder, instance) else None


def refusal(root: Path, holder: dict) -> str:
    since = datetime.fromtimestamp(holder.get("since", 0), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    pids = [p[0] for p in holder.get("processes", [])]
    return (f"another Dagster run, {holder.get('run_id')}, is using the project folder {root} (since {since}; "
            f"processes {pids} on {holder.get('host')}). Two runs at once replace each other's files between "
            "their steps (one run's evaluation would score the other's model), so this run stopped before "
            "changing anything. Run it again once that run has ended (runs launched from the UI, the schedule "
            "and the sensors queue one after another), or terminate that run; a run whose processes are all "
            f"gone holds nothing. The claim is recorded in {Layout(root).lock(CLAIM)}")


def claim_project(context, root: Path) -> None:
    """Claim the project folder for this step's run (any asset or check context); dg.Failure, without
    retries, when another run that still runs holds it."""
    try:
        run_id = context.run.run_id
    except dg.DagsterError:  # invoked directly (a test, a notebook): no run to order
        return
    holder = claim(Layout(root), CLAIM, _decide(run_id, context.instance))
    if holder is not None:
        raise dg.Failure(description=refusal(root, holder), allow_retries=False)
    # A step run from the command line (or a DVC stage) takes its step's lock, not this claim: the run's data
    # steps would replace the files that step reads while it runs, and both would fail. Looked for at every
    # step and check of the run (one started between two of them; a run of checks alone, which do not wait
    # for each other), the run's own steps aside.
    running = running_step(Layout(root), PIPELINE, but_run=run_id)
    if running is not None:
        raise dg.Failure(description=f"{running} (from the command line or `dvc repro`): this run stopped before "
                                     "changing anything. Run it again once that step has ended",
                         allow_retries=False)

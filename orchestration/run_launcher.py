"""The run launcher of the shipped instance settings: Dagster's default one, which also tells run
monitoring when a run's process is gone.

The default launcher cannot say whether a run's process still lives, so a run killed outside Dagster
(the out-of-memory killer, `kill -9`) stayed "Started" for ever. With `max_concurrent_runs: 1` every
later run then queued behind it: the schedule never retrained. This launcher reads the process ids
that the run recorded (its run worker's, "Started process for run (pid: N)", and its steps') and looks
them up on this machine; the daemon's run monitoring marks the run failed once all are gone, and
frees its pool slots.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from dagster import DagsterEventType, DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin

# the run worker's start is an engine event; each step process says it captures its logs
RECORDS_PIDS = {DagsterEventType.ENGINE_EVENT, DagsterEventType.LOGS_CAPTURED}
PID_IN_MESSAGE = re.compile(r"\(pid: (\d+)\)")  # "Started process for run (pid: 20985).", a step's
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process here (a zombie, one that ended and was not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): os.kill said it exists
        return True
    return state not in ("Z", "X")


def runs_on_this_machine(run: DagsterRun) -> bool:
    """A code server the user runs elsewhere (`grpc_server` with a host) starts its runs there: their
    process ids mean nothing here."""
    origin = run.remote_job_origin
    location = origin.repository_origin.code_location_origin if origin else None
    if isinstance(location, GrpcServerCodeLocationOrigin):
        return location.host in LOCAL_HOSTS or location.host in (socket.gethostname(), socket.getfqdn())
    return True


class WatchedRunLauncher(DefaultRunLauncher):
    """DefaultRunLauncher that answers run monitoring's health check from the run's process id."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        if not runs_on_this_machine(run):
            return CheckRunHealthResult(WorkerStatus.RUNNING, "its code server runs on another machine")
        pids = self._run_pids(run.run_id)
        if not pids:  # not started yet, or started some other way: nothing to judge by
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no process id recorded")
        alive = [pid for pid in pids if process_alive(pid)]
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"processes {alive} run")
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's processes {pids} are gone: killed outside "
                                                         "Dagster (the out-of-memory killer, kill -9)")

    def _run_pids(self, run_id: str) -> list[int]:
        """Every process the run recorded: its run worker and each step's process (the multiprocess
        executor's). A step process orphaned by a killed run worker still writes the project's files,
        so the run counts as gone only once all of them are."""
        pids: list[int] = []
        for entry in self._instance.all_logs(run_id, of_type=RECORDS_PIDS):
            event = entry.dagster_event
            if event is None:
                continue
            data = event.event_specific_data
            value = (getattr(data, "metadata", None) or {}).get("pid")
            found = [str(getattr(value, "value", value))] if value is not None else []
            found += PID_IN_MESSAGE.findall(event.message or "")
            pids += [int(p) for p in found if p.isdigit()]
        return list(dict.fromkeys(pids))

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
CLOCK_SLACK_S = 60.0  # /proc/stat's boot time moves with the wall clock: steps of NTP, a resume
# a training launched as its own process group (orchestration.launcher) records it so
GROUP_IN_MESSAGE = re.compile(r"\(process group: (\d+)\)")
PID_IN_MESSAGE = re.compile(r"\(pid: (\d+)\)")  # "Started process for run (pid: 20985).", a step's
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _boot_time() -> float | None:
    """When this machine booted (seconds since the epoch), where /proc tells."""
    try:
        return next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def process_alive(pid: int, recorded_at: float | None = None, group: bool = False) -> bool:
    """Whether `pid` (with `group`, any process of that process group) is a live process here, and the
    one recorded at `recorded_at`: a zombie (ended, not yet reaped) is not, nor any process at all once
    the machine booted after the record (numbers are given out anew from the start)."""
    boot = _boot_time()
    if recorded_at is not None and boot is not None and boot > recorded_at + CLOCK_SLACK_S:
        return False
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    if group:
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
        recorded = self._run_processes(run.run_id)
        if not recorded:  # not started yet, or started some other way: nothing to judge by
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no process id recorded")
        alive = [pid for pid, (at, group) in recorded.items() if process_alive(pid, at, group)]
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, f"processes {alive} run")
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's processes {list(recorded)} are gone: killed "
                                                         "outside Dagster (the out-of-memory killer, kill -9)")

    def _run_processes(self, run_id: str) -> dict[int, tuple[float, bool]]:
        """Every process the run recorded, with when it was recorded and whether it is a process group:
        its run worker, each step's process (the multiprocess executor's) and a training launched as
        its own process group. A step process orphaned by a killed run worker, or a training group
        whose step was killed, still writes the project's files, so the run counts as gone only once
        all of them are."""
        found: dict[int, tuple[float, bool]] = {}
        for entry in self._instance.all_logs(run_id, of_type=RECORDS_PIDS):
            event = entry.dagster_event
            if event is None:
                continue
            value = (getattr(event.event_specific_data, "metadata", None) or {}).get("pid")
            pids = [str(getattr(value, "value", value))] if value is not None else []
            pids += PID_IN_MESSAGE.findall(event.message or "")
            for pid in pids:
                if pid.isdigit():
                    found.setdefault(int(pid), (entry.timestamp, False))
            for pgid in GROUP_IN_MESSAGE.findall(event.message or ""):
                found.setdefault(int(pgid), (entry.timestamp, True))
        return found

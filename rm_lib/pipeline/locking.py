"""One run of a step per project folder: an flock on <root>/.rm_lib/locks/<step>.lock.

The kernel drops an flock when its process ends, however it ends (kill -9 included), so a lock is
never left held by the dead; the file itself stays and only says who holds it now. `claim` is for an
owner made of several processes in turn (a Dagster run): the record in its file says who holds it."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

from rm_lib.errors import UserError
from rm_lib.files import flock_within, open_lock, process_stat, start_ticks
from rm_lib.layout import Layout

RUN_CLAIM = "dagster-run"  # <root>/.rm_lib/locks/dagster-run.lock: the Dagster run that holds the folder


class StepRunning(UserError):
    """Another process runs the same step in the same project folder."""

    holder: dict = {}  # who holds the step's lock, as it wrote itself into the file


def _holder(fd: int) -> dict:
    """Who holds the lock, as it wrote itself into the file (it may not have yet: retry briefly)."""
    for _ in range(50):
        with contextlib.suppress(ValueError, OSError):
            text = os.pread(fd, 4096, 0).decode("utf-8")
            if text.strip():
                return json.loads(text)
        time.sleep(0.02)
    return {}


def _refusal(layout: Layout, step: str, holder: dict) -> StepRunning:
    where = f"{step} is already running in {layout.root.resolve()}"
    if "pid" not in holder:
        return StepRunning(f"{where} (its pid is unknown: see {layout.lock(step)})")
    host = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    refusal = StepRunning(f"{where}, pid {holder['pid']}{host}")
    refusal.holder = holder
    return refusal


@contextlib.contextmanager
def step_lock(layout: Layout, step: str) -> Iterator[None]:
    """Hold `step`'s lock on `layout` for the block; StepRunning at once if another process holds it."""
    path = layout.lock(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(layout, step, _holder(fd)) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "step": step, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # still ours: nobody else reads a stale holder after we let go
    finally:
        os.close(fd)  # releases the flock


STARTING = "starting"  # <root>/.rm_lib/locks/starting.lock: held while a step takes its lock and looks at others'
_starting_here = threading.local()  # how deep this thread is in `starting` (flock would wait on its own second open)


@contextlib.contextmanager
def starting(layout: Layout, wait_s: float = 30.0) -> Iterator[None]:
    """Held while a step takes its lock and looks at the other steps' locks, and while anyone looks at them:
    two steps starting at one moment each saw the other's lock and both were refused, and a look (a shared
    flock) made a step's own taking fail. Held for moments; past `wait_s` (a holder stopped), gone on
    without. Where no lock folder exists, no step runs: nothing is made there."""
    path = layout.lock(STARTING)
    depth = getattr(_starting_here, "depth", 0)
    if depth or not path.parent.is_dir():
        _starting_here.depth = depth + 1
        try:
            yield
        finally:
            _starting_here.depth = depth
        return
    fd = open_lock(path)
    try:
        flock_within(fd, wait_s, 0.005)  # past wait_s, on without it
        _starting_here.depth = 1
        try:
            yield
        finally:
            _starting_here.depth = 0
    finally:
        os.close(fd)


def running_step(layout: Layout, steps: Iterable[str], but_run: Optional[str] = None) -> Optional[StepRunning]:
    """The first of `steps` that another process runs in `layout` now (its lock held), as the refusal a
    run of it would meet; None when none runs. `but_run`: a Dagster run whose own steps do not count
    (run_of). It only looks: no lock is held past the look."""
    with starting(layout):
        return _running(layout, steps, but_run)


def _running(layout: Layout, steps: Iterable[str], but_run: Optional[str] = None) -> Optional[StepRunning]:
    for step in steps:
        path = layout.lock(step)
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                refusal = _refusal(layout, step, _holder(fd))
                # a step of the run itself, in another of its processes (this process's own lock is none of
                # its steps: they release theirs before the next starts)
                if but_run is None or refusal.holder.get("pid") in (None, os.getpid()) \
                        or run_of(layout, refusal.holder) != but_run:
                    return refusal
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return None


def claim(layout: Layout, name: str, decide: Callable[[dict], Optional[dict]]) -> Optional[dict]:
    """A claim on `layout` that outlives the process that made it (a Dagster run spans several processes),
    held in <root>/.rm_lib/locks/<name>.lock. Under the file's flock, `decide(the current record, or {})`
    returns the record to write (the claim is the caller's now: None is returned), or None when the
    current holder keeps it (its record is returned). Whether a holder still holds it is `decide`'s to
    judge: a dead owner's record stays in the file until a claimant finds it dead."""
    path = layout.lock(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held only while the record is read and written
        try:
            current = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8") or "{}")
        except ValueError:  # a writer killed midway: nobody's claim
            current = {}
        record = decide(current if isinstance(current, dict) else {})
        if record is None:
            return current
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        return None
    finally:
        os.close(fd)


def run_of(layout: Layout, holder: dict) -> Optional[str]:
    """The id of the Dagster run whose step `holder` (a step lock's record) is, where the folder's run
    claim names its process: a step process of the run, or a process of a training group it launched."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return None
    record = claim(layout, RUN_CLAIM, lambda current: None) if layout.lock(RUN_CLAIM).is_file() else None
    if not record or record.get("host") != socket.gethostname():
        return None
    of_run = any(isinstance(p, list) and p and p[0] == pid and p[-1] in (None, start_ticks(pid))
                 for p in record.get("processes", []))
    # a worker of a training launch the run started: torch's launcher gives each worker a session of its
    # own, so the recorded group is the launcher's, an ancestor's
    groups = set(record.get("groups", []))
    of_run = of_run or any(_group(ancestor) in groups for ancestor in _ancestors(pid))
    return record.get("run_id") if of_run else None


def _group(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _ancestors(pid: int, depth: int = 8) -> list[int]:
    """`pid` and the processes above it, nearest first (/proc), up to `depth` of them."""
    chain = [pid]
    while len(chain) < depth:
        parent = process_stat(chain[-1], 1)
        if parent is None or parent <= 1:
            break
        chain.append(parent)
    return chain

"""A step run outside `dvc repro` (the CLI, a Dagster run) marks its stage in DVC's stage lock
(.dvc/tmp/rwlock) as `dvc repro` marks a stage it runs: the stage's deps as read, its outs as written,
under the step's pid. DVC's own commands honour the mark: a `dvc repro` that would check a cached train
out of its run cache (which runs no step of rm_lib, so takes none of its locks) refuses, naming the
step, instead of replacing the model under a running `evaluate` or a Dagster run's `train`. The mark
is taken and dropped as DVC does it, under DVC's guard lock (.dvc/tmp/rwlock.lock), and a mark of a
killed step is one DVC drops itself (its pid is gone)."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from rm_lib.errors import UserError
from rm_lib.files import alive, flock_within, open_lock
from rm_lib.pipeline.dvc_record import hardlink_lock, is_dvc_repo, read_stage

GUARD_WAIT_S = 10.0  # DVC holds the guard for an instant per edit
BUSY_WAIT_S = 5.0  # a `dvc status` or `dvc commit` marks for seconds; a `dvc repro`'s stage for its whole run


class StageBusy(UserError):
    """A DVC command reads or writes the paths this step reads or writes."""


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _paths(root: Path, entries: list[str]) -> list[str]:
    """dvc.yaml paths as DVC writes them into its stage lock: absolute, from the folder DVC finds the
    repository in (the physical path, as the working directory of `dvc repro` gives it)."""
    base = os.path.realpath(root)
    return [os.path.normpath(os.path.join(base, entry)) for entry in entries]


class _Unreadable(Exception):
    """DVC's stage lock cannot be read or written from here: DVC says so at its next command."""


@contextlib.contextmanager
def _guarded(root: Path) -> Iterator[Path]:
    """DVC's stage lock file, under DVC's guard lock for the block."""
    tmp = root / ".dvc" / "tmp"
    try:
        tmp.mkdir(exist_ok=True)
        fd = open_lock(tmp / "rwlock.lock")
    except (OSError, UserError) as exc:  # another user's, with no write for this one: DVC fails there too
        raise _Unreadable(str(exc)) from exc
    try:
        if not flock_within(fd, GUARD_WAIT_S, 0.1):
            raise StageBusy(f"DVC's guard lock {tmp / 'rwlock.lock'} stayed held for {GUARD_WAIT_S:.0f} s "
                            f"(pid {os.pread(fd, 32, 0).decode('utf-8', 'replace').strip() or 'unknown'}); "
                            "run the step again once that DVC command has ended")
        yield tmp / "rwlock"
    finally:
        os.close(fd)  # the flock goes with it


def _read(path: Path) -> dict[str, Any]:
    """The stage lock's entries ({} where there is none)."""
    try:
        locks = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # cut by a killed DVC command, another user's: DVC's to say
        raise _Unreadable(str(exc)) from exc
    if not isinstance(locks, dict):
        raise _Unreadable(f"{path} holds no JSON object")
    return locks


def _write(path: Path, locks: dict[str, Any]) -> None:
    # as DVC writes it: in place, under the guard; a mode left with no path is dropped, as DVC drops it
    try:
        with open(path, "w", encoding="utf-8") as out:
            json.dump({mode: entries for mode, entries in locks.items() if entries}, out)
    except OSError as exc:  # a teammate's file, not writable here: DVC's own commands fail on it too
        raise _Unreadable(str(exc)) from exc


def _blocker(locks: dict[str, Any], read: list[str], write: list[str]) -> Optional[str]:
    """The live DVC command (`cmd` (pid N)) that writes a path this step reads or writes, or reads one it writes."""
    def live(info: Any) -> bool:  # as DVC judges it: its pid runs (a file's time is another machine's on NFS)
        pid = info.get("pid") if isinstance(info, dict) else None
        return isinstance(pid, int) and pid != os.getpid() and alive(pid)

    for path, info in (locks.get("write") or {}).items():
        hit = next((p for p in read + write if _overlaps(p, path)), None)
        if hit and live(info):
            return f"`{info.get('cmd')}` (pid {info['pid']}) writes {path}"
    for path, infos in (locks.get("read") or {}).items():
        hit = next((p for p in write if _overlaps(p, path)), None)
        for info in infos if hit and isinstance(infos, list) else []:
            if live(info):
                return f"`{info.get('cmd')}` (pid {info['pid']}) reads {path}"
    return None


@contextlib.contextmanager
def marked(root: Path, stage: str, run_id: Optional[str] = None) -> Iterator[None]:
    """Stage `stage` marked in DVC's stage lock of the project at `root` for the block; StageBusy where a DVC
    command reads or writes its paths (after BUSY_WAIT_S, for a short one to end). Nothing where `dvc repro`
    runs the step (it marked the stage itself), where `root` is no DVC repository or dvc.yaml has no such
    stage, and where DVC guards its lock with hard links (core.hardlink_lock: no flock to share). `run_id`: the
    Dagster run the step is of, which the mark names (its command line is Dagster's)."""
    root = Path(root)
    if os.environ.get("DVC_STAGE") or not is_dvc_repo(root) or hardlink_lock(root):
        yield
        return
    try:
        spec = read_stage(root, stage)
    except (OSError, ValueError, UserError):  # dvc.yaml's own errors are DVC's to say
        spec = None
    if spec is None:
        yield
        return
    read, write = _paths(root, spec.deps), _paths(root, spec.outs)
    info = {"pid": os.getpid(), "cmd": f"rm_lib {stage}" + (f", a step of the Dagster run {run_id}" if run_id
                                                             else f" ({' '.join(sys.argv)[:200]})")}
    try:
        _mark(root, stage, info, read, write)
    except _Unreadable:
        yield  # no mark: DVC itself refuses to run until its lock is mended
        return
    try:
        yield
    finally:
        _unmark(root, info, read, write)


def _unmark(root: Path, info: dict[str, Any], read: list[str], write: list[str]) -> None:
    """The step's marks taken away, never an error: the step's work is done. Where DVC's guard stays held (a
    `dvc` stopped mid-edit), said, and tried once more as the process ends (DVC drops a dead pid's marks)."""
    def unmark() -> None:
        with _guarded(root) as path:
            locks = _read(path)
            for entry in read:
                readers = (locks.get("read") or {}).get(entry)
                if isinstance(readers, list) and info in readers:
                    readers.remove(info)
                    if not readers:
                        del locks["read"][entry]
            for entry in write:
                if (locks.get("write") or {}).get(entry) == info:
                    del locks["write"][entry]
            _write(path, locks)

    try:
        unmark()
    except (StageBusy, _Unreadable, OSError) as exc:
        print(f"warning: {info['cmd']} could not take its marks out of DVC's stage lock ({exc}); DVC commands on its "
              "paths refuse until this process ends", file=sys.stderr)
        atexit.register(_quietly, unmark)


def _quietly(action: Any) -> None:
    with contextlib.suppress(Exception):
        action()


def _mark(root: Path, stage: str, info: dict[str, Any], read: list[str], write: list[str]) -> None:
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        with _guarded(root) as path:
            locks = _read(path)
            busy = _blocker(locks, read, write)
            if busy is None:
                for entry in read:  # once, as DVC adds a reader
                    readers = locks.setdefault("read", {}).setdefault(entry, [])
                    if info not in readers:
                        readers.append(info)
                for entry in write:
                    locks.setdefault("write", {})[entry] = info
                _write(path, locks)
                return
        if time.monotonic() > deadline:
            raise StageBusy(f"{stage}: not run, nothing changed: {busy}, which this step reads or writes; run it "
                            "again once that command has ended (where that pid runs no such command now, a process "
                            f"killed midway left the entry: remove it, or {root / '.dvc' / 'tmp' / 'rwlock'} while no "
                            "DVC command runs)")
        time.sleep(0.5)

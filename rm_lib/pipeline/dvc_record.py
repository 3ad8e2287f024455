"""Record a step that ran outside `dvc repro` (a Dagster asset, say) in DVC, as `dvc repro` would:
finish the stage's command list, `dvc commit` the stage (dvc.lock gets the current deps, params and
outs hashes; the outputs go into the DVC cache) and `dvc push` its outputs to a remote.

A stage is recorded in dvc.lock only when the step ran with exactly the params.yaml values its DVC
stage depends on: otherwise dvc.lock would claim that params.yaml produced outputs it did not. A run
with other settings (a Dagster Launchpad override) is recorded as a DVC experiment instead, when the
caller names the run (`run_id`): params.yaml with the run's values and the stage committed, saved by
`dvc exp save` under `dagster-<run id>`, then params.yaml and dvc.lock put back as they were. The
later stages of that run go into the same experiment, so `dvc exp show` has its metrics and
`dvc exp apply` brings the whole run back. A re-execution (`re_executes`) adds the stages the run it
re-executes did not record to that run's experiment; one that runs a stage again starts its own
experiment from that one's, which stays as it was.

DVC is never imported here: its dependency chain pins a parser runtime (antlr4 4.9) that Dagster's
asset-selection parser cannot use (dagster issue #27487), so DVC lives in its own environment
(`make install` puts it in .venv-dvc and links `dvc` beside this interpreter). dvc.yaml, dvc.lock and
.dvc/config are read as files; committing and pushing run the `dvc` command in the project folder,
which also keeps DVC's repository lock and memory out of the calling process.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from rm_lib.errors import SettingsError, UserError
from rm_lib.files import alive, dvc_md5, open_lock, pipeline_written_files, read_yaml, start_ticks
from rm_lib.network import without_credentials
from rm_lib.settings import Params, load_params, params_from_dict

LOCK_BUSY = "Unable to acquire lock"  # DVC's message when another DVC process holds the repository
LOCK_POLL_S = 2.0
PUSHED = re.compile(r"(\d+) files? pushed")


class RecordError(UserError):
    """DVC refused to record the stage (a missing output, a broken repository, a held lock)."""


@dataclass(frozen=True)
class StageSpec:
    """What dvc.yaml says about one stage (vars interpolated), and the remote to push to."""

    name: str
    cmd: list[str]
    params: dict[str, list[str]]  # params file (absolute) -> keys; [] = the whole file
    outs: list[str]
    remote: Optional[str] = None
    remote_url: Optional[str] = None
    deps: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Recorded:
    """A stage committed to dvc.lock and the DVC cache."""

    stage: str
    outs: dict[str, str]  # out path (relative to the project) -> DVC md5 (`<md5>.dir` for a folder)
    lock_entry: str  # sha256 of the stage's dvc.lock entry: matches a materialization to a git commit
    remote: Optional[str]
    remote_url: Optional[str]
    pushed: bool
    push_note: str
    experiment: Optional[str] = None  # the DVC experiment the stage went into; None: the workspace's dvc.lock


@dataclass(frozen=True)
class NotRecorded:
    reason: str
    details: list[str] = field(default_factory=list)


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def linked_folder_above(root: Path, stage: str) -> Optional[str]:
    """Why DVC cannot record the outputs dvc.yaml declares for `stage`: a folder above one of them, inside
    the project, is a link (models/ moved to another disk). DVC resolves it, finds the output outside the
    repository and fails, once the step has run. An output DVC records whole may itself be a link."""
    try:
        found = ((read_yaml(root / "dvc.yaml") or {}).get("stages") or {}).get(stage) or {}
    except (OSError, ValueError, AttributeError, UserError):
        return None  # dvc.yaml's own errors are DVC's to say
    if not isinstance(found, dict):
        return None
    lists = [found.get(key) for key in ("outs", "metrics", "plots")]
    entries = [o for listed in lists if isinstance(listed, list) for o in listed]
    outs = [p for p in (o if isinstance(o, str) else next(iter(o), None) if isinstance(o, dict) else None
                        for o in entries) if isinstance(p, str) and p]
    base = root.absolute()
    for out in outs:
        parts = Path(out).parts
        for depth in range(1, len(parts)):
            folder = base.joinpath(*parts[:depth])
            if not folder.is_symlink():
                continue
            linked = Path(*parts[:depth]).as_posix()
            whole = sorted(o for o in outs if Path(o).parts[:depth] == parts[:depth] and not Path(o).suffix)
            instead = (f"; keep {linked} a folder of the project" + (f" and link {whole[0]} itself, which DVC records "
                                                                     "whole" if whole else ""))
            return (f"{linked} is a link (to {os.readlink(folder)}): DVC records no output under a linked folder "
                    f"({out} would lie outside the repository) and would fail once the step has run{instead}")
    return None


def dvc_running(root: Path) -> Optional[str]:
    """What DVC process works in `root` now, in words, or None. DVC holds its repository lock
    (.dvc/tmp/lock) for a whole `dvc repro` but while a stage's command runs, and its stage lock
    (.dvc/tmp/rwlock, the stage's outs with the pid and command) around that command: between them they
    cover the repro, also between two stages, where no step of rm_lib holds a lock of its own. It only
    looks (a lock it finds free is let go at once; DVC retries its lock for seconds)."""
    root = Path(root)
    tmp = root / ".dvc" / "tmp"
    if hardlink_lock(root):
        # a hard-linked claim file (no flock): the lock file is there while a DVC command holds it
        if (tmp / "lock").exists():
            return "a DVC command holds the DVC repository lock (.dvc/tmp/lock, core.hardlink_lock)"
    else:
        with contextlib.suppress(OSError):
            fd = os.open(tmp / "lock", os.O_RDONLY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = os.pread(fd, 64, 0).decode("utf-8", "replace").strip()
                    return f"a DVC command{f' (pid {pid})' if pid.isdigit() else ''} holds the DVC repository lock"
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
    path = tmp / "rwlock"
    try:
        written = path.stat().st_mtime
        locks = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # being rewritten by DVC this instant; left so by a kill mid-write: not busy
        return "DVC is changing its stage lock (.dvc/tmp/rwlock)" if time.time() - written < 5 else None
    except OSError:  # none, or not readable from here (where DVC's lock could not be read either)
        return None
    held = [*(locks.get("write") or {}).values(), *(i for r in (locks.get("read") or {}).values() for i in r)] \
        if isinstance(locks, dict) else []
    for info in held:
        pid = info.get("pid") if isinstance(info, dict) else None
        # a pid of a DVC killed mid-stage, given since to a process that started after the entry was written
        if isinstance(pid, int) and alive(pid) and (_started_at(pid) or 0) <= written + 1:
            return f"`{info.get('cmd')}` (pid {pid}) is running a stage"
    return None


def hardlink_lock(root: Path) -> bool:
    """DVC's core.hardlink_lock as DVC reads it: the project's .dvc/config.local, .dvc/config, then the
    user's and the system's config (DVC_GLOBAL_CONFIG_DIR, DVC_SYSTEM_CONFIG_DIR, else platformdirs' places
    on Linux)."""
    home = (os.environ.get("XDG_CONFIG_HOME") or "").strip()
    home = home if os.path.isabs(home) else os.path.join(os.path.expanduser("~"), ".config")
    system = next((d for d in (os.environ.get("XDG_CONFIG_DIRS") or "").split(os.pathsep) if d.strip()), "/etc/xdg")
    for config in (root / ".dvc" / "config.local", root / ".dvc" / "config",
                   Path(os.environ.get("DVC_GLOBAL_CONFIG_DIR") or os.path.join(home, "dvc")) / "config",
                   Path(os.environ.get("DVC_SYSTEM_CONFIG_DIR") or os.path.join(system, "dvc")) / "config"):
        try:
            value = _config_file(config).get("core", {}).get("hardlink_lock")
        except (OSError, ValueError):
            continue
        if value is not None:
            return value.lower() in ("true", "1", "yes", "on")
    return False


def _started_at(pid: int) -> Optional[float]:
    """When process `pid` started, in seconds since the epoch (Linux's /proc), or None where not known."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    try:
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def record(root: Path, stage: str, params: Params, *, remote: Optional[str] = None, push: bool = True,
           lock_wait_s: float = 600.0, run_id: Optional[str] = None,
           re_executes: Sequence[str] = ()) -> Recorded | NotRecorded:
    """Record stage `stage` (whose step just wrote its outputs with `params`) in the DVC repository
    at `root`: in dvc.lock, or in the run's experiment when the settings are not params.yaml's (or an
    earlier stage of run `run_id`, or of a run it re-executes, `re_executes`, went into one:
    experiment_of). NotRecorded when there is nothing faithful to record (other settings and no run
    id); RecordError when DVC fails."""
    root = Path(root).resolve()
    if not is_dvc_repo(root):
        return NotRecorded(f"not a DVC repository (no .dvc/ and dvc.yaml in {root})")
    restored = restore_interrupted_record(root)
    if restored:
        raise RecordError(f"{' and '.join(restored)} held the settings of a DVC experiment record that was killed "
                          "midway; they are put back as they were before it. This step ran with the workspace's "
                          "settings then: run it again")
    try:
        spec = read_stage(root, stage, remote)
    except (OSError, ValueError, UserError) as exc:  # a broken dvc.yaml or config: one message
        raise RecordError(f"DVC cannot read stage '{stage}' in {root}: {exc}") from exc
    if spec is None:
        return NotRecorded(f"dvc.yaml has no stage '{stage}'")
    if not spec.cmd or spec.cmd[0].strip() != f"python -m rm_lib {stage}":
        return NotRecorded(f"stage '{stage}' does not start with `python -m rm_lib {stage}`")
    differences = settings_differences(spec, params)
    if run_id:
        owner, state = experiment_of(root, stage, run_id, re_executes)
        if differences or state is not None:
            return record_experiment(root, spec, params, owner, lock_wait_s=lock_wait_s, start=state)
    if differences:
        return NotRecorded("the run's settings differ from params.yaml, so dvc.lock would not describe "
                           "these outputs; put the settings in params.yaml to record the step", differences)
    foreign = upstream_mismatches(root, spec)
    if foreign:
        return NotRecorded("the stage's inputs are not the outputs dvc.lock records for the stages before it (a run "
                           "with other settings, or a step run outside DVC, left others in the workspace), so "
                           "dvc.lock would contradict itself; `dvc checkout` or `dvc repro` first", foreign)
    run_remaining_commands(root, spec)
    dvc(root, ["commit", "--force", "--no-relink", f"dvc.yaml:{stage}"], lock_wait_s=lock_wait_s)
    entry = lock_entry(root, stage)
    pushed, note = push_stage(root, spec, lock_wait_s) if push else (False, "not pushed: push is off")
    return Recorded(stage=stage, outs={o["path"]: o["md5"] for o in entry.get("outs", [])},
                    lock_entry=_sha256(entry), remote=spec.remote, remote_url=spec.remote_url,
                    pushed=pushed, push_note=note)


def upstream_mismatches(root: Path, spec: StageSpec) -> list[str]:
    """The deps of stage `spec` that are another stage's outputs in dvc.lock (or lie in one)
    and differ from what dvc.lock records for them: committing the stage would record one version of
    a file as that stage's output and another as this stage's input."""
    root = Path(root)
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return []
    locked = read_yaml(lock_path).get("stages") or {}
    outs = {o["path"]: (name, o["md5"]) for name, entry in locked.items() if name != spec.name
            for o in entry.get("outs") or [] if "md5" in o}
    found = []
    for dep in spec.deps:
        for out, (upstream, md5) in outs.items():
            if dep == out:
                expected, actual = md5, dvc_md5(root / dep)
            elif dep.startswith(out + "/"):  # a file of a folder output: its md5 from DVC's listing of the folder
                expected = _listed_md5(root, md5, dep[len(out) + 1:])
                expected, actual = (md5, dvc_md5(root / out)) if expected is None else (expected, dvc_md5(root / dep))
            else:
                continue
            if actual != expected:
                found.append(f"{dep}: not the output of stage {upstream} that dvc.lock records")
            break
    return found


def _listed_md5(root: Path, folder_md5: str, relpath: str) -> Optional[str]:
    """The md5 DVC's cached listing of a folder output (`<md5>.dir`) gives one of its files; None
    where the listing is not in the project's cache."""
    listing = root / ".dvc" / "cache" / "files" / "md5" / folder_md5[:2] / folder_md5[2:]
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return next((e.get("md5") for e in entries if isinstance(e, dict) and e.get("relpath") == relpath), None)


EXPERIMENTS = Path(".dvc") / "tmp" / "rm-experiments"  # what each run's experiment holds so far


# While a stage goes into an experiment, the workspace's params.yaml and dvc.lock hold the experiment's:
# their own bytes wait in the journal, and the recording process holds JOURNAL_LOCK (the kernel lets go of
# it when the process dies), so that a record killed before it put them back (SIGKILL skips `finally`) is
# undone by the next step or record instead of being run and locked.
JOURNAL = EXPERIMENTS / "workspace.json"
JOURNAL_LOCK = EXPERIMENTS / "workspace.lock"


@contextlib.contextmanager
def _journal_lock(root: Path, wait: bool) -> Iterator[bool]:
    """Hold JOURNAL_LOCK; yields False at once when `wait` is off and another process holds it."""
    path = root / JOURNAL_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing lets go of the lock


def _write_journal(root: Path, saved: dict[Path, Optional[bytes]], written: str) -> None:
    files = {path.name: None if content is None else content.decode("utf-8") for path, content in saved.items()}
    _replace(root / JOURNAL, json.dumps({"files": files, "params_written": written}).encode("utf-8"))


def restore_interrupted_record(root: Path) -> list[str]:
    """Put back params.yaml and dvc.lock as they were before an experiment record that was killed midway;
    the names of the files put back. [] when none was interrupted, when its process still runs, or when
    params.yaml no longer holds what the record wrote (someone set it since: theirs stays)."""
    root = Path(root)
    journal = root / JOURNAL
    if not journal.is_file():
        return []
    with _journal_lock(root, wait=False) as held:
        if not held or not journal.is_file():
            return []
        try:
            entry = json.loads(journal.read_text(encoding="utf-8"))
        except ValueError:  # killed while writing the journal: the workspace was not touched yet
            journal.unlink(missing_ok=True)
            return []
        params_file = root / "params.yaml"
        still = params_file.is_file() and params_file.read_text(encoding="utf-8") == entry.get("params_written")
        restored = []
        for name, content in entry["files"].items() if still else ():
            path = root / name
            before = None if content is None else content.encode("utf-8")
            if (path.read_bytes() if path.is_file() else None) != before:
                _replace(path, before)
                restored.append(name)
        journal.unlink(missing_ok=True)
        return restored


def experiment_name(run_id: str) -> str:
    return f"dagster-{run_id[:8]}"


def experiment_running() -> Optional[dict[str, str]]:
    """The DVC experiment this process runs a stage of ({"name", "baseline": the commit it starts from}), or
    None: `dvc exp run` (in the workspace, --temp or from the queue) gives its stages DVC_EXP_NAME and
    DVC_EXP_BASELINE_REV (and DVC_ROOT). The experiment's commit will hold the workspace's tracked
    changes, its params.yaml and dvc.lock, so it names what a plain commit of the baseline does not; the
    caller checks that the checkout is at that baseline (a process that inherited the variables may not be)."""
    name = os.environ.get("DVC_EXP_NAME", "").strip()
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "").strip()
    return {"name": name, "baseline": baseline} if name and baseline and os.environ.get("DVC_ROOT") else None


def workspace_note(name: str, root: Path) -> str:
    """What a user must know before committing after a run recorded as an experiment."""
    # the outs dvc.yaml keeps in git, where git has them (before a first commit of them there is nothing
    # to go back to, and `git checkout` of an unknown path fails)
    outs = [path for path in pipeline_written_files(root) if path != "dvc.lock"]
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *outs], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.split("\0") if outs else []
    except (OSError, subprocess.SubprocessError):
        listed = outs  # git cannot say: name them all, as dvc.yaml does
    in_git = [shlex.quote(path) for path in outs if path in listed]
    back = "dvc checkout --force" + (f" && git checkout {' '.join(in_git)}" if in_git else "")
    return (f"the workspace keeps the outputs of experiment {name}, which dvc.lock and params.yaml do not describe: "
            f"before a git commit, `dvc exp apply {name}` keeps them (its settings into params.yaml), or "
            f"`{back}` goes back to dvc.lock's")


def experiment_state(root: Path, run_id: str) -> Optional[dict[str, Any]]:
    """{"params": params.yaml text, "lock": dvc.lock text, "stages": those it recorded} of the run's
    experiment so far, or None ("stages" is missing from a record of an older version)."""
    path = Path(root) / EXPERIMENTS / f"{experiment_name(run_id)}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def experiment_of(root: Path, stage: str, run_id: str,
                  re_executes: Sequence[str] = ()) -> tuple[str, Optional[dict[str, Any]]]:
    """(the run whose experiment `stage` of run `run_id` goes into, the state it starts from). A run's own
    experiment once it has one. For a re-execution, the experiment of the nearest run it re-executes
    (`re_executes`: its parent first, up to the root) that has one: joined where it lacks the stage
    (re-execute from failure: it holds the stages before it); where it recorded the stage already (or
    does not say, made by an older version), a new one of this run, starting from it: saved under the
    earlier run's name, it would replace that experiment, and what that run's materializations say of
    it would become false."""
    own = experiment_state(root, run_id)
    if own is not None:
        return run_id, own
    for earlier_run in re_executes:
        earlier = experiment_state(root, earlier_run) if earlier_run != run_id else None
        if earlier is None:
            continue
        stages = earlier.get("stages")
        if stages is not None and stage not in stages:
            return earlier_run, earlier
        return run_id, {**earlier, "stages": []}
    return run_id, None


def record_experiment(root: Path, spec: StageSpec, params: Params, run_id: str, *, lock_wait_s: float = 600.0,
                      start: Optional[dict[str, Any]] = None) -> Recorded | NotRecorded:
    """The stage in the run's DVC experiment (module docstring), from `start` (experiment_state's form;
    default: the run's own so far, else the workspace's params.yaml and dvc.lock). The workspace's
    params.yaml and dvc.lock are put back byte for byte, also when DVC fails."""
    root = Path(root).resolve()
    params_file, lock_file = root / "params.yaml", root / "dvc.lock"
    if any(Path(path) != params_file for path in spec.params):
        return NotRecorded(f"stage {spec.name} reads settings from a file other than params.yaml")
    if not _has_commit(root):
        return NotRecorded("the run's settings differ from params.yaml, and a DVC experiment needs a git commit to "
                           "start from (commit the project once)")
    name = experiment_name(run_id)
    state = start or experiment_state(root, run_id) or {
        "params": params_file.read_text(encoding="utf-8"),
        "lock": lock_file.read_text(encoding="utf-8") if lock_file.is_file() else "", "stages": []}
    changes = _changes(spec, params, yaml.safe_load(state["params"]) or {})
    text = set_settings(state["params"], changes)
    _check_settings(text, params, changes)
    saved = {path: path.read_bytes() if path.is_file() else None for path in (params_file, lock_file)}
    with _journal_lock(root, wait=True):
        return _record_in_experiment(root, spec, run_id, name, text, state, saved, lock_wait_s)


def _record_in_experiment(root: Path, spec: StageSpec, run_id: str, name: str, text: str, state: dict[str, str],
                          saved: dict[Path, Optional[bytes]], lock_wait_s: float) -> Recorded | NotRecorded:
    params_file, lock_file = root / "params.yaml", root / "dvc.lock"
    _write_journal(root, saved, text)
    try:
        _replace(params_file, text.encode("utf-8"))
        _replace(lock_file, state["lock"].encode("utf-8") if state["lock"] else None)
        foreign = upstream_mismatches(root, spec)  # against the experiment's dvc.lock
        if foreign:
            return NotRecorded("the stage's inputs are not the outputs the run's experiment records for the stages "
                               "before it (a step run outside this run left others in the workspace), so the "
                               "experiment would contradict itself", foreign)
        run_remaining_commands(root, spec)
        dvc(root, ["commit", "--force", "--no-relink", f"dvc.yaml:{spec.name}"], lock_wait_s=lock_wait_s)
        entry = lock_entry(root, spec.name)
        lock_text = lock_file.read_text(encoding="utf-8")
        untracked = [] if _tracked(root, "dvc.lock") else ["--include-untracked", "dvc.lock"]
        with _index_kept(root):
            dvc(root, ["exp", "save", "--force", "--name", name, *untracked, "-m",
                       f"Dagster run {run_id}: {spec.name}", f"dvc.yaml:{spec.name}"], lock_wait_s=lock_wait_s)
    finally:
        for path, content in saved.items():
            _replace(path, content)
        (root / JOURNAL).unlink(missing_ok=True)
    state_path = root / EXPERIMENTS / f"{name}.json"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    # a record of an older version does not say which stages it holds: still not known
    known = state.get("stages")
    stages = None if known is None else [*(s for s in known if s != spec.name), spec.name]
    state_path.write_text(json.dumps({"params": text, "lock": lock_text, "stages": stages}), encoding="utf-8")
    return Recorded(stage=spec.name, outs={o["path"]: o["md5"] for o in entry.get("outs", [])},
                    lock_entry=_sha256(entry), remote=spec.remote, remote_url=spec.remote_url, pushed=False,
                    push_note=f"not pushed: experiment {name} lives in this repository (`dvc exp push <git remote> "
                              f"{name}` shares it)", experiment=name)


def _differing(keys: list[str] | None, ran: dict, other: dict) -> list[tuple[str, str, Any, Any]]:
    """(section, key, the run's value, the other value) for the params keys `keys` (every key of
    both when there are none: a whole file) where the run's settings and `other` differ."""
    found = []
    for key in keys or sorted(set(ran) | set(other)):
        section, _, name = key.partition(".")
        mine, theirs = ran.get(section) or {}, other.get(section) or {}
        for k in [name] if name else sorted(set(mine) | set(theirs)):
            if mine.get(k) != theirs.get(k):
                found.append((section, k, mine.get(k), theirs.get(k)))
    return found


def _changes(spec: StageSpec, params: Params, base: dict) -> list[tuple[str, str, Any]]:
    """(section, key, the run's value) for the stage's params deps where the run differs from `base`."""
    ran = params.as_dict()
    return [(section, k, value) for keys in spec.params.values()
            for section, k, value, _ in _differing(keys, ran, base)]


def _flow(value: Any) -> str:
    """A value as one line of YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("...") else text


def set_settings(text: str, changes: list[tuple[str, str, Any]]) -> str:
    """params.yaml text with each (section, key, value) set, comments and order kept; a key the file
    lacks is added at the end of its section."""
    lines = text.splitlines(keepends=True)
    for section, name, value in changes:
        start = next((i for i, line in enumerate(lines) if re.match(rf"{re.escape(section)}:\s*(#.*)?$", line)),
                     None)
        if start is None:
            newline = "\n" if lines and not lines[-1].endswith("\n") else ""
            lines += [newline, f"{section}:\n", f"  {name}: {_flow(value)}\n"]
            continue
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
        for i in range(start + 1, end):
            m = re.match(rf"(\s+){re.escape(name)}:(\s*)([^#\n]*?)(\s*#.*)?\n?$", lines[i])
            if m:
                lines[i] = f"{m.group(1)}{name}: {_flow(value)}{m.group(4) or ''}\n"
                break
        else:
            last = end
            while last > start + 1 and not lines[last - 1].strip():
                last -= 1
            lines.insert(last, f"  {name}: {_flow(value)}\n")
    return "".join(lines)


def _check_settings(text: str, params: Params, changes: list[tuple[str, str, Any]]) -> None:
    """The written params.yaml must say what the run used, or no experiment is recorded."""
    written = yaml.safe_load(text) or {}
    for section, name, value in changes:
        if (written.get(section) or {}).get(name) != value:
            raise RecordError(f"cannot write {section}.{name}={value!r} into params.yaml for the experiment")


def _replace(path: Path, content: Optional[bytes]) -> None:
    """Write `content` to `path` whole (or remove it for None)."""
    if content is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.rm-tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def _has_commit(root: Path) -> bool:
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0


@contextlib.contextmanager
def _index_kept(root: Path) -> Iterator[None]:
    """The git index as the user left it: `dvc exp save` commits the workspace and then resets the index
    to HEAD, which unstaged what the user had staged (a `.dvc` file of new data then missed their next
    commit). The index file itself is copied aside and put back, so every entry and bit stays (partly
    staged files, `git add -N`, skip-worktree, a merge's unmerged entries)."""
    found = subprocess.run(["git", "rev-parse", "--git-path", "index"], cwd=root, capture_output=True, text=True)
    if found.returncode != 0:
        raise RecordError(f"git cannot name the index of {root}: {_tail(found.stdout + found.stderr)}")
    index = root / found.stdout.strip()
    kept = index.with_name(f"{index.name}.rm-lib-kept")
    had = index.is_file()
    if had:
        shutil.copy2(index, kept)
    try:
        yield
    finally:
        if had:
            os.replace(kept, index)
        else:
            index.unlink(missing_ok=True)
        subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=root, capture_output=True)


def _tracked(root: Path, name: str) -> bool:
    proc = subprocess.run(["git", "ls-files", "--error-unmatch", name], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0


def executable() -> str:
    """The `dvc` command: $RM_DVC, else the one beside this interpreter (the link `make install`
    makes into .venv-dvc), else the first on PATH."""
    named = os.environ.get("RM_DVC")
    if named:
        return named
    beside = Path(sys.executable).parent / "dvc"
    if beside.exists():
        return str(beside)
    found = shutil.which("dvc")
    if found:
        return found
    raise RecordError("the `dvc` command is not installed: `make install` puts it in .venv-dvc, or set RM_DVC "
                      "to a dvc executable (DVC needs its own environment; see docs/dvc.md)")


def _interpolate(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return re.sub(r"\$\{\s*([\w.]+)\s*\}", lambda m: str(variables.get(m.group(1), m.group(0))), value)
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
    return value


def _path_of(entry: Any) -> str:
    """A dvc.yaml list entry, `path` or `{path: {options}}`, as its path."""
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def read_config(root: Path) -> dict[str, dict[str, str]]:
    """.dvc/config with .dvc/config.local over it: {section: {key: value}}, section names as DVC writes
    them without the outer quotes (`core`, `remote "local"`)."""
    sections: dict[str, dict[str, str]] = {}
    for name in ("config", "config.local"):
        for section, values in _config_file(root / ".dvc" / name).items():
            sections.setdefault(section, {}).update(values)
    return sections


def _config_file(path: Path) -> dict[str, dict[str, str]]:
    """One DVC config file: {section: {key: value}} (keys lower-cased, quotes and a comment after a value
    left out, as configobj reads them); {} where there is none. OSError or ValueError where it cannot be read."""
    sections: dict[str, dict[str, str]] = {}
    if not path.is_file():
        return sections
    text = path.read_text(encoding="utf-8")
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[\s*'?(.*?)'?\s*\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
        elif "=" in line and current is not None:
            key, value = (part.strip() for part in line.split("=", 1))
            quoted = re.match(r"""(['"])(.*?)\1""", value)
            value = quoted.group(2) if quoted else re.split(r"\s[#;]", value, maxsplit=1)[0].strip()
            current[key.lower()] = value
    return sections


def stage_params(root: Path, stage: str) -> Optional[dict[str, Any]]:
    """The values of the params dvc.yaml lists for `stage`, as their files hold them now: what dvc.lock
    will record for it (None when dvc.yaml has no such stage)."""
    spec = read_stage(root, stage) if (root / "dvc.yaml").is_file() else None
    if spec is None:
        return None
    return {f"{Path(file).name}:{key}": _param(document, key)[1]
            for file, document, key in _declared_params(spec)}


def missing_stage_params(root: Path) -> list[str]:
    """'file:key' for every param a stage of dvc.yaml reads that its file does not hold (a params.yaml
    older than the stages): DVC stops at the first stage that reads one, after the stages before it ran."""
    stages = ((read_yaml(root / "dvc.yaml") if (root / "dvc.yaml").is_file() else {}).get("stages") or {})
    specs = [spec for spec in (read_stage(root, name) for name in stages) if spec is not None]
    return sorted({f"{Path(file).name}:{key}" for spec in specs for file, document, key in _declared_params(spec)
                   if key and not _param(document, key)[0]})


def _declared_params(spec: StageSpec) -> Iterator[tuple[str, Any, str]]:
    """(file, its document as it is now, key) for each param the stage declares; key "" for a whole file."""
    for file, keys in spec.params.items():
        path = Path(file)
        document = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
        for key in keys or [""]:
            yield file, document, key


def _param(document: Any, key: str) -> tuple[bool, Any]:
    """(whether the document holds dotted `key`, its value or None)."""
    value = document
    for part in filter(None, key.split(".")):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def read_stage(root: Path, stage: str, remote: Optional[str] = None) -> Optional[StageSpec]:
    """The stage as dvc.yaml declares it (`${vars}` interpolated), or None when it has no such stage."""
    pipeline = read_yaml(root / "dvc.yaml")
    found = (pipeline.get("stages") or {}).get(stage)
    if found is None:
        return None
    variables: dict[str, Any] = {}
    for item in pipeline.get("vars") or []:
        if isinstance(item, dict):
            variables.update(item)
    cmd = _interpolate(found.get("cmd") or [], variables)
    params: dict[str, list[str]] = {}
    for entry in found.get("params") or []:
        if isinstance(entry, dict):  # {file: [keys]}
            for file, keys in entry.items():
                params.setdefault(str(root / file), []).extend(keys or [])
        else:
            keys = params.setdefault(str(root / "params.yaml"), [])
            keys.append(str(entry))
    config = read_config(root)
    name = remote or config.get("core", {}).get("remote")
    url = config.get(f'remote "{name}"', {}).get("url") if name else None
    if url and "://" not in url and not os.path.isabs(os.path.expanduser(url)):
        url = os.path.normpath(root / ".dvc" / url)  # DVC reads a relative url from the config's folder
    # the url as metadata shows it: a secret the user keeps in .dvc/config.local stays there
    url = without_credentials(url) if url else url
    return StageSpec(name=stage, cmd=[cmd] if isinstance(cmd, str) else list(cmd), params=params,
                     outs=[_path_of(o) for o in found.get("outs") or []], remote=name, remote_url=url,
                     deps=[str(d) for d in found.get("deps") or []])


def settings_differences(spec: StageSpec, params: Params) -> list[str]:
    """`section.key: ran with X, params.yaml has Y` for every setting of the stage's params deps
    that the run did not take from its params file."""
    ran = params.as_dict()
    differences = []
    for path, keys in spec.params.items():
        try:
            recorded = load_params(path).as_dict()
        except SettingsError as exc:
            return [f"{path}: {exc}"]
        differences += [f"{section}.{k}: ran with {mine!r}, {Path(path).name} has {theirs!r}"
                        for section, k, mine, theirs in _differing(keys, ran, recorded)]
    return differences


def run_remaining_commands(root: Path, spec: StageSpec) -> None:
    """A stage's commands after `python -m rm_lib <step>` (the train and evaluate stages turn their
    .jsonl plot data into JSON): run as DVC runs them, in a shell in the project folder, with this
    interpreter as `python`."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for command in spec.cmd[1:]:
        proc = subprocess.run(command, shell=True, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RecordError(f"stage {spec.name}: `{command}` failed (exit {proc.returncode}): "
                              f"{_tail(proc.stdout + proc.stderr)}")


def dvc(root: Path, args: list[str], *, lock_wait_s: float = 600.0) -> str:
    """`dvc <args>` in `root`; waits up to lock_wait_s while another DVC process (a
    `dvc repro`, another run's asset) holds the repository lock."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    deadline = time.monotonic() + lock_wait_s
    while True:
        proc = subprocess.run([executable(), *args], cwd=root, env=env, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return output
        if LOCK_BUSY in output and time.monotonic() < deadline:
            time.sleep(LOCK_POLL_S)
            continue
        waited = f" (waited {lock_wait_s:.0f} s for the DVC lock)" if LOCK_BUSY in output else ""
        raise RecordError(f"dvc {' '.join(args)} failed (exit {proc.returncode}){waited}: {_tail(output)}")


def push_stage(root: Path, spec: StageSpec, lock_wait_s: float = 600.0) -> tuple[bool, str]:
    """(pushed, what happened). A failed push is reported, not raised: the outputs are in the local
    cache and dvc.lock, and `dvc push` later uploads them."""
    if not spec.remote:
        return False, "no DVC remote configured (`dvc remote add -d <name> <url>`)"
    try:
        output = dvc(root, ["push", "-r", spec.remote, f"dvc.yaml:{spec.name}"], lock_wait_s=lock_wait_s)
    except RecordError as exc:
        return False, str(exc)
    match = PUSHED.search(output)
    return True, f"{match.group(1)} file(s) pushed" if match else "already on the remote"


def lock_entry(root: Path, stage: str) -> dict[str, Any]:
    lock = read_yaml(root / "dvc.lock")
    try:
        return lock["stages"][stage]
    except KeyError:
        raise RecordError(f"dvc.lock has no stage '{stage}' after `dvc commit`") from None


def combined_hash(outs: dict[str, str], paths: Optional[list[str]] = None) -> str:
    """The DVC hash of `paths` (default, or when the stage has none of them: every out). One out: its
    DVC md5. Several: sha256 of their sorted `md5  path` lines."""
    chosen = {p: outs[p] for p in paths or () if p in outs} or outs
    if len(chosen) == 1:
        return next(iter(chosen.values()))
    text = "".join(f"{md5}  {path}\n" for path, md5 in sorted(chosen.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tail(text: str, lines: int = 8) -> str:
    """The last lines of DVC's or git's output as one, without the credentials of a remote's URL."""
    return without_credentials(" ".join(line.strip() for line in text.strip().splitlines()[-lines:]))


# The outs that make a stage's version: the model alone for train (checkpoints and logs do not change
# what downstream reads); every out for the others.
VERSION_OUTS: dict[str, tuple[str, ...]] = {"train": ("models/reward_model",)}


@dataclass(frozen=True)
class LockedStage:
    """What dvc.lock says a stage produced, and whether it was produced by the code that is here now."""

    stage: str
    version: str  # combined_hash of the stage's VERSION_OUTS
    current_code: bool  # every rm_lib file the stage depends on has the md5 dvc.lock recorded
    outs: dict[str, str] = field(default_factory=dict)  # the VERSION_OUTS (or every out): path -> md5
    data_deps: dict[str, str] = field(default_factory=dict)  # the deps that are no code: path -> md5

    def signature(self, root: Path) -> str:
        """The sizes and times of the files of these outs and data deps in the workspace: when it is
        unchanged, so is whether they match (DVC keeps such a state of its own for the same reason)."""
        stats = []
        for out in sorted({*self.outs, *self.data_deps}):
            path = Path(root) / out
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() \
                else []
            stats += [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        return _sha256(stats)

    def in_workspace(self, root: Path) -> bool:
        """The workspace holds the outputs dvc.lock records for this stage (not, say, the outputs of a
        Dagster run with other settings, which went into an experiment)."""
        return all(dvc_md5(Path(root) / out) == md5 for out, md5 in self.outs.items())

    def inputs_in_workspace(self, root: Path) -> bool:
        """The stage was made from the data the workspace holds now: every data dep has dvc.lock's md5
        (so the upstream outputs here are what it read)."""
        return all(dvc_md5(Path(root) / dep) == md5 for dep, md5 in self.data_deps.items())


def lock_differs(root: Path, stages: tuple[str, ...]) -> list[str]:
    """The stages, of `stages`, whose dvc.lock entry records other code, settings or source data than the
    workspace holds (`dvc status`'s changed deps or params: a change run through `dvc repro`, then undone; a
    source file changed since), each as "<stage> (code)", "(settings)", "(data)" or such joined by "and".
    Source data: a dep no stage writes (data/sources), where the outputs of the stages are the card's
    own rows. Empty without a dvc.lock."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return []
    entries = read_yaml(path).get("stages") or {}
    pipeline = Path(root) / "dvc.yaml"
    spec = (read_yaml(pipeline).get("stages") or {}) if pipeline.is_file() else {}
    documents: dict[str, Any] = {}

    def value_now(file: str, key: str) -> Any:
        if file not in documents:
            where = Path(root) / file
            try:
                text = where.read_text(encoding="utf-8") if where.is_file() else ""
                # JSON as JSON: YAML refuses the tabs json.dump(indent="\t") writes
                documents[file] = (json.loads(text) if where.suffix == ".json" and text else yaml.safe_load(text)) or {}
            except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
                documents[file] = {}
        value = documents[file]
        for part in filter(None, key.split(".")):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    written = {str(out if isinstance(out, str) else next(iter(out))) for entry in spec.values()
               if isinstance(entry, dict) for out in entry.get("outs") or []}
    differing = []
    for stage in stages:
        entry = entries.get(stage)
        if not isinstance(entry, dict) or (spec.get(stage) or {}).get("wdir", ".") != ".":
            continue  # a stage run elsewhere (wdir) names its files from there: not compared
        code = any(dvc_md5(Path(root) / d["path"]) != d.get("md5") for d in entry.get("deps") or []
                   if str(d.get("path", "")).startswith("rm_lib/"))
        settings = any(not _same_value(value_now(file, key), recorded)
                       for file, values in (entry.get("params") or {}).items()
                       if isinstance(values, dict) and Path(file).suffix in (".yaml", ".yml", ".json")
                       for key, recorded in values.items())
        data = any(dvc_md5(Path(root) / d["path"]) != d.get("md5") for d in entry.get("deps") or []
                   if not str(d.get("path", "")).startswith("rm_lib/") and "://" not in str(d.get("path", ""))
                   and not _under_any(str(d.get("path", "")), written))
        kinds = [w for w, on in (("code", code), ("settings", settings), ("data", data)) if on]
        if kinds:
            differing.append(f"{stage} ({' and '.join(kinds)})")
    return differing


def params_settings_other_than(root: Path, stages: Sequence[str], ran: dict[str, dict]) -> list[str]:
    """The settings of `stages` (those dvc.yaml's stages depend on) that the project's params.yaml holds other
    than the outputs were made with (`ran`: {section: {key: value}}; a key left out is taken as params.yaml's),
    each as "section.key": params.yaml changed since, or a run with --set, --params or Dagster Launchpad
    settings, which `dvc repro` of this checkout would not repeat. Empty without dvc.yaml, or where `ran`
    does not read as settings now (an older version's)."""
    try:
        if not (Path(root) / "params.yaml").is_file():
            return []
        now = load_params(Path(root) / "params.yaml").as_dict()
        made = params_from_dict({**now, **{section: {**(now.get(section) or {}), **values}
                                           for section, values in ran.items()}})
        specs = [spec for spec in (read_stage(Path(root), stage) for stage in stages) if spec is not None]
    except (OSError, ValueError, UserError):
        return []
    return sorted({d.split(":", 1)[0] for spec in specs for d in settings_differences(spec, made)
                   if ": ran with " in d})


def _under_any(path: str, folders: set[str]) -> bool:
    """Whether `path` is one of `folders` (paths as dvc.yaml writes them) or lies in one."""
    return any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in folders)


def lock_settings_other_than(root: Path, stage: str, ran: dict[str, dict]) -> list[str]:
    """The settings dvc.lock records for `stage` other than those it ran with (`ran`: {section: {key:
    value}}, of the sections it holds), each as "section.key": a `dvc commit` after a run with --set (or
    an accelerate launch with overrides) records the workspace's params.yaml beside outputs other settings
    made. Empty without a dvc.lock or an entry for the stage."""
    path = Path(root) / "dvc.lock"
    entry = ((read_yaml(path).get("stages") or {}).get(stage) if path.is_file() else None) or {}
    differing = []
    for values in (entry.get("params") or {}).values():
        for key, recorded in (values.items() if isinstance(values, dict) else ()):
            section, _, name = key.partition(".")
            # a whole section (dvc.yaml's `- model`) is recorded as one key holding its settings
            pairs = [(name, recorded)] if name else list(recorded.items()) if isinstance(recorded, dict) else []
            differing += [f"{section}.{setting}" for setting, value in pairs
                          if section in ran and setting in (ran[section] or {})
                          and not _same_value(ran[section][setting], value)]
    return sorted(differing)


def _same_value(now: Any, recorded: Any) -> bool:
    """A params value as the workspace holds it and as dvc.lock recorded it: DVC reads YAML 1.2, which takes
    `1e-4` for a number where PyYAML reads a string."""
    if isinstance(now, dict) and isinstance(recorded, dict):
        return now.keys() == recorded.keys() and all(_same_value(now[k], recorded[k]) for k in now)
    if isinstance(now, list) and isinstance(recorded, list):
        return len(now) == len(recorded) and all(map(_same_value, now, recorded))
    if now == recorded:
        return True
    try:
        return not isinstance(now, bool) and not isinstance(recorded, bool) and float(now) == float(recorded)
    except (TypeError, ValueError):
        return False


def locked_stages(root: Path) -> dict[str, LockedStage]:
    """Every stage of dvc.lock with outs: {stage: LockedStage}. Empty without a dvc.lock."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    lock = read_yaml(path)
    found = {}
    for stage, entry in (lock.get("stages") or {}).items():
        outs = {o["path"]: o["md5"] for o in entry.get("outs") or [] if "md5" in o}
        if not outs:
            continue
        code = [d for d in entry.get("deps") or [] if str(d.get("path", "")).startswith("rm_lib/")]
        current = bool(code) and all(dvc_md5(Path(root) / d["path"]) == d.get("md5") for d in code)
        version_outs = {p: outs[p] for p in VERSION_OUTS.get(stage, ()) if p in outs} or outs
        data = {str(d["path"]): d.get("md5") for d in entry.get("deps") or [] if d not in code and "path" in d}
        found[stage] = LockedStage(stage, combined_hash(version_outs), current, version_outs, data)
    return found

"""Record a step that ran outside `dvc repro` (a Dagster asset, say) in DVC, as `dvc repro` would:
finish the stage's command list, `dvc commit` the stage (dvc.lock gets the current deps, params and
outs hashes; the outputs go into the DVC cache) and `dvc push` its outputs to a remote.

A stage is recorded only when the step ran with exactly the params.yaml values its DVC stage
depends on: otherwise dvc.lock would claim that params.yaml produced outputs it did not.

DVC's Python API resolves stage and cache paths against the current directory, so it is only read
here (stage definitions, remote config); committing and pushing run `python -m dvc` in the project
folder, which also keeps DVC's repository lock and memory out of the calling process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from rm_lib.errors import SettingsError, UserError
from rm_lib.settings import Params, load_params

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


@dataclass(frozen=True)
class NotRecorded:
    reason: str
    details: list[str] = field(default_factory=list)


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def record(root: Path, stage: str, params: Params, *, remote: Optional[str] = None, push: bool = True,
           lock_wait_s: float = 600.0) -> Recorded | NotRecorded:
    """Record stage `stage` (whose step just wrote its outputs with `params`) in the DVC repository
    at `root`. NotRecorded when there is nothing faithful to record; RecordError when DVC fails."""
    root = Path(root).resolve()
    if not is_dvc_repo(root):
        return NotRecorded(f"not a DVC repository (no .dvc/ and dvc.yaml in {root})")
    from dvc.exceptions import DvcException

    try:
        spec = read_stage(root, stage, remote)
    except DvcException as exc:  # a broken dvc.yaml, no git repository, ...: one message, no traceback
        raise RecordError(f"DVC cannot read stage '{stage}' in {root}: {exc}") from exc
    if spec is None:
        return NotRecorded(f"dvc.yaml has no stage '{stage}'")
    if not spec.cmd or spec.cmd[0].strip() != f"python -m rm_lib {stage}":
        return NotRecorded(f"stage '{stage}' does not start with `python -m rm_lib {stage}`")
    differences = settings_differences(spec, params)
    if differences:
        return NotRecorded("the run's settings differ from params.yaml, so dvc.lock would not describe "
                           "these outputs; put the settings in params.yaml to record the step", differences)
    run_remaining_commands(root, spec)
    dvc(root, ["commit", "--force", "--no-relink", f"dvc.yaml:{stage}"], lock_wait_s=lock_wait_s)
    entry = lock_entry(root, stage)
    pushed, note = push_stage(root, spec, lock_wait_s) if push else (False, "not pushed: push is off")
    return Recorded(stage=stage, outs={o["path"]: o["md5"] for o in entry.get("outs", [])},
                    lock_entry=_sha256(entry), remote=spec.remote, remote_url=spec.remote_url,
                    pushed=pushed, push_note=note)


def read_stage(root: Path, stage: str, remote: Optional[str] = None) -> Optional[StageSpec]:
    """The stage as DVC resolves it, or None when dvc.yaml has no such stage."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageNotFound

    with Repo(str(root)) as repo:
        try:
            (found,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")
        except StageNotFound:
            return None
        cmd = found.cmd if isinstance(found.cmd, list) else [found.cmd]
        params = {dep.fs_path: list(dep.params or []) for dep in found.deps if isinstance(dep, ParamsDependency)}
        name = remote or repo.config["core"].get("remote")
        url = repo.config["remote"].get(name, {}).get("url") if name else None
        return StageSpec(name=stage, cmd=list(cmd), params=params, outs=[str(o) for o in found.outs],
                         remote=name, remote_url=url)


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
        for key in keys or list(recorded):
            section, _, name = key.partition(".")
            fields = [name] if name else sorted(set(ran.get(section, {})) | set(recorded.get(section, {})))
            for f in fields:
                mine, theirs = ran.get(section, {}).get(f), recorded.get(section, {}).get(f)
                if mine != theirs:
                    differences.append(f"{section}.{f}: ran with {mine!r}, {Path(path).name} has {theirs!r}")
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
    """`python -m dvc <args>` in `root`; waits up to lock_wait_s while another DVC process (a
    `dvc repro`, another run's asset) holds the repository lock."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    deadline = time.monotonic() + lock_wait_s
    while True:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True,
                              text=True)
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
    lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
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
    return " ".join(line.strip() for line in text.strip().splitlines()[-lines:])

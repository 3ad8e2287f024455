"""Checkpoints of a training run: written atomically with the checksums of their files, judged intact
or damaged before a resume, tied to the run (its fingerprint) and the launch that saved them, and
pruned so that disk use stays bounded."""
from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rm_lib.errors import SettingsError
from rm_lib.files import file_sha256, remove_tree, share_tree, storage_error
from rm_lib.training.distributed import Launch

STATE_FILE = "trainer_state.json"
CHECKSUM_FILE = "checksums.json"  # size and sha256 of every file of a checkpoint, written last
LOG_FILE = "metrics.jsonl"  # the metrics log as it was at the checkpoint, for a resume after DVC cleared it


@dataclass
class TrainState:
    step: int = 0
    fingerprint: str = ""
    metrics_lines: int = 0
    best_eval_accuracy: float | None = None
    best_step: int | None = None
    scheduler: dict | None = None  # the LR schedule's state, as JSON: a checkpoint holds no pickle to load
    # The run's own figures, over all its sessions, so that a rerun which reuses it can report them.
    tokens: int = 0
    train_s: float = 0.0
    last_log: dict | None = None
    window: dict | None = None  # the logging window's sums since the last log (_saved_window)
    wandb_id: str | None = None  # the W&B run this run logs to: a resumed run continues it (online)
    wandb_url: str | None = None
    # the launch that saved it (Launch); None in checkpoints saved before it was recorded
    processes: int | None = None
    fsdp: bool | None = None
    # Each session that trained steps of the run: its steps, its settings outside the fingerprint and its
    # device plan. A rerun that reuses or resumes the run may have other such settings: what it records of
    # the run must be what trained it.
    sessions: list[dict] = field(default_factory=list)
    made_of: dict | None = None  # the fingerprint's parts (trainer.fingerprint_parts); None before it was kept


def step_folders(folder: Path) -> list[Path]:
    """step-N folders, oldest first."""
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def read_state(checkpoint: Path) -> dict | None:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def latest_checkpoint(folder: Path, fingerprint: str | None = None) -> Path | None:
    """The newest checkpoint with a readable state (of the run `fingerprint`, when given)."""
    for candidate in reversed(step_folders(folder)):
        state = read_state(candidate)
        if state is not None and fingerprint in (None, state.get("fingerprint")):
            return candidate
    return None


def write_checksums(checkpoint: Path) -> None:
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    sums = {str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (checkpoint / CHECKSUM_FILE).write_text(json.dumps(sums, sort_keys=True))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed (a file missing, cut short or changed), or None when it is intact.
    Checkpoints written before checksums existed are judged by their state file alone."""
    if read_state(checkpoint) is None:
        return f"{STATE_FILE} is missing or unreadable"
    if not (checkpoint / CHECKSUM_FILE).exists():
        return None
    try:
        sums = json.loads((checkpoint / CHECKSUM_FILE).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUM_FILE} is unreadable"
    for name, expected in sums.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            return f"{name} does not match the checksum written when it was saved"
    return None


def resume_point(folder: Path, fingerprint: str, say: Callable[[str], None],
                 made_of: dict | None = None) -> Path | None:
    """The newest intact checkpoint of this run. Damaged ones passed over are said in one line, and so is
    the newest of another run's where this run has none: a resume that does not come is no surprise."""
    damaged, other = [], None
    for candidate in reversed(step_folders(folder)):
        state = read_state(candidate)
        if state is not None and state.get("fingerprint") != fingerprint:
            other = other or (candidate, state)
            continue  # another run's: never mixed in
        problem = checkpoint_problem(candidate)
        if problem is None:
            if damaged:
                say(f"train: passed over damaged checkpoint {'; '.join(damaged)}; resuming from {candidate.name}")
            return candidate
        damaged.append(f"{candidate.name} ({problem})")
    if damaged:
        say(f"train: passed over damaged checkpoint {'; '.join(damaged)}; no intact one is left: training from step 0")
    elif other is not None:
        candidate, state = other
        say(f"train: {candidate} is another run's ({what_differs(state.get('made_of'), made_of)}), never resumed "
            "by this one: training from step 0; it stays until this run saves a checkpoint of its own")
    return None


def what_differs(theirs: dict | None, ours: dict | None) -> str:
    """The parts of two runs' fingerprints that differ, in words."""
    if not isinstance(theirs, dict) or not isinstance(theirs.get("train"), dict) or not ours:
        return "its settings, data, base model, training code or launch differ"
    said = []
    settings = sorted(k for k in ours["train"].keys() | theirs["train"].keys()
                      if theirs["train"].get(k) != ours["train"].get(k))
    if settings:
        said.append("other settings: " + ", ".join(f"train.{k}" for k in settings))
    if theirs.get("model") != ours["model"]:
        unrecorded = {k: v for k, v in ours["model"].items() if k != "content"} == theirs.get("model")
        said.append("a base model whose content an earlier version did not record" if unrecorded
                    else "another base model")
    if theirs.get("data") != ours["data"]:
        said.append("other filtered pairs")
    if theirs.get("code") != ours["code"]:
        said.append("other training code (rm_lib changed, an upgrade or an edit)")
    if (theirs.get("processes"), theirs.get("fsdp")) != (ours["processes"], ours.get("fsdp")):
        said.append("another launch")
    return "; ".join(said) or "its fingerprint differs"


def _saved_launch(state: dict) -> Launch | None:
    processes, fsdp = state.get("processes"), state.get("fsdp")
    if not isinstance(processes, int) or not isinstance(fsdp, bool):
        return None
    return Launch(processes, fsdp)


def check_launch(folder: Path, fingerprint: str, launch: Launch, fingerprint_of: Callable[[Launch], str]) -> None:
    """Refuse to train when this run's newest checkpoint was saved by another launch: this one would
    not resume it (another number of processes is another global batch; FSDP and DDP checkpoints are
    laid out differently) but train from step 0, and prune it at its first save. A checkpoint is this
    run's when `fingerprint_of` its recorded launch is its fingerprint; damaged ones are passed over,
    as a resume passes over them."""
    for candidate in reversed(step_folders(folder)):
        state = read_state(candidate)
        if state is None:
            continue
        if state.get("fingerprint") == fingerprint:
            return  # this launch's own, newer than any other launch's: resumed as ever
        saved = _saved_launch(state)
        if saved is None or saved == launch or fingerprint_of(saved) != state.get("fingerprint"):
            continue
        if checkpoint_problem(candidate) is not None:
            continue
        why = []
        if saved.processes != launch.processes:
            why.append("each process takes train.batch_size pairs of a step")
        if saved.fsdp != launch.fsdp:
            why.append("FSDP saves checkpoints in a layout of its own")
        raise SettingsError(f"train: the checkpoint {candidate} of this run was saved by {saved}; this launch is "
                            f"{launch} and cannot resume it ({'; '.join(why)}). To resume, relaunch as it was saved "
                            f"(`{saved.command()}`, with this run's options); to train afresh with this launch, "
                            f"remove {folder}")


def save_checkpoint(accelerator: Any, folder: Path, state: TrainState, keep: int, log: Path | None = None) -> Path:
    """Write step-N atomically (temporary name, then rename) with the checksums of its files; then drop
    other runs' checkpoints and keep this run's newest `keep` and its best, so disk use stays bounded."""
    target = folder / f"step-{state.step}"
    tmp = folder / f".step-{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process's files are in before they are summed up
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
            if log is not None and log.exists():
                shutil.copyfile(log, tmp / LOG_FILE)
            write_checksums(tmp)
    except Exception as exc:  # torch's RuntimeError, safetensors' SafetensorError, an OSError
        # judged before the half goes: that frees the space it filled; another storage failure (a file too
        # large for the file system or the user's `ulimit -f`) is named by the folder
        full = _full_disk(exc, folder, state, keep) or storage_error(exc, folder)
        shutil.rmtree(tmp, ignore_errors=True)  # its half would keep a full disk full for what runs next
        if full is None:
            raise
        raise full from exc
    if accelerator.is_main_process:
        share_tree(tmp)
        remove_tree(target, said=False)
        if target.exists():  # another user's, which this one may not remove: named, not "Directory not empty"
            shutil.rmtree(tmp, ignore_errors=True)
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        tmp.rename(target)
        _prune(folder, state, keep)
    accelerator.wait_for_everyone()
    return target


# torch's writer reports a full disk as a RuntimeError ("basic_ios::clear: iostream error"): below this much
# free space after a failed save, the disk is taken to be why
_FULL_BELOW = 64 << 20


def _full_disk(exc: BaseException, folder: Path, state: TrainState, keep: int) -> OSError | None:
    """A checkpoint write that failed for a full disk, as one line the CLI prints with its path; None
    for any other failure. safetensors names the OS error in its message; torch's writer says only
    "iostream error", so there the free space decides. The line names what the user can remove."""
    text = str(exc)
    said = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "os error 28" in text or \
        "No space left" in text
    if isinstance(exc, OSError) and not said:
        return None
    free = shutil.disk_usage(folder).free
    if not said and free >= _FULL_BELOW:
        return None
    others, own = [], 0
    for candidate in step_folders(folder):
        if (read_state(candidate) or {}).get("fingerprint") == state.fingerprint:
            own += 1
        else:
            others.append(candidate)
    ways = []
    if others:  # pruned only once this run has a checkpoint of its own: until then they are the resumable ones
        size = sum(f.stat().st_size for c in others for f in c.rglob("*") if f.is_file())
        ways.append(f"remove another run's checkpoints ({size >> 20} MiB: {', '.join(str(c) for c in others)}; "
                    "this run removes them only once it has saved one of its own)")
    if own and keep > 1:
        ways.append("lower train.save_total_limit")
    return OSError(errno.ENOSPC, f"no room for a checkpoint ({free >> 20} MiB were free when it failed; the earlier "
                                 f"checkpoints and the last model are kept): free space"
                                 + "".join(f", or {way}" for way in ways), str(folder))


def _prune(folder: Path, state: TrainState, keep: int) -> None:
    """This run has a checkpoint now: other runs' go, and this run's beyond the newest `keep` and the best."""
    own = []
    for candidate in step_folders(folder):
        saved = read_state(candidate)
        if saved is None or saved.get("fingerprint") != state.fingerprint:
            remove_tree(candidate)  # one that cannot go (a teammate's) is said
        else:
            own.append(candidate)
    for old in own[:-keep]:
        if old.name != f"step-{state.best_step}":
            remove_tree(old)

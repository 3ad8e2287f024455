"""One module per pipeline step. Each exposes `run(params, layout) -> result`; the CLI, the DVC
stages and the Dagster assets all go through `run(name, params, layout)` below and nothing else."""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import random
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from rm_lib.errors import SettingsError, UserError
from rm_lib.files import (
    SET_MARK,
    file_sha256,
    finish_replacing,
    folder_problem,
    remove_stale,
    restore_interrupted,
    staging_problem,
)
from rm_lib.layout import Layout
from rm_lib.pipeline import chain, dvc_stage_lock
from rm_lib.pipeline.code_version import code_hash
from rm_lib.pipeline.dvc_record import (
    linked_folder_above,
    missing_stage_params,
    restore_interrupted_record,
    stage_params,
)
from rm_lib.pipeline.locking import StepRunning, run_of, running_step, starting, step_lock
from rm_lib.settings import Params

PIPELINE: tuple[str, ...] = ("download", "tokenize", "filter", "train", "evaluate", "push")
T = TypeVar("T")


def module(name: str) -> Any:
    """The module of step `name` (imported on first use: steps pull in torch and transformers)."""
    if name not in PIPELINE:
        raise ValueError(f"unknown step {name!r}; the steps are {', '.join(PIPELINE)}")
    return importlib.import_module(f"{__name__}.{name}")


def first_of_its_launch() -> bool:
    """accelerate/torchrun start one process per device for the same step: only rank 0 locks."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes accelerate/torchrun started for this command (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_on_cpu() -> bool:
    """Several processes (torchrun, `accelerate launch --multi_gpu`) and no GPU: accelerate joins
    them into one gloo group only when told the run is on the CPU; otherwise each would run alone."""
    import torch

    return launched_processes() > 1 and not torch.cuda.is_available()


class FailedOnTheFirstProcess(UserError):
    """What the first process of a launch ran for all of them failed there, and it said why: the other
    processes end with it, saying nothing more."""


@dataclass(frozen=True)
class RanOnTheFirstProcess:
    """What the other processes of a launch get of a step the first one ran."""
    name: str

    def summary(self) -> str:
        return f"{self.name}: run by the first process of the launch"


_WAIT_TIMEOUT = timedelta(days=7)  # a step may run for hours; the wait is not what should time out


@functools.cache
def _waiting_group() -> Any:
    """A process group the other processes wait in while the first runs a step, without the launch's
    time limit (30 minutes under accelerate, shorter under NCCL). It is made beside the launch's own
    group, which train's Accelerator shares; every process makes it at the same call, as it must."""
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(cpu=launched_on_cpu())
    return dist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)


def on_the_first_process(name: str, work: Callable[[], T]) -> T | RanOnTheFirstProcess:
    """`work()` on the first process of a launch of several alone; the others wait for it, and fail where
    it failed (FailedOnTheFirstProcess). Without a launch, `work()` here. The steps other than train read
    and write the same files from every process: each ran them in full (a launch of 2 evaluated twice,
    slower than one, printed everything twice and wrote the outputs from two processes, one without the
    step's lock)."""
    if launched_processes() == 1:
        return work()
    import torch.distributed as dist

    group = _waiting_group()
    outcome: list[str | None] = [None]
    if dist.get_rank(group) != 0:
        dist.broadcast_object_list(outcome, src=0, group=group)
        if outcome[0] is not None:
            raise FailedOnTheFirstProcess(outcome[0])
        return RanOnTheFirstProcess(name)
    try:
        result = work()
    except BaseException as exc:
        outcome[0] = f"{name} failed on the first process: {exc}"
        dist.broadcast_object_list(outcome, src=0, group=group)
        raise
    dist.broadcast_object_list(outcome, src=0, group=group)
    return result


def _remove_stale_temporaries(name: str, layout: Layout) -> None:
    """Under the step's lock no other writer of its outputs is alive: whatever temporaries they hold
    were left by killed runs, also those named before temporaries carried their writer's pid."""
    for output in layout.outputs(name):
        # a linked output folder is replaced where its link points: its temporaries are there
        for where in dict.fromkeys((output, output.resolve() if output.is_symlink() else output)):
            restore_interrupted(where)  # before the release gate reads data/release, say
            remove_stale(where.parent, where.name, unowned=True)
            remove_stale(where, unowned=True)


def _finish_interrupted_sets(name: str, layout: Layout) -> None:
    """train puts the model and its run's records in place together; a kill -9 between the two left the
    new model beside the records of the run before it, and evaluate scored it as that run's. Whichever step
    runs next finishes putting the set in place, under train's lock (not while a train runs: its own)."""
    marked = [output for output in layout.outputs("train") if (output / SET_MARK).is_file()]
    if not marked:
        return
    try:
        # under `starting`: a step looking at the locks meanwhile would say train runs, pid of this step
        with starting(layout), contextlib.nullcontext() if name == "train" else step_lock(layout, "train"):
            for output in marked:
                if finish_replacing(output):
                    print(f"{name}: finished putting in place what an interrupted train had begun to "
                          f"({', '.join(str(o) for o in layout.outputs('train'))})", file=sys.stderr)
                    return
    except StepRunning:
        return


def leave_the_launch() -> None:
    """The process groups of a launch destroyed before the interpreter ends: left to its exit, gloo's
    threads now and then ended a process with "terminate called without an active exception" (SIGABRT),
    and the launcher failed the launch for it. Nothing where no group was made."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _waiting_group.cache_clear()


def run(name: str, params: Params, layout: Layout, **options: Any) -> Any:
    """Run one step on `layout` with `params`, alone in this folder (StepRunning otherwise) and only on
    input whose chain still holds (chain.StaleInput); returns the step's result (it has `.summary()`).
    `options` go to the step's own `run` (train: `on_log`). Under a launch of several processes train
    runs on all of them; any other step on the first alone (on_the_first_process)."""
    if name not in PIPELINE:
        module(name)  # the unknown-step error
    if name == "train":
        return _run(name, params, layout, **options)
    return on_the_first_process(name, lambda: _run(name, params, layout, **options))


def _run(name: str, params: Params, layout: Layout, **options: Any) -> Any:
    if os.environ.get("DVC_STAGE") and os.environ.get("DVC_ROOT"):
        _check_stage_params(Path(os.environ["DVC_ROOT"]))
    locks = layout.lock(name).parent
    for folder in (locks.parent, locks, layout.root / "data", layout.root / "models"):
        problem = folder_problem(folder)  # else "File exists", from wherever the first folder is made
        if problem:
            raise UserError(f"{name}: {problem}")
    # the lock taken before the step's heavy imports: a refusal comes at once
    with alone(name, layout) if first_of_its_launch() else contextlib.nullcontext():
        if first_of_its_launch():
            _finish_interrupted_sets(name, layout)
            _remove_stale_temporaries(name, layout)
            _undo_interrupted_record(layout)
        for output in layout.outputs(name):  # before any work, not when the finished output is put in place
            problem = output_problem(output, layout)
            if problem:
                raise UserError(f"{name}: {problem}")
        if os.environ.get("DVC_STAGE"):  # `dvc repro` records the outputs once the step has run
            check_recordable(name, layout)
        chain.check(name, layout)
        if name in ("filter", "train"):  # ids are read with the configured model's embeddings from filter on
            chain.check_tokenized_for(layout, params.model.name_or_path, params.model.revision, name)
        before = _made_from(name, layout, params)
        with random_state_kept():
            result = module(name).run(params, layout, **options)
        _check_unchanged(name, layout, params, before)
        return result


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global random generators as they were before the block, for a caller
    that runs steps in its own process (a notebook): train seeds them all with train.seed, and every draw
    after a train repeated. A generator first made in the block is seeded afresh, as a new process has it."""
    before = random.getstate()
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    torch_state = torch.random.get_rng_state() if torch is not None else None
    cuda_state = torch.cuda.get_rng_state_all() if torch is not None and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(before)
        numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
        if numpy is not None and numpy_state is not None:
            numpy.random.set_state(numpy_state)
        elif numpy is not None:
            numpy.random.seed(None)
        if torch is not None:
            if torch_state is None:
                torch.seed()  # the CPU's and every GPU's
            else:
                torch.random.set_rng_state(torch_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state_all(cuda_state)
                elif torch.cuda.is_initialized():
                    torch.cuda.seed_all()


@contextlib.contextmanager
def alone(name: str, layout: Layout) -> Iterator[None]:
    """Step `name`'s lock on `layout` for the block, once no other step runs there (StepRunning otherwise).
    Its lock is taken and the others' looked at as one: of two steps starting at one moment, one runs."""
    layout.lock(name).parent.mkdir(parents=True, exist_ok=True)  # else a new folder's first steps start unguarded
    with contextlib.ExitStack() as held:
        with starting(layout):
            held.enter_context(step_lock(layout, name))
            _check_alone(name, layout)
            # DVC's commands see the step too: a `dvc repro` that would only check a cached train out (and
            # so runs no step) would replace the model under it
            run_id = run_of(layout, {"pid": os.getpid(), "host": socket.gethostname()})
            held.enter_context(dvc_stage_lock.marked(layout.root, name, run_id))
        yield


def _check_alone(name: str, layout: Layout) -> None:
    """One step at a time in a project folder: a step run beside another replaced the files that one reads
    (a `download` from the command line under a Dagster run's `train`: the run trained to its end and then
    failed on its changed input). Said before any change."""
    other = running_step(layout, [step for step in PIPELINE if step != name])
    if other is None:
        return
    run_id = run_of(layout, other.holder)
    by = f" (a step of the Dagster run {run_id})" if run_id else ""
    raise StepRunning(f"{name}: not run, nothing changed: {other}{by}. One step at a time in a project folder: "
                      "a step run beside another replaces the files that one reads, and it fails once it has "
                      "done its work. Run it again once that step has ended"
                      + (" (the run's next steps follow it: wait for the run's end, or terminate it)" if run_id
                         else ""))


def check_recordable(name: str, layout: Layout) -> None:
    """A UserError where DVC could not record the step's outputs in the project (`dvc repro`, or Dagster's
    DVC record): said before the step's work, not after it."""
    problem = linked_folder_above(layout.root, name)
    if problem:
        raise UserError(f"{name}: {problem}")


def _check_stage_params(root: Path) -> None:
    """Under `dvc repro`: a params.yaml without keys a later stage reads (an older project's) stops the
    first stage, naming them with their defaults, not the stage that reads them after the others ran."""
    missing = missing_stage_params(root)
    if not missing:
        return
    defaults = Params()
    said = []
    for entry in missing:
        key = entry.split(":", 1)[1]
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part, None)
        said.append(f"{key}: {json.dumps(value)}")
    keys = ", ".join(e.split(":", 1)[1] for e in missing)
    raise SettingsError(f"{missing[0].split(':')[0]} lacks {keys}, which stages of dvc.yaml read (a params file from "
                        f"an older version of this project?); `dvc repro` would stop at the first stage that reads "
                        f"one. Add them, the defaults being: {'; '.join(said)}")


def output_problem(output: Path, layout: Layout) -> str | None:
    """Why a step cannot write `output`, one of its folders: a file there, a link to nothing, or no room
    for the new folder beside it (checkpoints are written inside their folder, step-N, not beside it)."""
    return folder_problem(output) or (staging_problem(output) if output != layout.checkpoints else None)


def _undo_interrupted_record(layout: Layout) -> None:
    """A Dagster experiment record killed midway left its settings in params.yaml (and its dvc.lock): this
    step would run with them, and `dvc repro` lock them as the workspace's. Put back, and stop."""
    restored = restore_interrupted_record(layout.root)
    if restored:
        raise UserError(f"{' and '.join(restored)} held the settings of a DVC experiment record (a Dagster run) "
                        f"that was killed midway; they are put back as they were before it. Run the step again")


class ChangedWhileRunning(UserError):
    """The step's code or input changed while it ran."""


def _made_from(name: str, layout: Layout, params: Params) -> dict[str, Any]:
    """The step's code (what dvc.yaml and the Dagster code version cover: the CLI left out) and its
    input's record, as they are now (download's: the files of a local source, `inputs_read`); under `dvc repro` (which
    names the stage in DVC_STAGE) also the stage's params as their files hold them."""
    stage, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    inputs: dict[Any, Any] = {record: file_sha256(record) if record.exists() else None
                              for record in chain.records_read(name, layout)}
    watched = getattr(module(name), "inputs_read", None)  # a step's inputs beyond the chain's records
    if watched:
        inputs.update(watched(params))
    return {"code": code_hash(name), "input": inputs,
            "params": stage_params(Path(root), stage) if stage and root else None}


def _check_unchanged(name: str, layout: Layout, params: Params, before: dict[str, Any]) -> None:
    """DVC (and the Dagster record) hash a stage's code and input once it ended: had they changed while it
    ran, dvc.lock and the run cache would record an output as made by code or data it never saw. Such a
    run fails, so nothing records it; its output stays, its own record naming what it was made from."""
    after = _made_from(name, layout, params)
    changed = [what for what in ("code", "input", "params") if after[what] != before[what]]
    if changed:
        records = sorted(str(record) for record in after["input"].keys() | before["input"].keys()
                         if before["input"].get(record) != after["input"].get(record))
        what = {"code": f"the code of {name}", "input": f"its input ({', '.join(records)})",
                "params": f"the settings of the DVC stage {os.environ.get('DVC_STAGE')} (params.yaml)"}
        raise ChangedWhileRunning(
            f"{name}: {' and '.join(what[c] for c in changed)} changed while it ran; what it wrote was made from "
            f"them as they were when it started (its record says so), and is not recorded in DVC as made from "
            f"them as they are now: rerun {name}")

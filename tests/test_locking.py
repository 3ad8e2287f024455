"""One step at a time per project folder, and no temporaries left behind by killed steps."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rm_lib import cli
from rm_lib import steps as registry
from rm_lib.errors import UserError
from rm_lib.files import read_jsonl, start_ticks
from rm_lib.layout import Layout

from helpers import run_steps, tiny_params

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def _cli(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rm_lib", "--root", str(root), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout_s: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


_HOLD = ("import sys, time; from pathlib import Path; from rm_lib.layout import Layout; "
         "from rm_lib.pipeline.locking import step_lock\n"
         "with step_lock(Layout(Path({root!r})), {step!r}):\n"
         "    print('held', flush=True); time.sleep(600)\n")


def _hold_in_child(root: Path, step: str) -> subprocess.Popen:
    """Another process that takes `step`'s lock on `root` and sleeps holding it."""
    code = _HOLD.format(root=str(root), step=step)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith((".tmp", ".old")))


@pytest.mark.integration
def test_two_concurrent_trains_one_clean_run_and_one_refusal(tmp_path, tiny_decoder):
    settings = [f"model.name_or_path={tiny_decoder}", "download.demo_pairs=60", "filter.max_token_length=64",
                "filter.max_prompt_token_length=32", "train.max_steps=8", "train.batch_size=4",
                "train.logging_steps=1", "train.save_steps=4"]
    run_steps(tiny_params(*settings[1:], model=str(tiny_decoder)), tmp_path, "download", "tokenize", "filter")
    args = [a for s in settings for a in ("--set", s)]
    first = _cli(tmp_path, *args, "train")
    lock = tmp_path / ".rm_lib" / "locks" / "train.lock"
    metrics = Layout(tmp_path).live_log
    # Wait until the first is inside the step (it holds the lock, or, without locks, it has begun
    # logging), then stop it there so the second certainly runs while the first is mid-run.
    _wait_for(lambda: first.poll() is not None or metrics.exists()
              or (lock.exists() and f'"pid": {first.pid}' in lock.read_text()), what="the first train to start")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _cli(tmp_path, *args, "train")
        out2, err2 = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2, (out2 + err2)[-3000:]
    assert err2.strip().splitlines() == [f"error: train is already running in {tmp_path.resolve()}, pid {first.pid}"]
    steps = [r["step"] for r in read_jsonl(metrics) if "loss" in r]
    assert steps == list(range(1, 9))
    assert (Layout(tmp_path).model / "config.json").exists()
    assert not _temporaries(tmp_path)


def test_lock_of_a_killed_process_is_free(tmp_path):
    from rm_lib.pipeline.locking import step_lock

    child = _hold_in_child(tmp_path, "train")
    with pytest.raises(UserError, match=f"train is already running in .*, pid {child.pid}"):
        with step_lock(Layout(tmp_path), "train"):
            pass
    child.send_signal(signal.SIGKILL)
    child.wait()
    with step_lock(Layout(tmp_path), "train"):  # the kernel released it with the process
        assert f'"pid": {os.getpid()}' in Layout(tmp_path).lock("train").read_text()


def test_a_step_is_refused_while_another_step_runs_in_the_folder(tmp_path):
    """A `download` run from the command line under a Dagster run's `train` replaced the data that train read:
    the run trained to its end, then failed on its changed input. One step at a time in a folder now, said
    before any change, naming the Dagster run where the running step is one of its steps."""
    from rm_lib.pipeline.locking import RUN_CLAIM, claim, step_lock

    params = tiny_params()
    with step_lock(Layout(tmp_path), "train"):  # a second open file in this process conflicts like another process
        with pytest.raises(UserError, match="train is already running"):
            registry.run("train", params, Layout(tmp_path))
        with pytest.raises(UserError, match=re.escape(
                f"download: not run, nothing changed: train is already running in {tmp_path.resolve()}, pid "
                f"{os.getpid()}. One step at a time in a project folder")):
            registry.run("download", params, Layout(tmp_path))
    assert not Layout(tmp_path).pairs.exists()
    registry.run("download", params, Layout(tmp_path))  # once it ended
    before = (Layout(tmp_path).pairs / "manifest.json").read_bytes()

    child = _hold_in_child(tmp_path, "train")  # a Dagster run's train, as its claim records it
    run_id = "aaaaaaaa-0000-4000-8000-000000000001"
    claim(Layout(tmp_path), RUN_CLAIM, lambda current: {"run_id": run_id, "host": socket.gethostname(),
                                                        "processes": [[child.pid, start_ticks(child.pid)]],
                                                        "groups": [], "since": time.time()})
    try:
        result = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "download", "--set",
                                 "download.seed=7"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    finally:
        child.kill()
        child.wait()
    assert result.returncode == 2, result.stderr
    assert f"train is already running in {tmp_path.resolve()}, pid {child.pid} (a step of the Dagster run " \
           f"{run_id}). One step at a time" in result.stderr and "Traceback" not in result.stderr
    assert (Layout(tmp_path).pairs / "manifest.json").read_bytes() == before

    # a worker of a multi-process launch the run started: torch's launcher gives each its own session, and the
    # run records the launcher's group
    from rm_lib.pipeline.locking import run_of, running_step

    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]], "
         "start_new_session=True)", _HOLD.format(root=str(tmp_path), step="train")],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True, start_new_session=True)
    worker = None
    try:
        assert launcher.stdout.readline().strip() == "held"
        claim(Layout(tmp_path), RUN_CLAIM, lambda current: {**current, "processes": [], "groups": [launcher.pid]})
        worker = running_step(Layout(tmp_path), ["train"])
        assert worker.holder["pid"] != launcher.pid and run_of(Layout(tmp_path), worker.holder) == run_id
        # a step of the run itself is no other process's step to the run's next claim; another run's is
        assert running_step(Layout(tmp_path), ["train"], but_run=run_id) is None
        assert running_step(Layout(tmp_path), ["train"], but_run="another run").holder == worker.holder
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        if worker is not None and worker.holder.get("pid"):  # in a session of its own: not in the launcher's group
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.holder["pid"], signal.SIGKILL)


STARTS = """
import json, sys, time
from pathlib import Path
from rm_lib.errors import UserError
from rm_lib.layout import Layout
from rm_lib.steps import alone

root, step, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
outcomes = []
for trial in range(int(sys.argv[4])):
    at = start + 0.4 * trial
    time.sleep(max(0.0, at - time.time() - 0.02))
    while time.time() < at:  # both at one moment, to the microsecond: a sleep wakes a millisecond apart
        pass
    try:
        with alone(step, Layout(root / str(trial))):  # as rm_lib.steps.run starts a step, in a new folder
            time.sleep(0.2)
        outcomes.append("ran")
    except UserError:
        outcomes.append("refused")
print(json.dumps(outcomes))
"""


def test_of_two_steps_started_at_one_moment_one_runs(tmp_path):
    """Each step took its own lock, then looked at the others': two started at one moment each saw the
    other's lock, and most often both were refused, each naming the other."""
    start, trials = time.time() + 3.0, 12  # each trial in a new folder: its first steps make the lock folder
    children = [subprocess.Popen([sys.executable, "-c", STARTS, str(tmp_path), step, str(start), str(trials)],
                                 cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
                for step in ("download", "tokenize")]
    outcomes = [json.loads(child.communicate(timeout=60)[0]) for child in children]
    assert [sorted(pair) for pair in zip(*outcomes)] == [["ran", "refused"]] * trials, outcomes


def test_a_thread_waits_for_another_threads_start(tmp_path):
    """The depth that lets a process enter `starting` again was the whole process's: a second thread (a
    sensor beside a step in one code server) went on without the lock."""
    import threading

    from rm_lib.pipeline.locking import starting

    (tmp_path / ".rm_lib" / "locks").mkdir(parents=True)
    entered, waited = threading.Event(), []

    def hold():
        with starting(Layout(tmp_path)):
            entered.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(10)
    began = time.monotonic()
    with starting(Layout(tmp_path), wait_s=0.5):
        waited.append(time.monotonic() - began)
    holder.join()
    assert waited[0] >= 0.5


def test_run_takes_each_steps_lock_in_turn(tmp_path, tiny_decoder, capsys):
    from rm_lib.pipeline.locking import step_lock

    settings = ["--root", str(tmp_path), "--set", f"model.name_or_path={tiny_decoder}", "--set",
                "download.demo_pairs=40", "--set", "filter.max_token_length=256", "--set",
                "filter.max_prompt_token_length=128"]
    assert cli.main([*settings, "download"]) == 0
    with step_lock(Layout(tmp_path), "tokenize"):
        code = cli.main([*settings, "tokenize"])
    assert code == 2
    assert f"error: tokenize is already running in {tmp_path.resolve()}, pid {os.getpid()}" in capsys.readouterr().err
    assert not Layout(tmp_path).tokenized.exists()
    with step_lock(Layout(tmp_path), "tokenize"):  # any step of the run: refused before its first
        assert cli.main([*settings, "run"]) == 2
    assert "error: download: not run, nothing changed: tokenize is already running" in capsys.readouterr().err


def test_processes_after_the_first_of_a_launch_do_not_lock(tmp_path, monkeypatch):
    """accelerate/torchrun start one process per device, all in train: only rank 0 locks (the other steps
    run on rank 0 alone; download here stands for any step run where RANK is not 0)."""
    from rm_lib.pipeline.locking import step_lock

    monkeypatch.setenv("RANK", "1")
    with step_lock(Layout(tmp_path), "download"):
        registry.run("download", tiny_params(), Layout(tmp_path))


@pytest.mark.integration
def test_a_download_killed_mid_write_leaves_no_temporary(tmp_path):
    data = tmp_path / "data"
    child = _cli(tmp_path, "--set", "download.demo_pairs=200000", "download")

    def writing() -> bool:
        return child.poll() is not None or any((p / "train.jsonl").exists() for p in data.glob(".pairs.*.tmp"))

    _wait_for(writing, what="the download to start writing")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the download ended before it could be killed mid-write"
    assert list(data.glob(".pairs.*.tmp"))
    run_steps(tiny_params(), tmp_path, "download")
    assert not _temporaries(tmp_path)


def test_temporaries_of_dead_processes_go_and_of_live_ones_stay(tmp_path):
    from rm_lib import files as atomic

    data = tmp_path / "data"
    sleeper = subprocess.Popen(["sleep", "600"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live = data / f".pairs.{sleeper.pid}@{atomic.HOST}.abc123.tmp"
        gone = data / f".pairs.{dead.pid}@{atomic.HOST}.def456.tmp"
        legacy = data / ".pairs.k2j4h5g6.tmp"  # an older rm_lib's name, no pid: removed under the step's lock
        elsewhere = data / f".pairs.{dead.pid}@another-host.ghi789.tmp"  # a pid of another machine: not judged
        for folder in (live, gone, legacy, elsewhere):
            folder.mkdir(parents=True)
            (folder / "train.jsonl").write_text("{}\n")
        run_steps(tiny_params(), tmp_path, "download")
        assert _temporaries(tmp_path) == sorted([live, elsewhere])
    finally:
        sleeper.kill()
        sleeper.wait()


def _earlier_model_and_logs(root: Path) -> tuple[Path, Path]:
    model, logs = root / "models/reward_model", root / "data/train"
    for folder in (model, logs):
        folder.mkdir(parents=True)
        (folder / "run").write_text("earlier")
    return model, logs


def test_folders_that_belong_together_are_replaced_together_also_under_ctrl_c(tmp_path, monkeypatch, ctrl_c_raises):
    """train replaces the model and its run's records (data/train) as one: a Ctrl-C between the two
    left a model with another run's run.json, metrics and loss curve."""
    from rm_lib import files

    model, logs = _earlier_model_and_logs(tmp_path)
    real = files._replace_dir

    def replace_then_interrupt(tmp, path):
        real(tmp, path)
        if path == model:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the model is in place

    monkeypatch.setattr(files, "_replace_dir", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):  # it still stops the step: once both are in place
        with files.atomic_dirs(model, logs) as staged:
            for folder in staged:
                (folder / "run").write_text("new")
    assert [(f / "run").read_text() for f in (model, logs)] == ["new", "new"]
    assert not _temporaries(tmp_path)


_KILLED_BETWEEN_THE_REPLACES = """
import os, sys
from pathlib import Path
from rm_lib import files
real, calls = files._replace_dir, []
def replace_then_die(tmp, path):
    calls.append(path)
    if len(calls) == 2:
        os._exit(9)  # as a kill -9 would: no clean-up, no rollback
    return real(tmp, path)
files._replace_dir = replace_then_die
root = Path(sys.argv[1])
with files.atomic_dirs(root / "models/reward_model", root / "data/train") as staged:
    for folder in staged:
        (folder / "run").write_text("new")
"""


@pytest.mark.parametrize("swap, linked", [(True, False), (False, False), (True, True)],
                         ids=["names swapped in one step", "two renames", "a linked model folder"])
def test_a_set_a_kill_9_left_half_in_place_is_finished_by_the_next_step(tmp_path, swap, linked):
    """A kill -9 between train's two replaces left the new model beside the earlier run's records (and
    the earlier model in a temporary the next run deleted): evaluate scored it as that run's model. A
    model folder linked to another disk is finished where the link points."""
    from rm_lib import files
    from rm_lib.files import SET_MARK, finish_replacing

    model, logs = _earlier_model_and_logs(tmp_path)
    if linked:
        elsewhere = tmp_path / "disk" / "models" / "rm"  # not as deep as models/reward_model
        elsewhere.parent.mkdir(parents=True)
        model.rename(elsewhere)
        model.symlink_to(elsewhere)
    script = _KILLED_BETWEEN_THE_REPLACES if swap else _KILLED_BETWEEN_THE_REPLACES.replace(
        "files._replace_dir = replace_then_die", "files._replace_dir = replace_then_die\nfiles._exchange = "
                                                 "lambda _a, _b: False")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 9, done.stderr
    assert [(f / "run").read_text() for f in (model, logs)] == ["new", "earlier"]  # the mix a kill leaves
    # until finished, DVC's hashes and the project's own leave the mark out
    assert files.DVC_IGNORED.search(SET_MARK) and SET_MARK in (ROOT / ".dvcignore").read_text().splitlines()
    assert not finish_replacing(logs)  # no mark there: its folder is not yet in place
    registry._finish_interrupted_sets("evaluate", Layout(tmp_path))
    assert [(f / "run").read_text() for f in (model, logs)] == ["new", "new"]
    assert not any((f / SET_MARK).exists() for f in (model, logs))
    for folder in (model.resolve(), logs):
        files.remove_stale(folder.parent, folder.name)
    assert not _temporaries(tmp_path)


def test_a_set_is_finished_only_where_it_can_be(tmp_path):
    """Under train's lock no writer of the set is alive, whatever process has its pid now (a restarted
    container gives the next step the same one): finished. A writer on another host, whose lock this one
    may not see, or a folder of the set neither in place nor waiting while another waits: the mark stays,
    nothing is moved. A folder is in place only by its set's own mark: a mark another set left (a kill as
    marks were cleared) counted the earlier run's records as in place, and the new ones were deleted."""
    import json

    from rm_lib.files import HOST, SET_MARK, finish_replacing

    model, logs = _earlier_model_and_logs(tmp_path)
    waiting = tmp_path / "data" / ".train.1@x.ab.tmp"
    here = f"{os.getpid()}@{HOST}"

    def mark(folder: Path, writer: str, identity: str, tmp: str) -> None:
        (folder / SET_MARK).write_text(json.dumps({"writer": writer, "id": identity,
                                                   "set": [[".", "."], ["../../data/train", f"../../data/{tmp}"]]}))

    mark(model, "1@another-host", "s1", waiting.name)
    assert not finish_replacing(model) and (model / SET_MARK).exists()
    waiting.mkdir()
    (waiting / "run").write_text("new")
    (logs / SET_MARK).write_text(json.dumps({"id": "s0"}))  # left by an earlier set killed as it cleared marks
    (waiting / SET_MARK).write_text(json.dumps({"id": "s2"}))
    mark(model, here, "s2", waiting.name)
    assert finish_replacing(model) and [(f / "run").read_text() for f in (logs, waiting)] == ["new", "earlier"]
    assert not (model / SET_MARK).exists() and not (logs / SET_MARK).exists()
    # a set all in place, killed as it cleared its marks: the one left is cleared
    (logs / SET_MARK).write_text(json.dumps({"writer": here, "id": "s3", "set": [[".", "."]]}))
    assert finish_replacing(logs) and not (logs / SET_MARK).exists()
    # a folder neither in place nor waiting while another waits: nothing moved, the mark stays
    (waiting / SET_MARK).write_text(json.dumps({"id": "s4"}))
    (model / SET_MARK).write_text(json.dumps({"writer": here, "id": "s4", "set": [
        [".", "../.gone.tmp"], ["../../data/train", f"../../data/{waiting.name}"], ["../other", "../.other.tmp"]]}))
    assert not finish_replacing(model) and (model / SET_MARK).exists() and (logs / "run").read_text() == "new"
    (model / SET_MARK).unlink()
    # a normal replace leaves no mark behind
    from rm_lib import files

    with files.atomic_dirs(model, logs) as staged:
        for folder in staged:
            (folder / "run").write_text("new")
    assert not any((f / SET_MARK).exists() for f in (model, logs))


@pytest.mark.parametrize("swap", [True, False], ids=["names swapped in one step", "two renames"])
def test_a_replace_that_fails_halfway_puts_back_the_folders_replaced_before_it(tmp_path, monkeypatch, swap):
    import errno

    from rm_lib import files

    if not swap:
        monkeypatch.setattr(files, "_exchange", lambda _a, _b: False)
    model, logs = _earlier_model_and_logs(tmp_path)
    real = files._replace_dir

    def full_disk_at_the_second(tmp, path):
        if path == logs:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tmp, path)

    monkeypatch.setattr(files, "_replace_dir", full_disk_at_the_second)
    with pytest.raises(OSError, match="No space left"):
        with files.atomic_dirs(model, logs) as staged:
            for folder in staged:
                (folder / "run").write_text("new")
    assert [(f / "run").read_text() for f in (model, logs)] == ["earlier", "earlier"]
    assert not _temporaries(tmp_path)


def test_a_folder_is_replaced_with_no_moment_missing(tmp_path, monkeypatch):
    """Two renames (the earlier folder aside, the new one in) left no folder at all to a step killed
    between them; a later push then found no release to hold a worse model to."""
    from rm_lib import files

    if not files._exchange(tmp_path, tmp_path):
        pytest.skip("this system swaps no two names in one step (Linux renameat2)")
    release = tmp_path / "data/release"
    release.mkdir(parents=True)
    (release / "evaluation.json").write_text("earlier")

    def no_rename(*_args):
        raise AssertionError("a rename leaves a moment with no folder")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with files.atomic_dir(release) as staged:
        (staged / "evaluation.json").write_text("new")
    assert (release / "evaluation.json").read_text() == "new" and not _temporaries(tmp_path)


def test_a_full_disk_while_an_output_is_written_names_the_output(tmp_path):
    """A write that runs out of room raises an OSError naming no file (and safetensors' error is no
    OSError): the step's error named neither the output nor the disk, with a traceback."""
    import errno

    from rm_lib import files

    class SafetensorError(Exception):
        pass

    target = tmp_path / "data/evaluation/report.json"
    with pytest.raises(OSError) as caught, files.atomic_file(target) as handle:
        handle.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    model = tmp_path / "models/reward_model"
    with pytest.raises(OSError) as caught, files.atomic_dir(model):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(model))
    # past a file-size limit (FAT32's 4 GiB, `ulimit -f`): a traceback it was
    with pytest.raises(OSError) as caught, files.atomic_dir(model):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert (caught.value.errno, caught.value.filename) == (errno.EFBIG, str(model))
    with pytest.raises(OSError) as caught, files.atomic_dirs(model, tmp_path / "data/train"):
        raise OSError(errno.ENOSPC, "No space left on device")  # which of the two is unknown: where both are
    assert caught.value.filename == str(tmp_path)
    # a file written inside a staged folder: named where it goes, not in the temporary folder gone since
    with pytest.raises(OSError) as caught, files.atomic_dir(tmp_path / "data/tokenized") as out:
        with files.atomic_file(out / "train.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(tmp_path / "data/tokenized/train.jsonl")
    with pytest.raises(ValueError), files.atomic_dir(model):  # any other failure as it came
        raise ValueError("not the disk")
    assert not any(tmp_path.rglob("*.tmp")) and not model.exists()


def test_a_folder_that_refuses_a_temporary_is_named_not_the_temporary(tmp_path, monkeypatch):
    import tempfile

    from rm_lib import files

    def refused(prefix, suffix, dir):
        raise PermissionError(1, "Operation not permitted", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError) as caught, files.atomic_dir(tmp_path / "data/evaluation"):
        pass
    assert caught.value.filename == str(tmp_path / "data")


def test_a_linked_output_whose_parent_takes_no_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """models/reward_model linked to /scratch/$USER, /scratch not writable: train trained for its whole run,
    then failed with `error: /scratch: Permission denied` (and reused that run when rerun, failing again)."""
    import tempfile

    from rm_lib.errors import UserError

    scratch = tmp_path / "scratch"
    (scratch / "alice").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/pairs").symlink_to(scratch / "alice")
    real = tempfile.TemporaryFile

    def probe(*args, dir=None, **kwargs):  # as a user who may not write in /scratch finds it (root may)
        if Path(dir) == scratch:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", probe)
    with pytest.raises(UserError, match=rf"download: {tmp_path}/data/pairs is a link to {scratch}/alice; the step "
                                        rf"builds its new folder beside that one and swaps it in, and no file can be "
                                        rf"written in {scratch} \(Permission denied\)"):
        run_steps(tiny_params(), tmp_path, "download")
    assert not any(scratch.rglob("*.jsonl")) and not any(tmp_path.glob("data/.*"))
    # checkpoints are written inside their folder (step-N), so a linked one needs no room beside it
    from rm_lib.steps import output_problem

    layout = Layout(tmp_path)
    layout.checkpoints.parent.mkdir()
    layout.checkpoints.symlink_to(scratch / "alice")
    assert output_problem(layout.checkpoints, layout) is None


def test_an_earlier_output_made_read_only_is_replaced_and_leaves_no_hidden_copy(tmp_path):
    """The earlier output, swapped out for the new one, was removed with its errors ignored: a read-only
    one stayed as data/.release.<pid>@host.*.tmp (88 MB of a release) for good."""
    import shutil

    out = tmp_path / "data/release"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter/weights.bin").write_text("old")
    for folder in (out / "adapter", out):
        folder.chmod(0o555)
    command = [sys.executable, "-c", "import sys\nfrom rm_lib.files import atomic_dir\n"
               "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'new.txt').write_text('new')", str(out)]
    if os.geteuid() == 0:  # root writes in read-only folders: without that power, as a user would
        if shutil.which("setpriv") is None:
            pytest.skip("needs util-linux's setpriv to run without root's permission override")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["release"]


def test_an_output_folder_that_is_a_file_or_a_link_to_nothing_is_refused_before_any_work(tmp_path):
    """A file where a step writes its folder was swapped aside into a temporary (and deleted by the next
    run's clean-up); a link to a missing folder failed after the work, naming a temporary."""
    layout = Layout(tmp_path)
    layout.pairs.parent.mkdir(parents=True)
    layout.pairs.write_text("notes of mine")
    with pytest.raises(UserError, match=f"download: {layout.pairs} is a file, not a folder, and the step writes a "
                                        "folder there: move the file away"):
        run_steps(tiny_params(), tmp_path, "download")
    assert layout.pairs.read_text() == "notes of mine" and sorted(os.listdir(layout.pairs.parent)) == ["pairs"]
    layout.pairs.unlink()
    layout.pairs.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=f"{layout.pairs} is a link to {tmp_path / 'elsewhere'}, which does not "
                                        "exist: make that folder, or remove the link"):
        run_steps(tiny_params(), tmp_path, "download")
    # the folders that hold them, and the locks' (a bare "File exists" it was)
    layout.pairs.unlink()
    for folder in ("data", ".rm_lib", ".rm_lib/locks"):
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        shutil.rmtree(tmp_path / ".rm_lib", ignore_errors=True)
        (tmp_path / folder).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / folder).write_text("a file")
        with pytest.raises(UserError, match=f"download: {tmp_path / folder} is a file, not a folder"):
            run_steps(tiny_params(), tmp_path, "download")
        (tmp_path / folder).unlink()


def test_an_output_folder_linked_to_another_disk_is_written_there_and_stays_linked(tmp_path):
    """A user who moved an output to another disk and linked it back: the link was replaced by a new
    folder on the project's disk, and the moved folder left behind as a stray temporary link."""
    layout = Layout(tmp_path / "project")
    elsewhere = tmp_path / "other-disk/pairs"
    elsewhere.mkdir(parents=True)
    (elsewhere / "old.txt").write_text("earlier")
    layout.pairs.parent.mkdir(parents=True)
    layout.pairs.symlink_to(elsewhere)
    run_steps(tiny_params(), layout.root, "download")
    assert layout.pairs.is_symlink() and layout.pairs.resolve() == elsewhere
    assert (elsewhere / "manifest.json").is_file() and not (elsewhere / "old.txt").exists()
    assert sorted(os.listdir(layout.pairs.parent)) == ["pairs"]  # no stray temporary beside the link
    assert sorted(os.listdir(elsewhere.parent)) == ["pairs"]  # nor beside the folder
    # killed between two renames (no renameat2 exchange, as on NFS): put back where the link points
    elsewhere.rename(elsewhere.with_name(".pairs.old"))
    run_steps(tiny_params(), layout.root, "download")
    assert sorted(os.listdir(elsewhere.parent)) == ["pairs"] and layout.pairs.resolve() == elsewhere
    # a linked file is replaced, never written through: with DVC's cache.type=symlink the link's file
    # is DVC's cache, which holds the content its name hashes
    from rm_lib.files import write_json

    cached = tmp_path / "cache/ab/cdef"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")
    (layout.root / "report.json").symlink_to(cached)
    write_json(layout.root / "report.json", {"accuracy": 1})
    assert cached.read_text() == "{}" and not (layout.root / "report.json").is_symlink()


def test_dvc_is_not_asked_to_record_outputs_under_a_linked_folder(tmp_path, monkeypatch):
    """models/ moved to another disk and linked back: `dvc repro` trained for the whole run, then failed
    ("models/reward_model is outside of git repository") and left dvc.lock as it was; Dagster's record of
    the step the same. Both refuse before any work, by the outputs dvc.yaml declares (data/filtered holds
    files DVC records one by one); the CLI writes through the link, and an output DVC records whole may
    itself be a link."""
    import dagster as dg

    from orchestration.assets import _recordable
    from orchestration.resources import DvcResource, ProjectResource

    project = Path(__file__).resolve().parents[1]
    layout = Layout(tmp_path / "project")
    (layout.root / ".dvc").mkdir(parents=True)
    shutil.copy(project / "dvc.yaml", layout.root)
    (tmp_path / "other-disk/models").mkdir(parents=True)
    layout.model.parent.symlink_to(tmp_path / "other-disk/models")
    # git ignores the link as it ignores the folder (`/models/` matched a folder only: `git add -A` took the link)
    shutil.copy(project / ".gitignore", layout.root)
    subprocess.run(["git", "init", "-q", str(layout.root)], check=True)
    for linked in (".venv", ".venv-dvc"):  # environments linked in from elsewhere too
        (layout.root / linked).symlink_to(tmp_path / "other-disk")
    for linked in ("models", ".venv", ".venv-dvc"):
        assert subprocess.run(["git", "-C", str(layout.root), "check-ignore", "-q", linked]).returncode == 0, linked
    said = (f"train: models is a link (to {tmp_path / 'other-disk/models'}): DVC records no output under a linked "
            "folder (models/reward_model would lie outside the repository) and would fail once the step has run; keep "
            "models a folder of the project and link models/reward_model itself, which DVC records whole")
    monkeypatch.setenv("DVC_STAGE", "train")
    with pytest.raises(UserError, match=re.escape(said)):
        run_steps(tiny_params(), layout.root, "train")  # no data: refused before the chain's checks
    with pytest.raises(dg.Failure, match=re.escape(said)):
        _recordable(DvcResource(), ProjectResource(root=str(layout.root)), "train", layout)
    _recordable(DvcResource(enabled=False), ProjectResource(root=str(layout.root)), "train", layout)
    monkeypatch.delenv("DVC_STAGE")
    unfiltered = "manifest.json: not found; run the step that writes it first"
    with pytest.raises(UserError, match=unfiltered):  # the CLI's run goes on
        run_steps(tiny_params(), layout.root, "train")
    monkeypatch.setenv("DVC_STAGE", "train")
    layout.model.parent.unlink()
    layout.model.parent.mkdir()
    layout.model.symlink_to(tmp_path / "other-disk/models")
    with pytest.raises(UserError, match=unfiltered):
        run_steps(tiny_params(), layout.root, "train")
    _recordable(DvcResource(), ProjectResource(root=str(layout.root)), "train", layout)
    # an output folder whose files DVC records one by one: the folder itself may not be a link
    (tmp_path / "other-disk/filtered").mkdir()
    layout.filtered.parent.mkdir(parents=True)
    layout.filtered.symlink_to(tmp_path / "other-disk/filtered")
    monkeypatch.setenv("DVC_STAGE", "filter")
    said = (f"filter: data/filtered is a link (to {tmp_path / 'other-disk/filtered'}): DVC records no output under "
            "a linked folder (data/filtered/train.parquet would lie outside the repository) and would fail once the "
            "step has run; keep data/filtered a folder of the project")
    with pytest.raises(UserError, match=re.escape(said) + "$"):
        run_steps(tiny_params(), layout.root, "filter")
    # a dvc.yaml DVC cannot read is DVC's to name, not this check's
    from rm_lib.pipeline.dvc_record import linked_folder_above

    for broken in ("stages: {filter: python -m rm_lib filter}\n", "stages: [\n", "stages: {filter: {outs: 5}}\n",
                   "stages: {filter: {outs: [{}]}}\n", "stages: {filter: {outs: [{1: {}}]}}\n"):
        (layout.root / "dvc.yaml").write_text(broken)
        assert linked_folder_above(layout.root, "filter") is None


def test_a_step_killed_between_two_renames_gets_its_earlier_output_back(tmp_path):
    """Where the system cannot swap, a kill between the renames leaves the earlier folder as .<name>.old:
    the step's next run puts it back before it reads or replaces anything."""
    from rm_lib.errors import DataError

    run_steps(tiny_params(), tmp_path, "download")
    pairs = Layout(tmp_path).pairs
    manifest = (pairs / "manifest.json").read_text()
    pairs.rename(pairs.with_name(".pairs.old"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n')
    with pytest.raises(DataError, match="no usable pairs"):  # a failed download keeps the last good pairs
        registry.run("download", tiny_params(f"download.source={bad}"), Layout(tmp_path))
    assert (pairs / "manifest.json").read_text() == manifest
    assert not pairs.with_name(".pairs.old").exists()


def test_a_killed_writers_earlier_copies_are_removed_and_a_ctrl_c_waits_for_the_whole_set(tmp_path, monkeypatch,
                                                                                        ctrl_c_raises):
    """score keeps each file it replaces as .<name>.<pid>@<host>.<random>.earlier until its set is in place:
    a kill -9 left them for good (remove_stale knew only .tmp). And a Ctrl-C right after the output was
    replaced left it beside an earlier run's rejects, which the step removed only afterwards."""
    from rm_lib import files

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid names a writer that is gone
    out, rejects = tmp_path / "out.jsonl", tmp_path / "out.jsonl.rejects.jsonl"
    out.write_text("earlier")
    rejects.write_text("earlier run's rejects")
    left = tmp_path / f".out.jsonl.{finished.pid}@{files.HOST}.ab12cd.earlier"
    left.write_text("earlier")
    real = os.replace

    def replace_then_interrupt(source, target, *args):
        real(source, target, *args)
        if Path(target) == out:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):  # it still stops: once the set is as the block made it
        with files.atomic_files(out, remove=[rejects]) as (handle,):
            handle.write("new")
    assert out.read_text() == "new" and not rejects.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # the killed writer's copy too

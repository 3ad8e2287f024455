"""Checkpoints never lose work: another run's are kept until this run saved its own, a damaged one is
skipped for the newest intact one, a reused run reports the run that trained, outputs are shared 0644/0755."""
import json
import os
import re
import shutil
import signal
from pathlib import Path
from unittest import mock

import pytest
import torch

from rm_lib.errors import DataError, TrainingDiverged
from rm_lib.files import read_json

from helpers import fit_tiny, run_steps, tiny_params, write_jsonl


def _fingerprints(folder: Path) -> dict[str, str]:
    return {p.name: json.loads((p / "trainer_state.json").read_text())["fingerprint"]
            for p in sorted(folder.glob("step-*"))}


def test_a_changed_run_keeps_the_earlier_checkpoints_until_it_saved_its_own(tmp_path, tiny_decoder):
    first = tiny_params("train.max_steps=3", "train.save_steps=1", "train.save_total_limit=3", model=str(tiny_decoder))
    run_steps(first, tmp_path, "download", "tokenize", "filter", "train")
    checkpoints = tmp_path / "models/checkpoints"
    earlier = _fingerprints(checkpoints)
    assert list(earlier) == ["step-1", "step-2", "step-3"]

    # a changed run that diverges before its first checkpoint: the earlier run's are all still there
    diverging = tiny_params("train.max_steps=6", "train.save_steps=100", "train.learning_rate=1e30",
                            "train.max_grad_norm=1e30", model=str(tiny_decoder))
    with pytest.raises(TrainingDiverged) as caught:
        run_steps(diverging, tmp_path, "train")
    assert _fingerprints(checkpoints) == earlier
    assert "last good checkpoint" not in str(caught.value) and "no checkpoint of this run" in str(caught.value)
    assert run_steps(first, tmp_path, "train")["train"].resumed_from == 3  # the earlier run is still resumable

    # a changed run that saves: from then on only its own checkpoints are kept (none of the earlier run's)
    changed = tiny_params("train.max_steps=2", "train.save_steps=1", "train.learning_rate=2e-5",
                          model=str(tiny_decoder))
    run_steps(changed, tmp_path, "train")
    kept = _fingerprints(checkpoints)
    assert list(kept) == ["step-1", "step-2"] and len(set(kept.values()) | set(earlier.values())) == 2


def test_a_run_that_passes_over_another_runs_checkpoint_says_what_differs(tmp_path, tiny_decoder, capsys,
                                                                            monkeypatch):
    """An upgrade that changed the training code (a new progress line was enough) trained an interrupted
    run from step 0 without a word: the checkpoint it passed over, and why, are said in one line."""
    from rm_lib.steps import train as train_step

    first = tiny_params("train.max_steps=4", "train.save_steps=2", model=str(tiny_decoder))
    run_steps(first, tmp_path, "download", "tokenize", "filter", "train")
    checkpoints = tmp_path / "models/checkpoints"
    shutil.rmtree(checkpoints / "step-4")  # as if stopped after step 3
    capsys.readouterr()
    real_hash = train_step.code_hash
    monkeypatch.setattr(train_step, "code_hash", lambda step: "0" * 16 if step == "train" else real_hash(step))
    run_steps(tiny_params("train.max_steps=4", "train.save_steps=2", "train.learning_rate=2e-5",
                          model=str(tiny_decoder)), tmp_path, "train")
    said = capsys.readouterr().out
    assert (f"train: {checkpoints / 'step-2'} is another run's (other settings: train.learning_rate; other training "
            "code (rm_lib changed, an upgrade or an edit)), never resumed by this one: training from step 0; it stays "
            "until this run saves a checkpoint of its own") in said, said


def test_diverging_after_a_checkpoint_names_that_checkpoint(tmp_path, tiny_decoder):
    params = tiny_params("train.max_steps=6", "train.save_steps=1", "train.learning_rate=1e30",
                         "train.max_grad_norm=1e30", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    with pytest.raises(TrainingDiverged) as caught:
        run_steps(params, tmp_path, "train")
    named = str(caught.value).rsplit(" ", 1)[-1].rstrip(".")
    assert Path(named).name.startswith("step-") and (Path(named) / "trainer_state.json").exists()


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.json"])
def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, tiny_decoder, capsys, damaged):
    overrides = ("train.save_steps=1", "train.save_total_limit=3")
    _, whole, _ = fit_tiny(tmp_path, tiny_decoder, *overrides)
    target = tmp_path / "checkpoints/step-3" / damaged
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])
    capsys.readouterr()
    result, resumed, _ = fit_tiny(tmp_path, tiny_decoder, *overrides)
    out = capsys.readouterr().out
    assert result.resumed_from == 2
    notes = [line for line in out.splitlines() if "step-3" in line and "damaged" in line]
    assert len(notes) == 1 and "step-2" in notes[0], out
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # the resumed run ends where the whole one did


def test_a_base_model_folder_changed_in_place_is_another_run_not_the_finished_one(tmp_path, tiny_decoder, capsys):
    """The fingerprint named the base by its path: a finished run was reused after the folder's weights
    changed, one fingerprint stood for two models, and the card named a base it never trained from."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_decoder, base)
    params = tiny_params("train.max_steps=2", model=str(base))
    first = run_steps(params, tmp_path / "p", "download", "tokenize", "filter", "train")["train"]
    summary = read_json(tmp_path / "p/data/train/summary.json")
    assert summary["base_content"].startswith("sha256:") and summary["base_content"] == first.base_content
    weights = load_file(base / "model.safetensors")
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    capsys.readouterr()
    again = run_steps(params, tmp_path / "p", "train")["train"]
    assert not again.reused and again.fingerprint != first.fingerprint and again.base_content != first.base_content
    assert "another base model" in capsys.readouterr().out  # the earlier run's checkpoint, passed over
    # a checkpoint saved before the content was recorded: said so, not "another base model"
    from rm_lib.training.checkpoints import what_differs

    ours = {"train": {}, "model": {"name_or_path": str(base), "content": again.base_content}, "data": "d",
            "code": "c", "processes": 1}
    before = {**ours, "model": {"name_or_path": str(base)}}
    assert what_differs(before, ours) == "a base model whose content an earlier version did not record"


def test_a_rerun_of_a_finished_run_says_so_and_reports_the_run_that_trained(tmp_path, tiny_decoder, monkeypatch):
    from rm_lib.steps import train as train_step

    params = tiny_params("train.max_steps=3", model=str(tiny_decoder))
    trained = run_steps(params, tmp_path, "download", "tokenize", "filter", "train")["train"]
    (tmp_path / "data/train/metrics.jsonl").unlink()  # the figures must not depend on the log
    scored = []
    monkeypatch.setattr(train_step, "score_pairs_across", lambda *a, **k: scored.append(a) or ([], []))
    again = run_steps(params, tmp_path, "train")["train"]
    # the normalisation stats are the finished run's: no training pair scored again (minutes at real lengths)
    assert not scored and (again.reward_mean, again.reward_std) == (trained.reward_mean, trained.reward_std)
    assert read_json(tmp_path / "models/reward_model/config.json")["reward_mean"] == trained.reward_mean is not None
    assert "already trained at step 3; reused" in again.summary()
    assert not re.search(r"(?<![\d.])0 tokens/s", again.summary())  # the figures of the run that trained
    assert again.tokens_per_s == pytest.approx(trained.tokens_per_s) and trained.tokens_per_s > 0
    assert again.wall_s == pytest.approx(trained.wall_s) and trained.wall_s > 0
    assert (again.final_loss, again.final_accuracy) == (trained.final_loss, trained.final_accuracy)
    summary = read_json(tmp_path / "data/train/summary.json")
    assert summary["reused"] is True and summary["final_loss"] == trained.final_loss
    assert summary["tokens_per_s"] == pytest.approx(trained.tokens_per_s)
    # a summary damaged since (cut short): the stats are scored again, where a traceback ended the rerun
    monkeypatch.undo()
    (tmp_path / "data/train/summary.json").write_text('{"truncated')
    damaged = run_steps(params, tmp_path, "train")["train"]
    assert damaged.reward_mean == pytest.approx(trained.reward_mean, abs=1e-5) and damaged.reused
    assert read_json(tmp_path / "data/train/summary.json")["fingerprint"] == summary["fingerprint"]
    # elsewhere a damaged record is one line naming it
    from rm_lib.errors import DataError

    bad = tmp_path / "bad.json"
    bad.write_text('{"truncated')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(.*\): damaged since the step"):
        read_json(bad)


def test_a_run_reused_or_resumed_with_other_unfingerprinted_settings_records_what_trained_it(tmp_path, tiny_decoder):
    """A rerun of a finished run with attention=eager, logging_steps=3 and a smaller forward budget reused
    it and rewrote run.json, summary.json and so the card with those settings, never trained with."""
    import shutil

    params = tiny_params("train.max_steps=4", "train.save_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    first = read_json(tmp_path / "data/train/summary.json")
    other = tiny_params("train.max_steps=4", "train.save_steps=2", "train.attention=eager", "train.logging_steps=3",
                        "train.max_tokens_per_forward=50", model=str(tiny_decoder))
    assert run_steps(other, tmp_path, "train")["train"].reused
    again = read_json(tmp_path / "data/train/summary.json")
    assert again["device_plan"] == first["device_plan"] and again["device_plan"]["tokens_per_forward"] != 50
    assert again["train"] == first["train"] == read_json(tmp_path / "data/train/run.json")["train"]
    assert (again["train"]["attention"], again["train"]["logging_steps"]) == ("auto", 1)

    # a checkpoint saved before sessions were kept: its summary.json says what trained it
    from rm_lib.training import checkpoints

    state = tmp_path / "models/checkpoints/step-4" / checkpoints.STATE_FILE
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "sessions"}))
    checkpoints.write_checksums(state.parent)
    assert run_steps(other, tmp_path, "train")["train"].reused
    old = read_json(tmp_path / "data/train/summary.json")
    assert (old["train"], old["device_plan"]) == (first["train"], first["device_plan"])

    shutil.rmtree(tmp_path / "models/checkpoints/step-4")  # as if killed after step 3: resumed with the others
    import torch

    from rm_lib.publish import model_card

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads != 1 else 2)  # and on another thread count, which rounds otherwise
    try:
        assert run_steps(other, tmp_path, "train")["train"].resumed_from == 2
    finally:
        torch.set_num_threads(threads)
    summary = read_json(tmp_path / "data/train/summary.json")
    sessions = summary["sessions"]
    assert [s["steps"] for s in sessions] == [[0, 2], [2, 4]]  # the checkpoint of step 2 knew steps 1-2
    assert [s["train"]["max_tokens_per_forward"] for s in sessions] == ["auto", 50]
    assert sessions[1]["device_plan"]["tokens_per_forward"] == 50
    # the card names both: the model is what the two trained, and a run on either alone rounds otherwise
    assert [a["threads"] for a in model_card._arithmetic(summary)] == [threads, 1 if threads != 1 else 2]


@pytest.mark.parametrize(("field", "bad"), [("input_ids_chosen", 500000), ("input_ids_rejected", -5)])
def test_pretokenized_ids_outside_the_vocabulary_stop_at_tokenize(tmp_path, tiny_decoder, field, bad):
    rows = [{"input_ids_chosen": [5, 6, 7 + i], "input_ids_rejected": [5, 8, 9 + i]} for i in range(40)]
    for row in rows:
        row[field] = row[field] + [bad]
    source = write_jsonl(tmp_path / "pretokenized.jsonl", rows)
    params = tiny_params(f"download.source={source}", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download")
    with pytest.raises(DataError) as caught:
        run_steps(params, tmp_path, "tokenize")
    message = str(caught.value)
    assert "data/pairs/train.jsonl" in message and "row 1" in message and f"field '{field}'" in message
    assert str(bad) in message and "vocabulary" in message


@pytest.mark.parametrize(("umask", "folders", "files"), [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664),
                                                         (0o077, 0o700, 0o600)])
def test_outputs_checkpoints_and_locks_get_the_modes_the_umask_gives(tmp_path, tiny_decoder, umask, folders, files):
    """Written 0644 in 0755 folders whatever the umask: under a team's 002 the teammate's next step could
    neither take a lock file (every step "Permission denied") nor replace an output, and under 077 the data
    went world-readable. A setgid project folder's group stays on what the steps make in it."""
    import stat

    project = tmp_path / "project"
    project.mkdir()
    project.chmod(0o2775)  # a team's folder: what is made in it takes its group
    params = tiny_params("train.max_steps=2", "train.save_steps=1", model=str(tiny_decoder))
    before = os.umask(umask)
    try:
        run_steps(params, project, "download", "tokenize", "filter", "train")
    finally:
        os.umask(before)
    tops = [project / "models/reward_model", project / "models/checkpoints", project / "data/pairs",
            project / "data/train"]
    for top in tops:
        for folder, _dirs, names in os.walk(top):
            mode = os.stat(folder).st_mode
            assert (stat.S_IMODE(mode) & 0o777, bool(mode & stat.S_ISGID)) == (folders, True), folder
            for name in names:
                assert stat.S_IMODE(os.stat(Path(folder) / name).st_mode) == files, Path(folder) / name
    locks = list((project / ".rm_lib/locks").glob("*.lock"))
    assert locks and {stat.S_IMODE(os.stat(lock).st_mode) for lock in locks} == {files}


def test_a_checkpoint_another_user_keeps_where_this_run_saves_is_named(tmp_path, tiny_decoder, monkeypatch):
    """A teammate's step-2 (made under umask 022) stood where this run saved its own: the rename failed at
    the run's end with "Directory not empty" on the temporary, which stayed."""
    from rm_lib.training import checkpoints

    params = tiny_params("train.max_steps=2", "train.save_steps=1", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    theirs = tmp_path / "models/checkpoints/step-2"
    theirs.mkdir(parents=True)
    (theirs / "state.json").write_text("{}")
    monkeypatch.setattr(checkpoints, "remove_tree", lambda path, said=True: None)  # not this user's to remove
    with pytest.raises(PermissionError) as caught:
        run_steps(params, tmp_path, "train")
    assert caught.value.filename == str(theirs)
    assert not (tmp_path / "models/checkpoints/.step-2.tmp").exists()


def test_a_lock_file_or_earlier_copy_another_user_keeps_is_named_with_its_owner(tmp_path, monkeypatch, capsys):
    """A lock file a teammate made under umask 022 stopped every step with a bare "Permission denied"; the
    earlier copy of an output that could not be removed (the teammate's) stayed without a word, and so did
    checkpoints past save_total_limit. A path of this user's own is named as before, with no owner."""
    import pwd
    import shutil

    from rm_lib import cli, files
    from rm_lib.errors import UserError

    if os.geteuid() != 0:
        pytest.skip("making files another user owns needs root (chown)")
    nobody = pwd.getpwuid(65534).pw_name
    lock = tmp_path / ".rm_lib/locks/train.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert files.not_yours(lock) is None  # this user's
    os.chown(lock, 65534, -1)
    real_open = os.open

    def refused(path, *args, **kwargs):  # root opens anything: as the teammate, who may not
        if str(path) == str(lock):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", refused)
    with pytest.raises(UserError) as caught:
        files.open_lock(lock)
    monkeypatch.setattr(files.os, "open", real_open)
    assert str(caught.value) == (f"{lock}: permission denied: it is {nobody}'s and not writable for you. In a project "
                                 f"folder a team shares, run every step under umask 002; `chmod g+w {lock}` (as "
                                 f"{nobody}) mends what was made before")
    # one not made yet, in the teammate's folder: the mend is the folder's
    os.chown(lock.parent, 65534, -1)
    assert files.not_yours(lock.parent / "tokenize.lock") == (
        f"its folder is {nobody}'s and not writable for you. In a project folder a team shares, run every step under "
        f"umask 002; `chmod -R g+w {lock.parent}` (as {nobody}) mends what was made before")
    copy = tmp_path / "data/.pairs.123@host.abc.tmp"
    copy.mkdir(parents=True)
    os.chown(copy, 65534, -1)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # as where the folder is not this user's to write
    files.remove_tree(copy)
    assert capsys.readouterr().err == (f"warning: {copy} ({nobody}'s) could not be removed: its owner can remove it; "
                                       "in a project folder a team shares, run every step under umask 002\n")
    monkeypatch.undo()
    # any other path of the project the step may not write (an interrupted set's mark in the teammate's folder):
    # the CLI's line names whose it is and the mend; one of this user's own, as before
    mark = tmp_path / "models/reward_model/.rm_lib-set.json"
    mark.parent.mkdir(parents=True)
    mark.write_text("{}")

    def refused_step(step, params, layout):
        raise PermissionError(13, "Permission denied", str(mark))

    monkeypatch.setattr(cli, "_run_step", refused_step)
    assert cli.main(["--root", str(tmp_path), "evaluate"]) == 2
    assert capsys.readouterr().err == f"error: {mark}: Permission denied\n"
    os.chown(mark, 65534, -1)
    assert cli.main(["--root", str(tmp_path), "evaluate"]) == 2
    assert capsys.readouterr().err == (f"error: {mark}: Permission denied: it is {nobody}'s and not writable for you. "
                                       "In a project folder a team shares, run every step under umask 002; `chmod "
                                       f"g+w {mark}` (as {nobody}) mends what was made before\n")


def test_a_resume_restores_the_metrics_log_that_dvc_deleted(tmp_path, tiny_decoder):
    """`dvc repro` deletes data/train/metrics.jsonl before train runs; the checkpoint resumed from
    holds the lines logged up to it."""
    import shutil

    from rm_lib.files import read_jsonl

    params = tiny_params("train.max_steps=4", "train.save_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    shutil.rmtree(tmp_path / "models/checkpoints/step-4")  # as if killed after step 3
    (tmp_path / "data/train/metrics.jsonl").unlink()
    result = run_steps(params, tmp_path, "train")["train"]
    assert result.resumed_from == 2
    assert [r["step"] for r in read_jsonl(tmp_path / "data/train/metrics.jsonl")] == [1, 2, 3, 4]


def test_an_interrupted_run_leaves_the_last_runs_log_with_its_model(tmp_path, tiny_decoder, ctrl_c_raises):
    """The release gate reads data/train/metrics.jsonl beside run.json: a run that stops part way (a
    kill, a crash) must not leave its own lines there against the last finished run's model. Its
    lines are in the live log beside the checkpoints, where a resume finds them."""
    from rm_lib.files import read_jsonl
    from rm_lib.layout import Layout
    from rm_lib.steps import train

    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    finished = {name: (tmp_path / "data/train" / name).read_bytes() for name in ("metrics.jsonl", "run.json")}

    def stop_at_step_3(record):
        if record["step"] == 3:
            raise RuntimeError("stopped part way (a stand-in for a kill)")

    with pytest.raises(RuntimeError, match="stopped part way"):
        train.run(tiny_params("train.max_steps=6", model=str(tiny_decoder)), Layout(tmp_path), on_log=stop_at_step_3)
    assert {name: (tmp_path / "data/train" / name).read_bytes() for name in finished} == finished
    assert [r["step"] for r in read_jsonl(tmp_path / "data/train/metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_jsonl(Layout(tmp_path).live_log)] == [1, 2, 3]
    # Ctrl-C as the finished run replaces the model: the model and its records still come as one
    from rm_lib import files

    real = files._replace_dir

    def replace_then_interrupt(tmp, path):
        real(tmp, path)
        if path == Layout(tmp_path).model:
            os.kill(os.getpid(), signal.SIGINT)

    with mock.patch.object(files, "_replace_dir", replace_then_interrupt), pytest.raises(KeyboardInterrupt):
        train.run(tiny_params("train.max_steps=6", model=str(tiny_decoder)), Layout(tmp_path))
    fingerprint = read_json(Layout(tmp_path).model / "rm_lib.json")["fingerprint"]
    assert read_json(tmp_path / "data/train/run.json")["fingerprint"] == fingerprint
    assert [r["step"] for r in read_jsonl(tmp_path / "data/train/metrics.jsonl")][-1] == 6


class _FailingSave:
    """An accelerator whose save_state writes half a checkpoint and fails as `error` says."""
    is_main_process = True

    def __init__(self, error: Exception) -> None:
        self.error = error

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 1024)
        raise self.error


class SafetensorError(Exception):
    """safetensors' own error type, which is no OSError."""


def test_a_checkpoint_the_disk_has_no_room_for_is_one_line_and_leaves_no_half(tmp_path, monkeypatch):
    """A full disk made torch's writer fail with a traceback that named neither the disk nor a path, and
    the half-written checkpoint kept the disk full for whatever ran next."""
    import errno
    import shutil
    from collections import namedtuple

    from rm_lib.training import checkpoints

    usage, free = namedtuple("usage", "total used free"), {"bytes": 3 << 20}
    seen_half = []

    def disk_usage(_path):  # the free space is judged while the half still fills the disk
        seen_half.append(any(tmp_path.iterdir()))
        return usage(1 << 40, 0, free["bytes"])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 980")
    safetensors_error = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                        "message: \"No space left on device\" }) (os error 28)")
    for error, bytes_free in ((torch_error, 3 << 20), (safetensors_error, 1 << 40)):
        free["bytes"] = bytes_free
        with pytest.raises(OSError) as caught:
            checkpoints.save_checkpoint(_FailingSave(error), tmp_path, checkpoints.TrainState(step=3), keep=2)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path)
        assert caught.value.strerror.startswith(f"no room for a checkpoint ({bytes_free >> 20} MiB were free when it "
                                                "failed; the earlier checkpoints")
        assert list(tmp_path.iterdir()) == [] and seen_half[-1]
    # what takes the room: another run's checkpoint (kept until this run has one), named with its size;
    # lowering save_total_limit is offered only where this run keeps more than one of its own
    free["bytes"] = 3 << 20
    other = tmp_path / "step-9"
    other.mkdir()
    (other / "trainer_state.json").write_text(json.dumps({"fingerprint": "another run"}))
    (other / "optimizer.bin").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(OSError) as caught:
        checkpoints.save_checkpoint(_FailingSave(torch_error), tmp_path,
                                checkpoints.TrainState(step=3, fingerprint="this run"), keep=1)
    assert caught.value.strerror.endswith(f"free space, or remove another run's checkpoints (2 MiB: {other}; this "
                                          "run removes them only once it has saved one of its own)")
    (tmp_path / "step-2").mkdir()
    (tmp_path / "step-2" / "trainer_state.json").write_text(json.dumps({"fingerprint": "this run"}))
    with pytest.raises(OSError) as caught:
        checkpoints.save_checkpoint(_FailingSave(torch_error), tmp_path,
                                checkpoints.TrainState(step=3, fingerprint="this run"), keep=2)
    assert caught.value.strerror.endswith("own), or lower train.save_total_limit")
    shutil.rmtree(other), shutil.rmtree(tmp_path / "step-2")
    free["bytes"] = 1 << 40
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room enough: not the disk, the error as it came
        checkpoints.save_checkpoint(_FailingSave(torch_error), tmp_path, checkpoints.TrainState(step=3), keep=2)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_past_a_file_size_limit_is_one_line_naming_the_folder(tmp_path):
    """FAT32's 4 GiB, exFAT on some mounts, `ulimit -f` on a cluster: safetensors says "File too large (os
    error 27)", and train ended with its traceback."""
    import errno

    from safetensors import SafetensorError

    from rm_lib.training import checkpoints

    error = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    with pytest.raises(OSError) as caught:
        checkpoints.save_checkpoint(_FailingSave(error), tmp_path, checkpoints.TrainState(step=3), keep=2)
    assert (caught.value.errno, caught.value.filename) == (errno.EFBIG, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_whose_last_checkpoint_finds_no_room_still_saves_its_model(tmp_path, tiny_decoder, capsys):
    """The run trained every step, then its last checkpoint (weights and optimizer) did not fit: the
    model, which is smaller, was lost with it. It is saved; the checkpoint before stays to resume from."""
    import errno

    from rm_lib.layout import Layout
    from rm_lib.steps import train
    from rm_lib.training import trainer

    params = tiny_params("train.max_steps=3", "train.save_steps=2", "train.eval_steps=3", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter")
    real = trainer.save_checkpoint

    def no_room_at_the_end(accelerator, folder, state, keep, log=None):
        if state.step == 3:
            raise OSError(errno.ENOSPC, "no room for a checkpoint (0 MiB were free when it failed)", str(folder))
        return real(accelerator, folder, state, keep, log=log)

    with mock.patch.object(trainer, "save_checkpoint", no_room_at_the_end):
        result = train.run(params, Layout(tmp_path))
    assert "the trained model is saved without its last checkpoint" in capsys.readouterr().out
    assert result.steps == 3 and (tmp_path / "models/reward_model/model.safetensors").exists()
    assert [p.name for p in (tmp_path / "models/checkpoints").glob("step-*")] == ["step-2"]
    best = read_json(tmp_path / "data/train/summary.json").get("best_checkpoint")
    assert best is None or Path(best).exists()  # never a checkpoint that was not saved
    assert train.run(params, Layout(tmp_path)).resumed_from == 2  # a rerun trains the last step again


def test_a_resumed_run_continues_its_wandb_run_and_a_reused_one_opens_none(tmp_path, tiny_decoder, monkeypatch):
    """One W&B run per training run: a resume logs on into the run it started (not a new run that the
    summary and model card would name instead), and a rerun of a finished run opens no empty run. Online
    (W&B resumes no offline run): wandb.init is stood in for, as the Hub cannot be reached here."""
    import shutil
    import types

    import wandb

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        run_id = kwargs.get("id") or f"run{len(calls)}"
        return types.SimpleNamespace(id=run_id, url=f"https://wandb.test/{run_id}", log=lambda *a, **k: None,
                                     finish=lambda: None)

    monkeypatch.setattr(wandb, "init", init)
    params = tiny_params("train.max_steps=4", "train.save_steps=2", "train.wandb_project=rm-test",
                         "train.wandb_mode=online", model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    assert read_json(tmp_path / "data/train/summary.json")["wandb"] == "https://wandb.test/run1"
    shutil.rmtree(tmp_path / "models/checkpoints/step-4")  # as if killed after step 3
    assert run_steps(params, tmp_path, "train")["train"].resumed_from == 2
    assert (calls[1]["id"], calls[1]["resume"]) == ("run1", "allow")
    assert read_json(tmp_path / "data/train/summary.json")["wandb"] == "https://wandb.test/run1"

    again = run_steps(params, tmp_path, "train")["train"]
    assert again.reused and len(calls) == 2  # no run opened
    assert read_json(tmp_path / "data/train/summary.json")["wandb"] == "https://wandb.test/run1"


def test_offline_wandb_runs_go_to_the_projects_wandb_folder(tmp_path, tiny_decoder, monkeypatch):
    """Where `wandb sync wandb/offline-run-*` (README) finds them, or under WANDB_DIR as W&B reads it."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    params = tiny_params("train.max_steps=1", "train.wandb_project=rm-test", "train.wandb_mode=offline",
                         model=str(tiny_decoder))
    run_steps(params, tmp_path, "download", "tokenize", "filter", "train")
    run_id = read_json(tmp_path / "data/train/summary.json")["wandb"].rsplit(" ", 1)[-1]
    assert [p.name.rsplit("-", 1)[-1] for p in (tmp_path / "wandb").glob("offline-run-*")] == [run_id]
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    run_steps(tiny_params("train.max_steps=2", "train.wandb_project=rm-test", "train.wandb_mode=offline",
                          model=str(tiny_decoder)), tmp_path, "train")
    assert len(list((tmp_path / "elsewhere/wandb").glob("offline-run-*"))) == 1


def _saved_by(folder: Path, step: int, launch, fingerprint_of) -> Path:
    from rm_lib.training import checkpoints

    checkpoint = folder / f"step-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    state = checkpoints.TrainState(step=step, fingerprint=fingerprint_of(launch), processes=launch.processes,
                               fsdp=launch.fsdp)
    (checkpoint / checkpoints.STATE_FILE).write_text(json.dumps(vars(state)))
    checkpoints.write_checksums(checkpoint)
    return checkpoint


def test_a_launch_that_cannot_resume_the_runs_checkpoint_is_refused_with_the_ways_out(tmp_path):
    """FSDP and DDP at the same number of processes, or another number: the run's checkpoint is neither
    resumed (the other layout cannot be read) nor trained over from step 0 (and pruned), but named
    with the launch that saved it and how to resume it or train afresh."""
    import shutil

    from rm_lib.errors import SettingsError
    from rm_lib.training import checkpoints, distributed, trainer

    params = tiny_params()

    def fingerprint_of(launch):
        return trainer.run_fingerprint(params.train, params.model, "data", "code", launch.processes, launch.fsdp)

    fsdp, ddp, one = distributed.Launch(2, fsdp=True), distributed.Launch(2), distributed.Launch(1)
    folder = tmp_path / "checkpoints"
    checkpoints.check_launch(folder, fingerprint_of(ddp), ddp, fingerprint_of)  # no checkpoints yet
    saved = _saved_by(folder, 8, fsdp, fingerprint_of)
    checkpoints.check_launch(folder, fingerprint_of(fsdp), fsdp, fingerprint_of)  # its own launch resumes it
    with pytest.raises(SettingsError) as caught:
        checkpoints.check_launch(folder, fingerprint_of(ddp), ddp, fingerprint_of)
    assert str(caught.value) == (
        f"train: the checkpoint {saved} of this run was saved by 2 processes (FSDP); this launch is 2 processes (DDP) "
        "and cannot resume it (FSDP saves checkpoints in a layout of its own). To resume, relaunch as it was saved "
        "(`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 -m rm_lib train`, with this "
        f"run's options); to train afresh with this launch, remove {folder}")
    with pytest.raises(SettingsError, match=r"saved by 2 processes \(FSDP\); this launch is 1 process and cannot "
                                            r"resume it \(each process takes train.batch_size pairs of a step; FSDP"):
        checkpoints.check_launch(folder, fingerprint_of(one), one, fingerprint_of)
    # another run's checkpoint (other settings) is no reason to refuse: this run trains, and prunes it then
    checkpoints.check_launch(folder, "another run", ddp, lambda launch: "another run of " + str(launch))
    # a DDP checkpoint under FSDP
    shutil.rmtree(saved)
    _saved_by(folder, 4, ddp, fingerprint_of)
    with pytest.raises(SettingsError, match=r"saved by 2 processes \(DDP\); this launch is 2 processes \(FSDP\).*"
                                            r"`accelerate launch --multi_gpu --num_processes 2 -m rm_lib train`"):
        checkpoints.check_launch(folder, fingerprint_of(fsdp), fsdp, fingerprint_of)
    # a damaged checkpoint is passed over, as a resume passes over it: the newest intact one decides
    (_saved_by(folder, 6, fsdp, fingerprint_of) / "model.safetensors").write_bytes(b"cut")
    checkpoints.check_launch(folder, fingerprint_of(ddp), ddp, fingerprint_of)
    with pytest.raises(SettingsError, match=r"step-4 of this run was saved by 2 processes \(DDP\); this launch is 1"):
        checkpoints.check_launch(folder, fingerprint_of(one), one, fingerprint_of)


def test_an_offline_wandb_run_is_not_resumed_online(tmp_path, tiny_decoder, monkeypatch):
    """Its id, resumed online, would collide with the offline folder of that id at `wandb sync`."""
    import shutil
    import types

    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or types.SimpleNamespace(
        id=f"run{len(calls)}", url=None, log=lambda *a, **k: None, finish=lambda: None))
    offline = tiny_params("train.max_steps=2", "train.save_steps=1", "train.wandb_project=rm-test",
                          "train.wandb_mode=offline", model=str(tiny_decoder))
    run_steps(offline, tmp_path, "download", "tokenize", "filter", "train")
    shutil.rmtree(tmp_path / "models/checkpoints/step-2")
    online = tiny_params("train.max_steps=2", "train.save_steps=1", "train.wandb_project=rm-test",
                         "train.wandb_mode=online", model=str(tiny_decoder))
    assert run_steps(online, tmp_path, "train")["train"].resumed_from == 1
    assert calls[1]["mode"] == "online" and "id" not in calls[1]

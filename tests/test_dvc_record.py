"""Dagster materializations recorded in DVC (rm_lib/pipeline/dvc_record.py, the `dvc` resource).

The slow tests copy the project into a temporary git + DVC repository (tests/test_dvc.py's
`_new_repo`: tiny settings written into params.yaml, a local remote outside the repository),
materialize every asset in-process once (module fixture) and then check that dvc.lock, the DVC
cache and the remote hold what the assets wrote, with the DVC hashes as data versions. A plain
folder is covered by tests/test_orchestration.py ("not a DVC repository").
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
import yaml

from orchestration import assets, checks
from orchestration.launcher import TrainLauncherResource
from orchestration.resources import DvcResource, HubResource, ProjectResource, WandbResource
from rm_lib.layout import Layout
from rm_lib.pipeline import dvc_record
from rm_lib.pipeline.dvc_record import NotRecorded, RecordError, StageSpec, combined_hash, settings_differences
from rm_lib.settings import load_params

from helpers import run_steps, set_offline
from test_dvc import GIT_OUTS, Repo, _new_repo, _rmtree, dvc_executable

STAGE_OF = {"raw_preferences": "download", "tokenized_preferences": "tokenize", "filtered_preferences": "filter",
            "reward_model": "train", "evaluation": "evaluate", "hub_release": "push"}
MAIN = {"train": ["models/reward_model"]}  # the data version of reward_model is the model folder's hash
UP_TO_DATE = "Data and pipelines are up to date."
SECRET = "hf_dvcRecordSecret0123456789abcdefXYZ"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    set_offline(monkeypatch)


def resources(root: Path, **dvc) -> dict:
    return {"project": ProjectResource(root=str(root)), "hub": HubResource(), "wandb": WandbResource(),
            "dvc": DvcResource(**dvc),
            "trainer": TrainLauncherResource()}


def materialize(root: Path, selection=None, run_config=None) -> dg.ExecuteInProcessResult:
    return dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=selection, resources=resources(root),
                          run_config=run_config or {}, instance=dg.DagsterInstance.ephemeral(),
                          raise_on_error=False)


def materializations(result) -> dict[str, dg.AssetMaterialization]:
    return {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}


def locked_outs(repo: Repo) -> dict[str, dict[str, str]]:
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text(encoding="utf-8"))
    return {stage: {o["path"]: o["md5"] for o in entry["outs"]} for stage, entry in lock["stages"].items()}


def remote_object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Every asset materialized once in a fresh git + DVC repository with its own local remote."""
    with pytest.MonkeyPatch.context() as mp:
        set_offline(mp)
        mp.setenv("HF_TOKEN", SECRET)  # present in the environment of every step, written nowhere
        root = tmp_path_factory.mktemp("dvc-record") / "repo"
        repo = _new_repo(root)
        remote = root.parent / "remote"
        (root / ".dvc" / "config.local").write_text(
            f"[core]\n    remote = scratch\n['remote \"scratch\"']\n    url = {remote}\n", encoding="utf-8")
        result = materialize(root)
        # dvc.lock and metrics.json committed, as the team workflow does: each test may run alone (or on another
        # xdist worker than the test before it), and the experiment tests go back to this commit
        repo.new_for_git = sorted(repo.git("status", "--porcelain", "--untracked-files=all").splitlines())
        repo.commit("recorded by Dagster")
        yield repo, remote, result
    _rmtree(root.parent)


@pytest.mark.slow
def test_every_materialization_is_recorded_and_pushed(recorded):
    repo, remote, result = recorded
    assert result.success
    mats = materializations(result)
    assert sorted(mats) == sorted(STAGE_OF)
    lock = locked_outs(repo)
    assert set(lock) == set(STAGE_OF.values())
    for key, stage in STAGE_OF.items():
        metadata = mats[key].metadata
        assert metadata["dvc"].text.startswith(f"recorded: stage {stage}"), (key, metadata["dvc"])
        assert metadata["dvc_hashes"].data == lock[stage], key
        version = combined_hash(lock[stage], MAIN.get(stage))
        assert mats[key].tags["dagster/data_version"] == metadata["dvc_hash"].text == version, key
        assert metadata["dvc_pushed"].value is True, (key, metadata["dvc_push"])
        assert metadata["dvc_remote"].text == f"scratch ({remote})"
        for path, md5 in lock[stage].items():
            assert path in GIT_OUTS or remote_object(remote, md5).is_file(), (key, md5)
    # a folder out's DVC hash is its .dir object: the version of the pairs and of the model
    assert mats["raw_preferences"].tags["dagster/data_version"] == lock["download"]["data/pairs"]
    assert mats["reward_model"].tags["dagster/data_version"] == lock["train"]["models/reward_model"]
    assert lock["download"]["data/pairs"].endswith(".dir")
    # the steps write their plot data themselves: DVC records it beside metrics.jsonl
    assert "data/train/metrics.plot.json" in lock["train"]
    assert "data/evaluation/buckets.plot.json" in lock["evaluate"]
    # as if `dvc repro` had run: nothing to do, the remote has it all, only dvc.lock is new for git
    assert UP_TO_DATE in repo.dvc("status")
    assert "in sync" in repo.dvc("status", "--cloud")
    assert repo.new_for_git == [*(f"?? {p}" for p in GIT_OUTS), "?? dvc.lock"]


@pytest.mark.slow
def test_the_hub_token_is_in_no_dvc_file_cache_or_remote(recorded):
    repo, remote, result = recorded
    assert result.success
    files = [p for p in repo.root.parent.rglob("*") if p.is_file()]  # workspace, dvc.lock, cache, remote
    assert any(p.name == "dvc.lock" for p in files) and any(remote in p.parents for p in files)
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"


@pytest.mark.slow
def test_pull_into_an_empty_workspace_gives_the_same_bytes(recorded):
    repo, _, result = recorded
    assert result.success
    before = {path: digest for path, (digest, _) in repo.versioned_files().items()}
    assert any(p.startswith("models/reward_model/") for p in before)
    for folder in (".dvc/cache", "data", "models"):
        _rmtree(repo.root / folder)
    repo.git("checkout", "--", "data/sources", *GIT_OUTS)  # in git, not DVC
    repo.dvc("pull")
    after = {path: digest for path, (digest, _) in repo.versioned_files().items()}
    assert after == before
    assert UP_TO_DATE in repo.dvc("status")


@pytest.mark.slow
def test_a_run_with_other_settings_is_recorded_as_a_dvc_experiment(recorded):
    """A Launchpad override: dvc.lock and params.yaml stay as they are (they would not describe these
    outputs); the run is the DVC experiment dagster-<run id>, with its settings and the stages it ran,
    so `dvc exp show` lists it and `dvc exp apply` brings exactly these outputs back. What the user
    staged in git stays staged (`dvc exp save` resets the index: a staged `.dvc` file of new data was
    left out of the user's next commit)."""
    repo, _, first = recorded
    assert first.success
    kept = {name: (repo.root / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    note = repo.root / "data/sources/README.md"
    original = note.read_text(encoding="utf-8")
    note.write_text(original + "staged line\n", encoding="utf-8")
    repo.git("add", "data/sources/README.md")
    note.write_text(original + "staged line\nunstaged line\n", encoding="utf-8")
    staged = repo.git("diff", "--cached")
    result = materialize(repo.root, selection=dg.AssetSelection.assets("raw_preferences", "tokenized_preferences"),
                         run_config={"ops": {"raw_preferences": {"config": {"demo_pairs": 40}}}})
    assert result.success
    mats = materializations(result)
    name = f"dagster-{result.run_id[:8]}"
    assert mats["raw_preferences"].metadata["dvc_experiment"].text == name
    assert mats["tokenized_preferences"].metadata["dvc_experiment"].text == name  # the run's later stages join it
    assert "demo_pairs" not in repo.dvc("params", "diff")  # params.yaml as committed
    assert {n: (repo.root / n).read_bytes() for n in kept} == kept
    assert repo.git("diff", "--cached") == staged and "staged line" in staged and "unstaged line" not in staged
    assert note.read_text(encoding="utf-8").endswith("unstaged line\n")
    repo.git("reset", "-q", "--", "data/sources/README.md")
    note.write_text(original, encoding="utf-8")
    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(repo.dvc("exp", "show", "--csv")))}
    assert rows[name]["download.demo_pairs"] == "40" and rows[""]["download.demo_pairs"] == "60"
    pairs = (repo.root / "data/pairs/train.jsonl").read_bytes()
    back = re.search(r"`(dvc checkout [^`]+)` goes back", dvc_record.workspace_note(name, repo.root)).group(1)
    for command in back.split(" && "):  # the log's way back to what dvc.lock records, before a commit
        repo.run(*command.replace("dvc ", f"{dvc_executable()} ", 1).split())
    assert UP_TO_DATE in repo.dvc("status") and (repo.root / "data/pairs/train.jsonl").read_bytes() != pairs
    try:
        repo.dvc("exp", "apply", name)
        assert load_params(repo.root / "params.yaml").download.demo_pairs == 40
        outs = locked_outs(repo)
        assert mats["raw_preferences"].tags["dagster/data_version"] == outs["download"]["data/pairs"]
        status = repo.dvc("status")
        assert "download:" not in status and "tokenize:" not in status, status  # they are what the run made
        assert (repo.root / "data/pairs/train.jsonl").read_bytes() == pairs
    finally:  # back to the fixture's state for the tests after this one
        repo.git("reset", "-q", "--hard")  # `dvc exp apply` stages what it applies
        repo.dvc("checkout", "--force")
    assert UP_TO_DATE in repo.dvc("status")


@pytest.mark.slow
def test_a_re_execution_that_runs_a_stage_again_keeps_the_root_runs_experiment(recorded):
    """Re-executing a run with settings of its own, from a stage its experiment already recorded, saved over
    that experiment (`dvc exp save --force` under the root run's name): what the root run's
    materializations said of it (its model, `dvc exp apply`) became false. It gets an experiment of its own,
    starting from the root's; a re-execution from failure adds the stages the root did not record to it."""
    repo, _, first = recorded
    assert first.success
    settings = load_params(repo.root / "params.yaml", ["download.demo_pairs=40"])
    fifty = load_params(repo.root / "params.yaml", ["download.demo_pairs=50"])
    root_run, again, from_failure = "a" * 36, "b" * 36, "c" * 36
    try:
        run_steps(settings, repo.root, "download")
        made = dvc_record.record(repo.root, "download", settings, run_id=root_run, push=False)
        assert made.experiment == "dagster-aaaaaaaa"
        refs = repo.git("for-each-ref", "refs/exps")
        run_steps(fifty, repo.root, "download")
        redone = dvc_record.record(repo.root, "download", fifty,
                                   run_id=again, re_executes=[root_run], push=False)
        assert redone.experiment == "dagster-bbbbbbbb"
        kept = [line for line in repo.git("for-each-ref", "refs/exps").splitlines() if "dagster-aaaaaaaa" in line]
        assert kept == [line for line in refs.splitlines() if "dagster-aaaaaaaa" in line] and kept
        rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(repo.dvc("exp", "show", "--csv")))}
        assert rows["dagster-aaaaaaaa"]["download.demo_pairs"] == "40"
        assert rows["dagster-bbbbbbbb"]["download.demo_pairs"] == "50"
        run_steps(fifty, repo.root, "tokenize")
        joined = dvc_record.record(repo.root, "tokenize", fifty, run_id=again, re_executes=[root_run], push=False)
        assert joined.experiment == "dagster-bbbbbbbb"  # its own, once it has one
        run_steps(settings, repo.root, "download", "tokenize")
        completed = dvc_record.record(repo.root, "tokenize", settings, run_id=from_failure,
                                      re_executes=[root_run], push=False)
        assert completed.experiment == "dagster-aaaaaaaa"  # the root recorded no tokenize
    finally:  # back to the fixture's state for the tests after this one
        repo.git("reset", "-q", "--hard")
        repo.dvc("checkout", "--force")
    assert UP_TO_DATE in repo.dvc("status")


@pytest.mark.slow
def test_waits_while_another_dvc_process_holds_the_lock(recorded, monkeypatch):
    repo, _, _ = recorded
    monkeypatch.setattr(dvc_record, "LOCK_POLL_S", 0.2)
    held = open(repo.root / ".dvc" / "tmp" / "lock", "a")  # closed by the timer below
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `dvc repro` does (zc.lockfile)
    try:
        with pytest.raises(RecordError, match="waited 0 s for the DVC lock"):
            dvc_record.dvc(repo.root, ["status"], lock_wait_s=0)
        threading.Timer(2.0, held.close).start()
        start = time.monotonic()
        dvc_record.dvc(repo.root, ["status"], lock_wait_s=60)
        assert time.monotonic() - start >= 2.0
    finally:
        held.close()


@pytest.mark.slow
def test_a_failed_push_is_reported_not_raised(recorded):
    repo, _, _ = recorded
    spec = dvc_record.read_stage(repo.root, "download", remote="nowhere")
    pushed, note = dvc_record.push_stage(repo.root, spec, lock_wait_s=0)
    assert not pushed and "dvc push -r nowhere" in note
    no_remote = StageSpec(name="download", cmd=[], params={}, outs=[])
    assert dvc_record.push_stage(repo.root, no_remote) == (False, "no DVC remote configured "
                                                                  "(`dvc remote add -d <name> <url>`)")


# ---------------------------------------------------------------- without a DVC run

def test_a_remote_of_no_url_is_said_so_in_the_metadata_not_as_none():
    """The dvc resource's remote named one the project does not configure: every asset's dvc_remote read
    `nope (None)`."""
    from orchestration.assets import _recorded_metadata
    from rm_lib.pipeline.dvc_record import Recorded

    outcome = Recorded(stage="download", outs={"data/pairs": "abc.dir"}, lock_entry="e", remote="nope",
                       remote_url=None, pushed=False, push_note="ERROR: remote 'nope' doesn't exist")
    said = _recorded_metadata(outcome, "abc.dir")["dvc_remote"]
    assert said == "nope (no url in the project's .dvc/config: see dvc_push)" and "None" not in said
    assert _recorded_metadata(replace(outcome, remote_url="/r"), "abc.dir")["dvc_remote"] == "nope (/r)"


def test_combined_hash():
    assert combined_hash({"data/pairs": "abc.dir"}) == "abc.dir"
    outs = {"a.json": "111", "b.json": "222", "m": "333.dir"}
    assert combined_hash(outs) == combined_hash(dict(reversed(outs.items())))  # order does not matter
    assert combined_hash(outs) != combined_hash({**outs, "a.json": "999"})
    assert combined_hash(outs, ["m"]) == "333.dir"


def test_settings_differences(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"max_steps": 2}, "evaluate": {"batch_size": 8}}))
    spec = StageSpec(name="train", cmd=["python -m rm_lib train"], outs=[],
                     params={str(params_file): ["train", "evaluate.batch_size"]})
    assert settings_differences(spec, load_params(params_file)) == []
    assert settings_differences(spec, load_params(params_file, ["filter.policy=truncate"])) == []  # not a dep
    assert settings_differences(spec, load_params(params_file, ["train.max_steps=3", "evaluate.batch_size=4"])) == [
        "train.max_steps: ran with 3, params.yaml has 2", "evaluate.batch_size: ran with 4, params.yaml has 8"]


def test_an_experiment_writes_the_run_settings_into_params_yaml_keeping_the_rest():
    from rm_lib.pipeline.dvc_record import set_settings

    text = "train:\n  learning_rate: 5.0e-05   # the step size\n  lora_target_modules: null\n\npush:\n  repo_id: null\n"
    out = set_settings(text, [("train", "learning_rate", 1e-4), ("train", "lora_target_modules", ["q", "v"]),
                              ("train", "seed", 7), ("push", "repo_id", "me/rm-1e-4"), ("filter", "policy", "drop")])
    assert yaml.safe_load(out) == {"train": {"learning_rate": 1e-4, "lora_target_modules": ["q", "v"], "seed": 7},
                                   "push": {"repo_id": "me/rm-1e-4"}, "filter": {"policy": "drop"}}
    assert "learning_rate: 0.0001   # the step size\n" in out  # the comment stays
    assert out.index("seed: 7") < out.index("push:")  # a new key at the end of its own section


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=root, capture_output=True, text=True, check=True).stdout


def test_the_git_index_is_kept_across_what_resets_it(tmp_path):
    """What the user staged, partly (`git add` then an edit), or as an intent (`git add -N`), stays as it
    was however the index is reset inside (as `dvc exp save` resets it)."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "new.dvc").write_text("outs: []\n")
    (tmp_path / "later.txt").write_text("to add\n")
    _git(tmp_path, "add", "a.txt", "new.dvc")
    _git(tmp_path, "add", "-N", "later.txt")
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    staged = _git(tmp_path, "diff", "--cached")
    with dvc_record._index_kept(tmp_path):
        _git(tmp_path, "reset", "-q")
        assert _git(tmp_path, "diff", "--cached") == ""
    assert _git(tmp_path, "diff", "--cached") == staged and "+two" in staged and "three" not in staged
    assert _git(tmp_path, "status", "--porcelain").splitlines() == ["MM a.txt", " A later.txt", "A  new.dvc"]


def test_a_merge_in_progress_keeps_its_unmerged_entries(tmp_path):
    _git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    _git(tmp_path, "checkout", "-q", "-b", "other")
    (tmp_path / "a.txt").write_text("other\n")
    _git(tmp_path, "commit", "-q", "-am", "other")
    _git(tmp_path, "checkout", "-q", "main")
    (tmp_path / "a.txt").write_text("mine\n")
    _git(tmp_path, "commit", "-q", "-am", "mine")
    subprocess.run(["git", "merge", "-q", "other"], cwd=tmp_path, capture_output=True)  # a conflict
    with dvc_record._index_kept(tmp_path):
        _git(tmp_path, "reset", "-q")
    assert _git(tmp_path, "status", "--porcelain").splitlines() == ["UU a.txt"]


def test_no_experiment_without_a_git_commit(tmp_path):
    root = tmp_path / "repo"
    repo = _new_repo(root)
    repo.git("update-ref", "-d", "HEAD")  # the project exists but nothing is committed
    spec = dvc_record.read_stage(root, "download")
    outcome = dvc_record.record_experiment(root, spec, load_params(root / "params.yaml", ["download.demo_pairs=70"]),
                                           "0123456789")
    assert isinstance(outcome, NotRecorded) and "needs a git commit" in outcome.reason


def test_not_recorded_without_dvc_or_when_disabled(tmp_path):
    params = load_params(None)
    outcome = DvcResource().record(tmp_path, "download", params)
    assert isinstance(outcome, NotRecorded) and outcome.reason.startswith("not a DVC repository")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    outcome = DvcResource(enabled=False).record(tmp_path, "download", params)
    assert isinstance(outcome, NotRecorded) and "enabled is false" in outcome.reason


def test_stages_and_remote_are_read_from_the_files_without_importing_dvc(tmp_path):
    """dvc.yaml and .dvc/config read as files: DVC's import would break Dagster's selection parser."""
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from pathlib import Path; from rm_lib.pipeline.dvc_record import read_stage; "
            f"spec = read_stage(Path({str(root)!r}), 'train'); "
            "keys = list(spec.params.values())[0]; "
            "print(spec.cmd[0], any(k.startswith('train.') for k in keys), 'models/reward_model' in spec.outs, "
            "any(m == 'dvc' or m.startswith('dvc.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "-m", "rm_lib", "train", "True", "True", "False"]
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: python -m rm_lib s\n    params: [a.b, {other.yaml: [c]}]\n")
    (tmp_path / ".dvc/config").write_text("[core]\n    remote = r\n['remote \"r\"']\n    url = ../remote\n")
    (tmp_path / ".dvc/config.local").write_text("['remote \"r\"']\n    url = /elsewhere\n")
    spec = dvc_record.read_stage(tmp_path, "s")
    assert spec.params == {str(tmp_path / "params.yaml"): ["a.b"], str(tmp_path / "other.yaml"): ["c"]}
    assert (spec.remote, spec.remote_url) == ("r", "/elsewhere")  # config.local wins, as in DVC
    (tmp_path / ".dvc/config.local").unlink()
    assert dvc_record.read_stage(tmp_path, "s").remote_url == str(tmp_path / "remote")
    assert dvc_record.read_stage(tmp_path, "missing") is None


def test_a_stage_whose_inputs_are_not_what_dvc_lock_records_upstream_is_found(tmp_path):
    """Committing evaluate while models/reward_model is a model other than train's in dvc.lock (left by
    a run with other settings) would record two versions of one file; the check finds such inputs,
    also a file inside a folder output (by DVC's cached listing of the folder)."""
    import hashlib
    import json

    from rm_lib.files import dvc_md5
    from rm_lib.pipeline.dvc_record import read_stage, upstream_mismatches

    (tmp_path / "models/reward_model").mkdir(parents=True)
    (tmp_path / "models/reward_model/w.bin").write_bytes(b"trained with params.yaml")
    (tmp_path / "data/pairs").mkdir(parents=True)
    (tmp_path / "data/pairs/manifest.json").write_text("{}")
    pairs = dvc_md5(tmp_path / "data/pairs")
    listing = tmp_path / ".dvc/cache/files/md5" / pairs[:2] / pairs[2:]
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([{"md5": hashlib.md5(b"{}").hexdigest(), "relpath": "manifest.json"}]))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "download": {"cmd": "python -m rm_lib download", "outs": ["data/pairs"]},
        "train": {"cmd": "python -m rm_lib train", "outs": ["models/reward_model"]},
        "evaluate": {"cmd": "python -m rm_lib evaluate", "deps": ["models/reward_model", "data/pairs/manifest.json",
                                                                   "rm_lib/steps/evaluate.py"]}}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "download": {"outs": [{"path": "data/pairs", "md5": pairs}]},
        "train": {"outs": [{"path": "models/reward_model", "md5": dvc_md5(tmp_path / "models/reward_model")}]}}}))
    (tmp_path / ".dvc/config").write_text("[core]\n")
    evaluate = read_stage(tmp_path, "evaluate")
    assert upstream_mismatches(tmp_path, evaluate) == []
    (tmp_path / "models/reward_model/w.bin").write_bytes(b"trained with a Launchpad override")
    (tmp_path / "data/pairs/manifest.json").write_text('{"other": true}')
    assert upstream_mismatches(tmp_path, evaluate) == [
        "models/reward_model: not the output of stage train that dvc.lock records",
        "data/pairs/manifest.json: not the output of stage download that dvc.lock records"]


@pytest.mark.slow
def test_after_a_run_with_other_settings_a_plain_run_of_a_later_stage_is_not_recorded(recorded):
    """A Launchpad override left its own pairs and tokens in the workspace (recorded in its experiment):
    a later stage run with params.yaml's settings must not go into dvc.lock on top of them."""
    repo, _, first = recorded
    assert first.success
    override = materialize(repo.root, selection=dg.AssetSelection.assets("raw_preferences", "tokenized_preferences"),
                           run_config={"ops": {"raw_preferences": {"config": {"demo_pairs": 40}}}})
    assert override.success
    try:
        kept = (repo.root / "dvc.lock").read_bytes()
        plain = materialize(repo.root, selection=dg.AssetSelection.assets("filtered_preferences"))
        assert plain.success
        note = materializations(plain)["filtered_preferences"].metadata["dvc"].text
        assert note.startswith("not recorded: the stage's inputs are not the outputs dvc.lock records")
        assert (repo.root / "dvc.lock").read_bytes() == kept
    finally:
        repo.dvc("checkout", "--force")
    assert UP_TO_DATE in repo.dvc("status")


@pytest.mark.slow
def test_an_experiment_is_not_recorded_on_inputs_it_does_not_record_upstream(recorded):
    """A run with its own settings goes into an experiment; when a step run outside it (a CLI download
    with other settings) changed the stage's input meanwhile, the experiment's dvc.lock would name one
    version of the pairs as download's output and another as tokenize's input: not recorded."""
    repo, _, first = recorded
    assert first.success
    try:
        run_steps(load_params(repo.root / "params.yaml", ["download.demo_pairs=40"]), repo.root, "download")
        kept = (repo.root / "dvc.lock").read_bytes()
        result = materialize(repo.root, selection=dg.AssetSelection.assets("tokenized_preferences"),
                             run_config={"ops": {"tokenized_preferences": {"config": {"template": "simple_chat"}}}})
        assert result.success
        note = materializations(result)["tokenized_preferences"].metadata["dvc"].text
        assert note.startswith("not recorded: the stage's inputs are not the outputs the run's experiment records")
        assert (repo.root / "dvc.lock").read_bytes() == kept
        assert f"dagster-{result.run_id[:8]}" not in repo.dvc("exp", "list")
    finally:
        repo.dvc("checkout", "--force")
    assert UP_TO_DATE in repo.dvc("status")


def test_settings_left_by_a_killed_experiment_record_are_put_back_before_any_step_runs(tmp_path):
    """A Dagster run killed while it recorded an experiment (SIGKILL skips its clean-up) left the run's
    settings in params.yaml: the next step, under `dvc repro` or not, puts the workspace's back and stops
    instead of running with them (and DVC locking them as the workspace's). Not while the record still
    runs (it holds the journal's lock), and not over settings someone wrote since."""
    from rm_lib import steps
    from rm_lib.errors import UserError

    params_file, journal = tmp_path / "params.yaml", tmp_path / dvc_record.JOURNAL
    own, recorded = "train:\n  learning_rate: 5.0e-05\n", "train:\n  learning_rate: 0.0003\n"

    def killed_record() -> None:
        params_file.write_text(recorded, encoding="utf-8")
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text(json.dumps({"files": {"params.yaml": own, "dvc.lock": None}, "params_written": recorded}),
                           encoding="utf-8")

    killed_record()
    with dvc_record._journal_lock(tmp_path, wait=True):  # the record still runs: nothing is touched
        assert dvc_record.restore_interrupted_record(tmp_path) == []
    assert params_file.read_text(encoding="utf-8") == recorded and journal.exists()
    with pytest.raises(UserError, match="params.yaml held the settings of a DVC experiment record"):
        steps.run("download", load_params(None, ["download.demo_pairs=20"]), Layout(tmp_path))
    assert params_file.read_text(encoding="utf-8") == own
    assert not journal.exists() and not (tmp_path / "data").exists()
    assert dvc_record.restore_interrupted_record(tmp_path) == []  # once

    killed_record()
    params_file.write_text("train:\n  learning_rate: 1.0e-04\n", encoding="utf-8")  # set by hand since
    assert dvc_record.restore_interrupted_record(tmp_path) == []
    assert params_file.read_text(encoding="utf-8") == "train:\n  learning_rate: 1.0e-04\n" and not journal.exists()


def test_a_dvc_lock_that_records_other_settings_than_the_model_trained_with_is_a_doubt_on_the_card(tmp_path):
    """`train --set train.learning_rate=1e-3`, then `dvc commit -f`: dvc.lock recorded params.yaml's 5e-05 beside
    the model 1e-3 trained, params.yaml agreed with dvc.lock, and the card offered the commit to reproduce it."""
    from rm_lib.publish import model_card

    # as DVC records them: keys of a section, and a whole section (dvc.yaml's `- model`) as one key
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {"params": {
        "params.yaml": {"train.learning_rate": 5e-05, "train.seed": 42, "model": {"name_or_path": "default",
                                                                                   "revision": None},
                        "filter.max_token_length": 64}}}}}))
    ran = {"model": {"name_or_path": "default", "revision": None}, "train": {"learning_rate": 0.001, "seed": 42}}
    assert dvc_record.lock_settings_other_than(tmp_path, "train", ran) == ["train.learning_rate"]
    other_base = {**ran, "model": {"name_or_path": "/some/other/model", "revision": None}}
    assert dvc_record.lock_settings_other_than(tmp_path, "train", other_base) == ["model.name_or_path",
                                                                                  "train.learning_rate"]
    assert dvc_record.lock_settings_other_than(tmp_path, "train", {**ran, "train": {"learning_rate": "5e-5",
                                                                                   "seed": 42}}) == []
    assert dvc_record.lock_settings_other_than(tmp_path / "elsewhere", "train", ran) == []
    said = model_card._reproduce({"lock_settings_differ": ["train.learning_rate"], "git_commit": "abc"}, False)
    assert said.startswith("Not claimed reproducible from this commit: dvc.lock records other settings for train "
                           "than this model was trained with (train.learning_rate")
    assert model_card._reproduce({"lock_settings_differ": [], "git_commit": "abc"}, False).startswith("Reproduce:")


def test_settings_params_yaml_holds_other_than_the_model_trained_with_are_named(tmp_path):
    """A Launchpad or --set run where dvc.lock has no train entry (a first run, recorded as an experiment):
    nothing compared the model's settings with the checkout's params.yaml, and the card said `dvc repro` of
    the commit remakes it."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    trained = load_params(tmp_path / "params.yaml").as_dict()
    ran = {"model": trained["model"], "train": trained["train"]}
    stages = ("download", "tokenize", "filter", "train")
    assert dvc_record.params_settings_other_than(tmp_path, stages, ran) == []
    ran["train"] = {**ran["train"], "learning_rate": 1e-3, "logging_steps": 1}  # the second changes no weight
    assert dvc_record.params_settings_other_than(tmp_path, stages, ran) == ["train.learning_rate"]
    # a data step's too (the pairs a `--set download.demo_pairs=200` run trained on)
    ran["download"] = {"demo_pairs": 200}
    assert dvc_record.params_settings_other_than(tmp_path, stages, ran) == ["download.demo_pairs",
                                                                            "train.learning_rate"]
    assert dvc_record.params_settings_other_than(tmp_path / "elsewhere", stages, ran) == []


def test_lock_differs_names_the_stages_dvc_lock_records_with_other_code_or_settings(tmp_path):
    """A change run through `dvc repro` and then undone (a code edit reverted, params.yaml checked out
    again) leaves dvc.lock recording what the checkout no longer holds: the card must not call the commit
    the model's. `1e-4` in params.yaml (a string to PyYAML) equals the number DVC recorded."""
    from rm_lib.files import dvc_md5

    code = tmp_path / "rm_lib" / "x.py"
    code.parent.mkdir()
    code.write_text("A = 1\n")
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 1e-4\n  seed: 1\nfilter:\n  policy: drop\n")
    model = tmp_path / "models" / "reward_model"
    model.mkdir(parents=True)
    (model / "w.bin").write_text("weights")

    def lock(code_md5: str, learning_rate: float) -> None:
        stage = {"deps": [{"path": "rm_lib/x.py", "md5": code_md5}],
                 "outs": [{"path": "models/reward_model", "md5": dvc_md5(model)}]}
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            "train": {**stage, "params": {"params.yaml": {"train.learning_rate": learning_rate, "train.seed": 1}}},
            "filter": {**stage, "params": {"params.yaml": {"filter": {"policy": "drop"}}}}}}))

    stages = ("filter", "train")
    lock(dvc_md5(code), 0.0001)
    assert dvc_record.lock_differs(tmp_path, stages) == []
    lock(dvc_md5(code), 0.001)
    assert dvc_record.lock_differs(tmp_path, stages) == ["train (settings)"]
    lock("0" * 32, 0.001)
    assert dvc_record.lock_differs(tmp_path, stages) == ["filter (code)", "train (code and settings)"]
    # a JSON params file indented with tabs (which YAML refuses), unchanged
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train": {"params": {"cfg.json": {"train.lr": 0.001}}}}}))
    (tmp_path / "cfg.json").write_text(json.dumps({"train": {"lr": 0.001}}, indent="\t"))
    assert dvc_record.lock_differs(tmp_path, stages) == []
    (tmp_path / "cfg.json").write_text(json.dumps({"train": {"lr": 0.002}}, indent="\t"))
    assert dvc_record.lock_differs(tmp_path, stages) == ["train (settings)"]
    # a params file that is no YAML (TOML, Python) or a stage run from another folder (wdir): not compared
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train": {"params": {"params.toml": {"train.lr": 1}}}, "filter": {"params": {"params.yaml": {"x": 2}}}}}))
    (tmp_path / "params.toml").write_text("[train]\nlr = 2\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"filter": {"cmd": "x", "wdir": "sub"}}}))
    assert dvc_record.lock_differs(tmp_path, stages) == []
    (tmp_path / "dvc.lock").unlink()
    assert dvc_record.lock_differs(tmp_path, stages) == []


def _cached(repo: Repo, md5: str) -> bool:
    return (repo.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def _on_remote(remote: Path, md5: str) -> bool:
    return (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


@pytest.mark.slow
def test_the_documented_gc_frees_pushed_old_versions_and_keeps_experiments(recorded):
    """docs/dvc.md "Reclaim disk space": every retrain adds a model to the cache. The documented
    `dvc push --all-commits` then `dvc gc` frees an earlier commit's outputs (`dvc pull` brings them
    back) and keeps the workspace's and a Dagster experiment's, which live only in this cache
    (`dvc gc -w` alone deleted them, and `dvc exp apply` then had nothing to apply). Dagster pushed every
    run's outputs to the remote, also the versions nobody committed, and nothing said how to delete them."""
    repo, remote, first = recorded
    assert first.success
    branch = repo.git("rev-parse", "--abbrev-ref", "HEAD").strip()
    repo.commit("first version")
    before = repo.git("rev-parse", "HEAD").strip()
    old = locked_outs(repo)["download"]["data/pairs"]
    params = repo.root / "params.yaml"
    params.write_text(dvc_record.set_settings(params.read_text(encoding="utf-8"), [("download", "demo_pairs", 50)]),
                      encoding="utf-8")
    assert materialize(repo.root, selection=dg.AssetSelection.assets("raw_preferences")).success  # recorded, pushed
    repo.commit("50 pairs")
    new = locked_outs(repo)["download"]["data/pairs"]
    result = materialize(repo.root, selection=dg.AssetSelection.assets("raw_preferences"),
                         run_config={"ops": {"raw_preferences": {"config": {"demo_pairs": 40}}}})
    name = f"dagster-{result.run_id[:8]}"
    ours = materializations(result)["raw_preferences"].tags["dagster/data_version"]
    repo.dvc("checkout", "--force")  # a later run of params.yaml's settings replaced the experiment's outputs
    assert len({old, new, ours}) == 3 and all(_cached(repo, md5) for md5 in (old, new, ours))
    try:
        repo.dvc("push", "--all-commits")
        repo.dvc("gc", "--workspace", "--all-experiments", "--force")
        assert not _cached(repo, old) and _cached(repo, new) and _cached(repo, ours)
        # the remote: what Dagster recorded and pushed and nobody committed goes with the documented
        # `gc --cloud`; what a commit or an experiment names stays
        params.write_text(dvc_record.set_settings(params.read_text(encoding="utf-8"),
                                                  [("download", "demo_pairs", 45)]), encoding="utf-8")
        assert materialize(repo.root, selection=dg.AssetSelection.assets("raw_preferences")).success
        orphan = locked_outs(repo)["download"]["data/pairs"]
        repo.git("checkout", "-q", "--", "params.yaml", "dvc.lock")
        repo.dvc("checkout", "--force")
        assert all(_on_remote(remote, md5) for md5 in (old, new, orphan))  # an experiment's: on `dvc exp push`
        repo.dvc("gc", "--cloud", "--all-commits", "--all-experiments", "--workspace", "--force")
        assert not _on_remote(remote, orphan) and _on_remote(remote, old) and _on_remote(remote, new)
        assert _cached(repo, ours) and _cached(repo, new) and not _cached(repo, orphan)
        repo.dvc("exp", "apply", name)
        assert locked_outs(repo)["download"]["data/pairs"] == ours and "download:" not in repo.dvc("status")
        repo.git("reset", "-q", "--hard")
        repo.git("checkout", "-q", before)
        repo.dvc("pull", "download")  # the earlier version comes back from the remote
        assert _cached(repo, old) and "download:" not in repo.dvc("status")
    finally:
        repo.git("reset", "-q", "--hard")
        repo.git("checkout", "-q", branch)
        repo.dvc("checkout", "--force")


def test_a_dvc_repro_is_seen_running_from_its_start_to_its_end_also_between_stages(tmp_path, monkeypatch):
    """The sensors wait for a `dvc repro`: between two stages no step of rm_lib holds a lock (DVC is hashing
    and starting the next command), and dvc_lock_changed reported the repro's stages so far, so
    release_automation started runs into the rest of it. DVC's repository lock and its stage lock cover
    the whole repro; dvc_running reads both, and lets go of what it finds free at once (DVC retries
    its lock: the repro is not disturbed)."""
    import os

    root = tmp_path / "repo"
    root.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([dvc_executable(), "init", "-q"], cwd=root, check=True, env=env)
    step = f"{sys.executable} -c \"import time; time.sleep(1.5); open('{{}}', 'w').write('x')\""
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "one": {"cmd": step.format("a"), "outs": ["a"]},
        "two": {"cmd": step.format("b"), "deps": ["a"], "outs": ["b"]}}}))
    assert dvc_record.dvc_running(root) is None
    repro = subprocess.Popen([dvc_executable(), "repro", "-q"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    timeline = []
    while repro.poll() is None:
        timeline.append(dvc_record.dvc_running(root))
        time.sleep(0.01)
    output = repro.stdout.read()
    assert repro.returncode == 0, output
    assert (root / "b").read_text() == "x"
    busy = [i for i, said in enumerate(timeline) if said is not None]
    # from the first look that saw it (before that, Python was starting DVC) to the last: never free
    assert busy and all(said is not None for said in timeline[busy[0]:busy[-1] + 1]), \
        [(i, said) for i, said in enumerate(timeline) if said is None and busy and busy[0] < i < busy[-1]]
    assert any("repository lock" in said for said in timeline if said) and \
        any("is running a stage" in said for said in timeline if said), set(timeline)
    assert dvc_record.dvc_running(root) is None  # the stage lock's entries are gone, the lock let go
    (root / "b").unlink()
    rwlock = root / ".dvc" / "tmp" / "rwlock"

    def entry(pid: int, age_s: float = 0.0) -> None:  # as a `dvc repro` killed mid-stage leaves it
        rwlock.write_text(json.dumps({"write": {str(root / "b"): {"pid": pid, "cmd": "dvc repro"}}, "read": {}}))
        os.utime(rwlock, (time.time() - age_s, time.time() - age_s))

    entry(2 ** 22 + 12345)  # its process died
    assert dvc_record.dvc_running(root) is None
    other = subprocess.Popen(["sleep", "30"])  # a later process that got the dead one's pid
    try:
        entry(other.pid, age_s=3600)
        assert dvc_record.dvc_running(root) is None
        entry(other.pid)  # written by that process: a stage of its
        assert dvc_record.dvc_running(root) == f"`dvc repro` (pid {other.pid}) is running a stage"
    finally:
        other.kill()
        other.wait()
    rwlock.write_text('{"write": {')  # cut by a kill mid-write: busy only the instant DVC rewrites it
    assert "changing its stage lock" in dvc_record.dvc_running(root)
    os.utime(rwlock, (time.time() - 60, time.time() - 60))
    assert dvc_record.dvc_running(root) is None
    rwlock.unlink()
    # core.hardlink_lock (shared file systems): DVC's lock is a file there while held, no flock
    (root / ".dvc" / "config").write_text("[core]\n    hardlink_lock = true\n")
    (root / ".dvc" / "tmp" / "lock").unlink(missing_ok=True)
    assert dvc_record.dvc_running(root) is None
    (root / ".dvc" / "tmp" / "lock").write_text("host 123\n")
    assert "(.dvc/tmp/lock, core.hardlink_lock)" in dvc_record.dvc_running(root)
    (root / ".dvc" / "config").write_text("[core]\n    Hardlink_Lock = 'true'  # NFS share\n")  # as DVC reads it
    assert "(.dvc/tmp/lock, core.hardlink_lock)" in dvc_record.dvc_running(root)
    (root / ".dvc" / "config").write_text("")  # set for the user or the system instead, as DVC finds them
    for variable in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "etc"))
    assert dvc_record.dvc_running(root) is None
    for folder in (tmp_path / "home" / ".config" / "dvc", tmp_path / "etc" / "dvc"):
        folder.mkdir(parents=True)
        (folder / "config").write_text("[core]\n    hardlink_lock = true\n")
        assert "(.dvc/tmp/lock, core.hardlink_lock)" in dvc_record.dvc_running(root), folder
        (folder / "config").unlink()
    (root / ".dvc" / "tmp" / "lock").unlink()
    rwlock.symlink_to(rwlock)  # cannot be read (a loop): no repro to wait for, not "busy" for ever
    assert dvc_record.dvc_running(root) is None


def test_a_step_run_outside_dvc_repro_is_one_dvc_repro_refuses_to_run_beside_also_where_it_would_only_check_out(
        tmp_path, monkeypatch, capsys):
    """A `dvc repro` that finds train cached (settings it trained on once) checks the cached model out and
    runs no step, so it took none of rm_lib's locks: it replaced the model under a running `evaluate` (which
    failed, blaming a train) and under a Dagster run's train. A step run from the CLI or Dagster marks its
    stage in DVC's stage lock as `dvc repro` does: DVC refuses, naming the step; after it, DVC goes on."""
    import os

    from rm_lib import steps
    from rm_lib.pipeline import dvc_stage_lock

    root = tmp_path / "repo"
    root.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    env.pop("DVC_STAGE", None)
    monkeypatch.delenv("DVC_STAGE", raising=False)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dvc_executable(), *args], cwd=root, env=env, capture_output=True, text=True)

    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    assert dvc("init", "-q").returncode == 0
    make = (f"{sys.executable} -c \"import os; os.makedirs('models/reward_model', exist_ok=True); "
            "open('models/reward_model/w', 'w').write(open('data/in').read())\"")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "train": {"cmd": make, "deps": ["data/in"], "outs": ["models/reward_model"]},
        "evaluate": {"cmd": "echo", "deps": ["models/reward_model"], "outs": [{"report": {"persist": True}}]}}}))
    (root / "data").mkdir()
    model = root / "models" / "reward_model" / "w"
    for weights in ("v1", "v2"):  # v1 in the run cache, v2 in the workspace
        (root / "data" / "in").write_text(weights)
        repro = dvc("repro", "train")
        assert repro.returncode == 0 and model.read_text() == weights, repro.stdout + repro.stderr
    (root / "data" / "in").write_text("v1")
    with steps.alone("evaluate", Layout(root)):  # an evaluate from the command line, scoring the model
        marks = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())
        assert marks["read"][os.path.realpath(root / "models" / "reward_model")][0]["pid"] == os.getpid()
        refused = dvc("repro", "train")
        assert refused.returncode != 0 and "is busy" in refused.stderr and "rm_lib evaluate" in refused.stderr, \
            refused.stdout + refused.stderr
        assert model.read_text() == "v2"  # the model it scores stays
        status = dvc("status")
        assert status.returncode != 0 and "is busy" in status.stderr, status.stdout + status.stderr
    restored = dvc("repro", "train")
    assert "Stage 'train' is cached - skipping run, checking out outputs" in restored.stdout, restored.stdout
    assert model.read_text() == "v1"
    assert json.loads((root / ".dvc" / "tmp" / "rwlock").read_text() or "{}") == {}  # its marks are gone

    # a DVC command at work on the step's paths: the step waits for it, then refuses, naming it
    monkeypatch.setattr(dvc_stage_lock, "BUSY_WAIT_S", 0.5)
    other = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        (root / ".dvc" / "tmp" / "rwlock").write_text(json.dumps({"write": {
            os.path.realpath(root / "models" / "reward_model"): {"pid": other.pid, "cmd": "dvc checkout"}}}))
        said = f"`dvc checkout` \\(pid {other.pid}\\) writes .*reward_model"
        with pytest.raises(dvc_stage_lock.StageBusy, match=said):
            with steps.alone("evaluate", Layout(root)):
                pass
        with steps.alone("download", Layout(root)):  # dvc.yaml has no such stage: nothing to mark
            pass
        monkeypatch.setenv("DVC_STAGE", "evaluate")  # run by `dvc repro`, which marked the stage itself
        with steps.alone("evaluate", Layout(root)):
            assert list(json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())) == ["write"]
    finally:
        other.kill()
        other.wait()
    # the other command's mark is left as it was
    assert json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())["write"][
        os.path.realpath(root / "models" / "reward_model")]["pid"] == other.pid
    monkeypatch.delenv("DVC_STAGE")
    # a step of a Dagster run is named by its run (its command line is Dagster's)
    with dvc_stage_lock.marked(root, "train", "8f3a2c1d"):
        marks = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())["write"]
        assert {m["cmd"] for m in marks.values() if m["pid"] == os.getpid()} == {
            "rm_lib train, a step of the Dagster run 8f3a2c1d"}
    # DVC's guard held as the step ends (a `dvc` stopped mid-edit): the finished step is no failure, it says so
    monkeypatch.setattr(dvc_stage_lock, "GUARD_WAIT_S", 0.3)
    guard = os.open(root / ".dvc" / "tmp" / "rwlock.lock", os.O_RDWR)
    try:
        with steps.alone("evaluate", Layout(root)):
            fcntl.flock(guard, fcntl.LOCK_EX)
    finally:
        os.close(guard)
    assert "could not take its marks out of DVC's stage lock" in capsys.readouterr().err

"""The DVC pipeline (dvc.yaml, .dvc/config, .dvcignore) in a throw-away git repository.

Fast tests check dvc.yaml against the code (every stage depends on the rm_lib modules it
imports) and the DVC configuration. The slow tests copy the project into a temporary git
repository with tiny settings, run `dvc repro` once (module fixture) and then, in file order:
a second repro does nothing; `dvc push`, wipe cache and outputs, `dvc pull` gives the same
bytes; a train setting reruns exactly train, evaluate and push; `dvc exp run -S` and
`dvc exp show`; `dvc metrics show` and `dvc plots show`. Each slow test leaves the repository
with an up-to-date pipeline (`dvc status` clean), so any of them also runs on its own.

DVC runs as the `dvc` command of its own environment (rm_lib.pipeline.dvc_record.executable), and the stages'
`python` is this interpreter.
Nothing reaches the network: HF_HUB_OFFLINE=1, WANDB_MODE=disabled, DVC analytics off.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rm_lib.pipeline.code_version import step_code
from rm_lib.pipeline.dvc_record import executable as dvc_executable

from helpers import offline_env

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "tokenize", "filter", "train", "evaluate", "push")
# outputs that git versions (`cache: false`): a clone has them from git, `dvc pull` never fetches them
GIT_OUTS = ["data/evaluation/metrics.json"]
# What each step writes (rm_lib/layout.py); every out, metric and plot of a stage lies inside these.
STAGE_FOLDERS = {
    "download": ["data/pairs"],
    "tokenize": ["data/tokenized"],
    "filter": ["data/filtered"],
    "train": ["models/reward_model", "data/train"],
    "evaluate": ["data/evaluation"],
    "push": ["data/release"],
}
# Small enough for 2 CPU cores: about 45 s for the whole pipeline.
TINY = {
    "download": {"demo_pairs": 60},
    "filter": {"max_token_length": 64, "max_prompt_token_length": 32},
    "train": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 1, "save_total_limit": 1},
    # a 2-step model on a dozen held-out pairs is not meant to pass the gate
    "push": {"min_accuracy": 0.0, "min_test_pairs": 1, "compare_with_release": False},
}
COPY = ("rm_lib", "params.yaml", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvc/plots", ".dvcignore",
        ".gitignore", "data/sources/README.md")
RAN = re.compile(r"Running stage '([\w-]+)'")


# --- dvc.yaml against the code ------------------------------------------------------------

def _load_dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def _code_deps(stage: str) -> set[str]:
    """What computes the stage's outputs: the step module and its imports (rm_lib.pipeline.code_version)."""
    return set(step_code(stage, cli=False))


def test_the_stage_table_of_docs_dvc_md_names_what_each_stage_reads():
    """Each file or folder a stage of dvc.yaml depends on (its code aside) is named in the `reads` cell of
    its row in docs/dvc.md: itself, a folder above it, or its file name beside its folder."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    rows = {cells[1].strip(): cells[2] for cells in (line.split("|") for line in
            (ROOT / "docs/dvc.md").read_text(encoding="utf-8").splitlines() if line.startswith("| "))
            if len(cells) >= 6}
    for name, stage in stages.items():
        named = {n.rstrip("/") for n in re.findall(r"`([^`]+)`", rows[name])}
        data = [d for d in stage.get("deps", []) if not d.startswith(("rm_lib", "orchestration"))]
        missing = [d for d in data if not any(d == n or d.startswith(n + "/") or Path(d).name == n for n in named)]
        assert data and not missing, (name, missing)


def _entries(items) -> dict[str, dict]:
    """dvc.yaml's list of `path` or `{path: {options}}` as {path: options}."""
    result = {}
    for item in items or []:
        if isinstance(item, str):
            result[item] = {}
        else:
            (path, options), = item.items()
            result[path] = options or {}
    return result


def test_one_stage_per_step_calling_the_cli():
    stages = _load_dvc_yaml()["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        cmd = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        assert cmd[0] == f"python -m rm_lib {name}", name


def test_each_stage_depends_on_the_code_it_runs():
    """Every file the step runs (the CLI aside) is a dep or lies in a folder that is; folders are named
    whole, not file by file, so a refactor inside one edits nothing here."""
    stages = _load_dvc_yaml()["stages"]
    for name, stage in stages.items():
        deps = {d for d in _entries(stage["deps"]) if d.startswith("rm_lib/")}
        for dep in deps:
            assert (ROOT / dep).exists(), f"stage {name}: dep {dep} does not exist"
        folders = {d for d in deps if (ROOT / d).is_dir()}
        assert not {d for d in deps if any(d.startswith(f + "/") for f in folders)}, name  # no file of a folder dep
        missing = {f for f in _code_deps(name) if f not in deps and not any(f.startswith(d + "/") for d in folders)}
        assert not missing, f"stage {name}: add these modules it imports to its deps in dvc.yaml: {sorted(missing)}"
        assert "rm_lib/cli.py" not in deps and f"rm_lib/steps/{name}.py" in deps


def test_params_are_keys_of_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    stages = _load_dvc_yaml()["stages"]
    for name, stage in stages.items():
        assert stage.get("params"), name
        for key in stage["params"]:
            section, _, field = key.partition(".")
            assert section in params, f"stage {name}: no section {section} in params.yaml"
            assert not field or field in params[section], f"stage {name}: no {key} in params.yaml"
    assert {"model", "train.learning_rate"} <= set(stages["train"]["params"])
    # a train.* setting must not rerun the data stages (evaluate follows from train's new model)
    reads_train = {name for name, stage in stages.items() if any(k.split(".")[0] == "train" for k in stage["params"])}
    assert reads_train == {"train"}  # push quotes the settings the model was trained with: data/train/run.json


def test_the_model_is_declared_as_an_artifact():
    pipeline = _load_dvc_yaml()
    artifact = pipeline["artifacts"]["reward-model"]
    assert artifact["type"] == "model" and artifact["path"] == "models/reward_model"
    assert artifact["path"] in _entries(pipeline["stages"]["train"]["outs"])


def test_train_depends_on_exactly_the_settings_in_the_run_fingerprint():
    import dataclasses

    from rm_lib.settings import TrainSettings
    from rm_lib.training.trainer import NOT_IN_FINGERPRINT

    stage = _load_dvc_yaml()["stages"]["train"]
    train_keys = {p.removeprefix("train.") for p in stage["params"] if isinstance(p, str) and p.startswith("train.")}
    assert "train" not in stage["params"]
    assert train_keys == {f.name for f in dataclasses.fields(TrainSettings)} - set(NOT_IN_FINGERPRINT)
    push = _load_dvc_yaml()["stages"]["push"]
    assert "data/train/summary.json" not in _entries(push["deps"])  # timings: never a dependency
    assert "data/train/run.json" in _entries(push["deps"])


def test_outs_metrics_and_plots():
    pipeline = _load_dvc_yaml()
    stages = pipeline["stages"]
    for name, stage in stages.items():
        assert "metrics" not in stage and "plots" not in stage, name  # declared once, at the top level
        paths = list(_entries(stage.get("outs")))
        assert paths, name
        for path in paths:
            assert any(path == f or path.startswith(f + "/") for f in STAGE_FOLDERS[name]), (name, path)
        for folder in STAGE_FOLDERS[name]:
            assert any(p == folder or p.startswith(folder + "/") for p in paths), (name, folder)
    train_outs = _entries(stages["train"]["outs"])
    # checkpoints stay on the machine, never cached or pushed; no persistent out keeps train run-cached
    assert not any(p.startswith("models/checkpoints") for p in train_outs)
    assert not any(options.get("persist") for options in train_outs.values())
    # every other out persists: a failed stage leaves the last output (DVC deletes others first)
    for name in ("download", "tokenize", "filter", "evaluate", "push"):
        assert all(options.get("persist") for options in _entries(stages[name]["outs"]).values()), name
    outs = {p for stage in stages.values() for p in _entries(stage.get("outs"))}
    assert list(_entries(pipeline["metrics"])) == ["data/evaluation/metrics.json"]
    plots = _entries(pipeline["plots"])
    assert set(plots) | {"data/evaluation/metrics.json"} <= outs  # each is an out of the stage that writes it
    loss = plots["data/train/metrics.plot.json"]
    assert (loss["x"], loss["y"]) == ("step", "loss")
    assert {"data/evaluation/buckets.plot.json", "data/evaluation/rewards.png",
            "data/evaluation/accuracy_by_length.png", "data/evaluation/reward_vs_length.png",
            "data/filtered/lengths.png", "data/train/loss.png"} <= set(plots)


# --- a temporary repository ----------------------------------------------------------------

def _python_shim(folder: Path) -> Path:
    """A `python` that is sys.executable, for the stages' `python -m rm_lib ...` commands."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    return folder


def _env(bin_dir: Path) -> dict[str, str]:
    env = offline_env()
    env.update({"PYTHONUNBUFFERED": "1", "PATH": str(bin_dir) + os.pathsep + env.get("PATH", ""),
                "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"})
    return env


class Repo:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=600)
        output = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed with exit code {proc.returncode}:\n{output[-6000:]}")
        return output

    def dvc(self, *args: str, check: bool = True) -> str:
        return self.run(dvc_executable(), *args, check=check)

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def write_params(self, **train: object) -> None:
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        for section, values in TINY.items():
            params[section].update(values)
        params["train"].update(train)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    def versioned_files(self) -> dict[str, tuple[str, int]]:
        """What DVC versions: data/ and models/ but the checkpoints (kept on the machine only) and
        data/sources (the user's files: git holds its README)."""
        return {k: v for k, v in self.files("data", "models").items()
                if not k.startswith(("models/checkpoints/", "data/sources/"))}

    def files(self, *folders: str) -> dict[str, tuple[str, int]]:
        """{relative path: (sha256, mtime_ns)} of every file under the folders."""
        result = {}
        for folder in folders:
            for path in sorted((self.root / folder).rglob("*")):
                if path.is_file():
                    digest = hashlib.sha256()
                    with open(path, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
                    result[path.relative_to(self.root).as_posix()] = (digest.hexdigest(), path.stat().st_mtime_ns)
        return result


def _rmtree(path: Path) -> None:
    """Remove a tree that may hold DVC's read-only cache files and links."""
    def retry(func, target, _exc):
        os.chmod(os.path.dirname(target), stat.S_IRWXU)
        if not os.path.islink(target):
            os.chmod(target, stat.S_IRWXU)
        func(target)

    if path.exists():
        shutil.rmtree(path, onerror=retry)


def _new_repo(root: Path) -> Repo:
    for name in COPY:
        source, target = ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    repo = Repo(root, _env(_python_shim(root.parent / f"{root.name}-bin")))
    repo.write_params()
    repo.git("init", "-q")
    repo.git("config", "commit.gpgsign", "false")
    repo.commit("project")
    return repo


def test_an_older_params_yaml_is_refused_by_the_first_stage_with_the_keys_to_add(tmp_path, monkeypatch):
    """A params.yaml from before train.batch_tokens and the length head: `dvc repro` ran download, tokenize
    and filter again, then stopped with DVC's "Parameters ... are missing" at train."""
    from rm_lib.errors import SettingsError

    from helpers import run_steps, tiny_params

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "download")
    run_steps(tiny_params(), tmp_path, "download")  # a params.yaml with every key: nothing said
    for key in ("batch_tokens", "length_debias"):
        del params["train"][key]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.raises(SettingsError, match=r"^params.yaml lacks train.batch_tokens, train.length_debias, which stages "
                                            r"of dvc.yaml read .* the defaults being: train.batch_tokens: null; "
                                            r"train.length_debias: false$"):
        run_steps(tiny_params(), tmp_path, "download")


def test_dvc_config_and_status(tmp_path):
    repo = _new_repo(tmp_path / "repo")
    config = dict(line.split("=", 1) for line in repo.dvc("config", "--list", "--project").splitlines() if "=" in line)
    assert config["core.analytics"] == "false"
    remote = config["core.remote"]
    # the default remote is a folder of the user's cache, outside every clone, so clones share it
    url = Path(config[f"remote.{remote}.url"]).expanduser()
    assert url == Path.home() / ".cache" / "rm-pipeline" / "dvc-remote"
    assert not url.is_relative_to(repo.root)
    # links where the file system allows (no second copy of a model); a real copy otherwise
    assert config["cache.type"].split(",") == ["reflink", "hardlink", "copy"]
    assert "__pycache__/" in (ROOT / ".dvcignore").read_text(encoding="utf-8")
    status = repo.dvc("status")
    for stage in STAGES:
        assert f"{stage}:" in status


def test_a_file_added_to_data_sources_is_kept_by_checkout_and_sent_by_push(tmp_path, monkeypatch):
    """data/sources/README.md says to `dvc add` a data file there and `dvc push` it. DVC skipped every
    .dvc file under data/, which it took for git-ignored: a plain `dvc push` left the file out and a plain
    `dvc checkout` deleted it ("D data/sources/pairs.jsonl")."""
    repo = _new_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    repo.dvc("remote", "modify", "--local", "local", "url", str(remote))
    source = repo.root / "data/sources/my-prefs.jsonl"
    source.write_text('{"prompt": "q?", "chosen": "good", "rejected": "bad"}\n', encoding="utf-8")
    # the README's commands as written (its `git add` named a .gitignore DVC never writes there, and failed)
    block = re.search(r"```bash\n(.*?)```", (ROOT / "data/sources/README.md").read_text(encoding="utf-8"), re.S)
    commands = [line.split("   #")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [["dvc", "add"], ["git", "add"], ["dvc", "push"]], commands
    env = {**repo.env, "PATH": str(Path(dvc_executable()).parent) + os.pathsep + repo.env["PATH"]}
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=repo.root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{command}: {proc.stdout}{proc.stderr}"
    assert "data/sources/my-prefs.jsonl.dvc" in repo.git("ls-files", "data/sources")
    assert repo.git("status", "--porcelain", "data/sources") == ""
    repo.dvc("checkout", check=False)  # the pipeline has no outputs yet: those fail, as they may
    assert source.is_file(), "a plain dvc checkout deleted the data file"
    md5 = yaml.safe_load((repo.root / "data/sources/my-prefs.jsonl.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file(), "a plain dvc push left the data file out"


@pytest.mark.slow
def test_a_changed_local_source_in_data_sources_reruns_download(tmp_path):
    """A local download.source is a dependency by its bytes: cutting it from 200 rows to 150 shows in
    `dvc status`, and `dvc repro` reruns download; `dvc add` versions it for the team."""
    repo = _new_repo(tmp_path / "repo")
    source = repo.root / "data/sources/pairs.jsonl"
    rows = [{"prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": f"bad {i}"} for i in range(200)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = yaml.safe_load((repo.root / "params.yaml").read_text(encoding="utf-8"))
    params["download"]["source"] = "data/sources/pairs.jsonl"
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    output = repo.dvc("repro", "download")
    assert RAN.findall(output) == ["download"] and "outside" not in output, output[-3000:]
    manifest = repo.root / "data/pairs/manifest.json"
    assert json.loads(manifest.read_text(encoding="utf-8"))["rows_read"] == 200
    assert "download" not in json.loads(repo.dvc("status", "download", "--json"))
    source.write_text("".join(json.dumps(r) + "\n" for r in rows[:150]), encoding="utf-8")
    assert "download" in json.loads(repo.dvc("status", "download", "--json"))  # the cut shows
    output = repo.dvc("repro", "download")
    assert "download" in RAN.findall(output), output[-3000:]
    assert json.loads(manifest.read_text(encoding="utf-8"))["rows_read"] == 150
    assert "download" not in json.loads(repo.dvc("status", "download", "--json"))
    # versioned for the team (data/sources/README.md): the new .dvc file is in the folder, so download
    # runs once more and writes the same pairs
    pairs = repo.files("data/pairs")
    repo.dvc("add", "data/sources/pairs.jsonl")
    assert (repo.root / "data/sources/pairs.jsonl.dvc").exists()
    assert RAN.findall(repo.dvc("repro", "download")) == ["download"]
    assert {k: v[0] for k, v in repo.files("data/pairs").items()} == {k: v[0] for k, v in pairs.items()}
    assert "download" not in json.loads(repo.dvc("status", "download", "--json"))


# --- the pipeline end to end (slow) --------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A repository where `dvc repro` has run every stage once, committed with its dvc.lock."""
    root = tmp_path_factory.mktemp("dvc") / "repo"
    repo = _new_repo(root)
    # a temporary local remote outside the repository, whatever remote the project's config names
    (root / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = scratch\n['remote \"scratch\"']\n    url = {root.parent / 'remote'}\n", encoding="utf-8")
    output = repo.dvc("repro")
    assert RAN.findall(output) == list(STAGES), output[-3000:]
    repo.commit("dvc repro")
    repo.first_commit = repo.git("rev-parse", "HEAD").strip()
    repo.first_files = repo.versioned_files()
    yield repo
    _rmtree(root.parent)  # workspace, cache and remote: about 1.5 GB


@pytest.mark.slow
def test_second_repro_runs_nothing(pipeline):
    before = pipeline.files("data", "models")
    lock = (pipeline.root / "dvc.lock").read_text(encoding="utf-8")
    output = pipeline.dvc("repro")
    assert not RAN.findall(output), output
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output, output
    assert "Data and pipelines are up to date." in pipeline.dvc("status")
    assert pipeline.files("data", "models") == before  # same bytes, not even rewritten
    assert (pipeline.root / "dvc.lock").read_text(encoding="utf-8") == lock


@pytest.mark.slow
def test_push_then_pull_into_an_empty_cache_gives_the_same_bytes(pipeline):
    before = {path: digest for path, (digest, _) in pipeline.versioned_files().items()}
    assert any(p.startswith("models/reward_model/") for p in before)
    assert "data/evaluation/suites.rejects.jsonl" in before  # written empty too, so DVC versions every file
    pipeline.dvc("push")
    assert any((pipeline.root.parent / "remote").rglob("*")), "dvc push wrote nothing to the local remote"
    for folder in (".dvc/cache", "data", "models"):
        _rmtree(pipeline.root / folder)
    pipeline.git("checkout", "--", "data/sources", *GIT_OUTS)  # in git, not DVC
    assert "deleted" in pipeline.dvc("status")
    pipeline.dvc("pull")
    after = {path: digest for path, (digest, _) in pipeline.versioned_files().items()}
    assert after == before
    assert "Data and pipelines are up to date." in pipeline.dvc("status")


@pytest.mark.slow
def test_a_teammate_clones_and_pulls_the_same_model_from_the_default_remote(pipeline, tmp_path):
    """The team workflow of docs/dvc.md: run, commit dvc.lock, `dvc push`; another clone `dvc pull`s
    the same bytes from the embedded default remote (HOME points the user cache at a temporary folder)."""
    env = {**pipeline.env, "HOME": str(tmp_path / "home")}
    mine = Repo(pipeline.root, env)
    assert "dvc.lock" in mine.git("ls-files", "dvc.lock")
    mine.dvc("push", "-r", "local")
    assert any((tmp_path / "home/.cache/rm-pipeline/dvc-remote").rglob("*")), "nothing pushed to the default remote"
    mine.run("git", "clone", "-q", str(pipeline.root), str(tmp_path / "teammate"))
    theirs = Repo(tmp_path / "teammate", env)
    assert not (theirs.root / ".dvc/config.local").exists()  # only the shipped config: the default remote
    theirs.dvc("pull")
    digests = lambda repo: {p: d for p, (d, _) in repo.versioned_files().items()}  # noqa: E731
    assert digests(theirs) == digests(mine) and any(p.startswith("models/reward_model/") for p in digests(theirs))
    assert "Data and pipelines are up to date." in theirs.dvc("status")


@pytest.mark.integration
def test_a_fresh_clone_has_a_baseline_for_exp_show_and_metrics_diff(tmp_path):
    """data/evaluation/metrics.json is versioned by git (`cache: false`), so a clone that ran nothing
    shows HEAD's figures in `dvc exp show` and `dvc metrics diff` loads HEAD (tests/test_demo.py keeps
    those figures equal to what `make run` measures)."""
    clone = Repo(tmp_path / "clone", _env(_python_shim(tmp_path / "bin")))
    clone.root.mkdir()
    clone.run("git", "clone", "-q", str(ROOT), str(clone.root))
    committed = json.loads((clone.root / "data/evaluation/metrics.json").read_text(encoding="utf-8"))
    table = list(csv.DictReader(io.StringIO(clone.dvc("exp", "show", "--csv", "--drop", "^(rm_lib|data|models)/"))))
    head = next(row for row in table if row["rev"] not in ("workspace", ""))
    assert float(head["accuracy"]) == committed["accuracy"] and head["typ"] == "baseline"
    assert "train.learning_rate" in head  # settings beside the metrics, no code hashes
    assert not any(k.startswith("rm_lib/") for k in head)
    assert json.loads(clone.dvc("metrics", "diff", "HEAD", "--json") or "{}") == {}  # HEAD loads; nothing changed
    (clone.root / "data/evaluation/metrics.json").write_text(json.dumps({**committed, "accuracy": 0.5}))
    diff = json.loads(clone.dvc("metrics", "diff", "HEAD", "--json"))
    assert diff["data/evaluation/metrics.json"]["accuracy"]["old"] == committed["accuracy"]


@pytest.mark.slow
def test_a_train_setting_reruns_exactly_train_evaluate_push(pipeline):
    upstream = pipeline.files("data/pairs", "data/tokenized", "data/filtered")
    model = pipeline.files("models/reward_model")
    pipeline.write_params(learning_rate=2e-5)
    # the stage that reads train.learning_rate; evaluate and push follow from train's new model
    assert set(json.loads(pipeline.dvc("status", "--json"))) == {"train"}
    output = pipeline.dvc("repro")  # after the pull above, outputs are cache links: this must cope
    assert RAN.findall(output) == ["train", "evaluate", "push"], output[-3000:]
    for stage in ("download", "tokenize", "filter"):
        assert f"Stage '{stage}' didn't change, skipping" in output
    assert pipeline.files("data/pairs", "data/tokenized", "data/filtered") == upstream
    assert pipeline.files("models/reward_model") != model
    summary = json.loads((pipeline.root / "data/train/summary.json").read_text(encoding="utf-8"))
    assert summary["train"]["learning_rate"] == 2e-5 and summary["steps"] == 2
    assert "Data and pipelines are up to date." in pipeline.dvc("status")
    _assert_cache_intact(pipeline.root)
    pipeline.commit("learning rate 2e-5")


@pytest.mark.slow
def test_train_is_run_cached_and_its_checkpoints_are_never_versioned(pipeline):
    """Back to settings it trained on once: DVC restores train and evaluate from its run cache instead
    of training again; the checkpoints are in no cache and no remote."""
    params_file = pipeline.root / "params.yaml"
    before = params_file.read_text(encoding="utf-8")
    model = {k: v[0] for k, v in pipeline.files("models/reward_model").items()}
    pipeline.write_params(learning_rate=3e-5)
    assert "train" in RAN.findall(pipeline.dvc("repro"))
    params_file.write_text(before, encoding="utf-8")
    output = pipeline.dvc("repro")
    assert "Stage 'train' is cached - skipping run, checking out outputs" in output, output[-3000:]
    assert "train" not in RAN.findall(output)
    assert {k: v[0] for k, v in pipeline.files("models/reward_model").items()} == model
    lock = yaml.safe_load((pipeline.root / "dvc.lock").read_text(encoding="utf-8"))
    assert not any(o["path"].startswith("models/checkpoints") for o in lock["stages"]["train"]["outs"])
    assert "Data and pipelines are up to date." in pipeline.dvc("status")
    pipeline.commit("back to the committed settings")  # the release card names the commit: a new lock


@pytest.mark.slow
def test_settings_that_do_not_change_the_model_rerun_nothing(pipeline):
    """Logging, checkpoint cadence and W&B are not dependencies: a changed logging_steps retrains nothing."""
    params_file = pipeline.root / "params.yaml"
    before = params_file.read_text(encoding="utf-8")
    try:
        pipeline.write_params(learning_rate=2e-5, logging_steps=5, wandb_mode="offline", save_total_limit=3)
        assert "Data and pipelines are up to date." in pipeline.dvc("status")
        assert not RAN.findall(pipeline.dvc("repro"))
    finally:
        params_file.write_text(before, encoding="utf-8")


@pytest.mark.slow
def test_dvc_repro_refuses_a_release_past_the_gate(pipeline):
    """The push stage runs the same release gate as Dagster: a model below push.min_accuracy is not released."""
    report = json.loads((pipeline.root / "data/evaluation/report.json").read_text(encoding="utf-8"))
    assert report["accuracy"] < 1.0, "this test needs a model below perfect accuracy"
    release = pipeline.files("data/release")
    params_file = pipeline.root / "params.yaml"
    before = params_file.read_text(encoding="utf-8")
    params = yaml.safe_load(before)
    params["push"]["min_accuracy"] = 1.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    try:
        output = pipeline.dvc("repro", check=False)
        assert RAN.findall(output) == ["push"], output[-3000:]
        assert "release refused by the release gate" in output and "below the minimum 1.0000" in output
        assert pipeline.files("data/release") == release  # the last release is kept, byte for byte
    finally:
        params_file.write_text(before, encoding="utf-8")
    assert "Data and pipelines are up to date." in pipeline.dvc("status")


@pytest.mark.slow
@pytest.mark.parametrize("stage, section, key, value, folder, error", [
    ("download", "download", "source", "data/sources/same.jsonl", "data/pairs", "no usable pairs for train"),
    ("evaluate", "evaluate", "length_buckets", 0, "data/evaluation", "evaluate.length_buckets"),
])
def test_a_failed_stage_under_dvc_repro_leaves_its_last_output(pipeline, stage, section, key, value, folder, error):
    """DVC deletes a stage's outputs before its command; the outs are persistent, so a stage that fails
    (bad data, a bad setting) leaves the last output as the CLI would, metrics.json (in git, not in the
    cache) included."""
    source = pipeline.root / "data/sources/same.jsonl"  # nothing but pairs whose answers are the same
    if stage == "download":
        source.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n', encoding="utf-8")
    def contents() -> dict[str, str]:  # DVC may copy a persistent out out of its cache link: times change
        return {path: digest for path, (digest, _) in pipeline.files(folder).items()}

    before = contents()
    params_file = pipeline.root / "params.yaml"
    kept = params_file.read_text(encoding="utf-8")
    params = yaml.safe_load(kept)
    params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    try:
        output = pipeline.dvc("repro", stage, check=False)
        assert RAN.findall(output) == [stage] and error in output, output[-3000:]
        assert contents() == before
    finally:
        params_file.write_text(kept, encoding="utf-8")
        source.unlink(missing_ok=True)
        (pipeline.root / "data/pairs.rejects.jsonl").unlink(missing_ok=True)  # the refused download's rejects
    assert "Data and pipelines are up to date." in pipeline.dvc("status")


@pytest.mark.slow
def test_after_a_failed_train_under_dvc_repro_dvc_checkout_train_brings_back_the_model_and_its_records(pipeline):
    """DVC deletes train's outputs (the model and data/train) before its command, and a failed train leaves
    them deleted: the `dvc checkout models/reward_model` docs/dvc.md gave brought back the model alone, and
    push then failed its release gate on the missing run record, naming push.force=true (which failed too)."""
    params_file = pipeline.root / "params.yaml"
    kept = params_file.read_text(encoding="utf-8")
    params = yaml.safe_load(kept)
    params["train"]["learning_rate"] = -1.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    try:
        output = pipeline.dvc("repro", "train", check=False)
        assert "train.learning_rate: must be positive" in output, output[-3000:]
    finally:
        params_file.write_text(kept, encoding="utf-8")
    assert not (pipeline.root / "models/reward_model").exists() and not (pipeline.root / "data/train/run.json").exists()
    pipeline.dvc("checkout", "models/reward_model")
    said = pipeline.run("python", "-m", "rm_lib", "push", check=False)
    assert said.startswith("error: ") and said.count("\n") == 1 and "push.force" not in said, said
    assert "data/train/run.json is missing: the record of the run that trained" in said and \
        "`dvc checkout train` puts back" in said
    assert "Traceback" not in pipeline.dvc("checkout", "train")  # the recovery docs/dvc.md gives
    assert "Data and pipelines are up to date." in pipeline.dvc("status")
    # the note in data/sources is no data: editing it leaves download and evaluate, which depend on the
    # folder, up to date (a commit that edited it made every user's download and evaluate out of date)
    note = pipeline.root / "data/sources/README.md"
    text = note.read_text(encoding="utf-8")
    note.write_text(text + "\nA line a teammate added.\n", encoding="utf-8")
    try:
        assert "Data and pipelines are up to date." in pipeline.dvc("status")
        from rm_lib.files import dvc_md5

        lock = yaml.safe_load((pipeline.root / "dvc.lock").read_text(encoding="utf-8"))
        recorded = next(d["md5"] for d in lock["stages"]["download"]["deps"] if d["path"] == "data/sources")
        assert dvc_md5(pipeline.root / "data/sources") == recorded  # rm_lib's reading of the lock agrees
    finally:
        note.write_text(text, encoding="utf-8")


def _assert_cache_intact(root: Path) -> None:
    """Every cache object still has the bytes its name (their md5) says: no write went through a link."""
    objects = [p for p in (root / ".dvc/cache/files/md5").rglob("*") if p.is_file()]
    assert objects
    for path in objects:
        name = path.parent.name + path.name
        assert hashlib.md5(path.read_bytes()).hexdigest() == name.removesuffix(".dir"), path


@pytest.mark.slow
def test_an_earlier_version_comes_back_with_git_and_dvc_checkout(pipeline):
    """The first run's data and model, restored after a later run replaced them."""
    def contents() -> dict[str, str]:
        return {path: digest for path, (digest, _) in pipeline.versioned_files().items()}

    first = {path: digest for path, (digest, _) in pipeline.first_files.items()}
    latest = contents()
    assert latest != first
    pipeline.git("checkout", "-q", pipeline.first_commit)
    pipeline.dvc("checkout", "--force")
    assert contents() == first
    assert "Data and pipelines are up to date." in pipeline.dvc("status")
    pipeline.git("checkout", "-q", "-")  # and back to the newest version
    pipeline.dvc("checkout", "--force")
    assert contents() == latest


@pytest.mark.slow
def test_exp_run_and_exp_show(pipeline):
    import dataclasses

    from rm_lib.settings import load_params

    before = load_params(pipeline.root / "params.yaml")
    output = pipeline.dvc("exp", "run", "-S", "train.learning_rate=1e-4")
    assert RAN.findall(output) == ["train", "evaluate", "push"], output[-3000:]
    # -S rewrites params.yaml (its nulls may come back as empty values): every other setting means the same
    after = load_params(pipeline.root / "params.yaml")
    assert after.train.learning_rate == 1e-4
    same_rate = dataclasses.replace(after.train, learning_rate=before.train.learning_rate)
    assert dataclasses.replace(after, train=same_rate) == before
    table = list(csv.DictReader(io.StringIO(pipeline.dvc("exp", "show", "--csv"))))
    ours = [row for row in table if row["Experiment"] and float(row["train.learning_rate"]) == 1e-4]
    assert len(ours) == 1, f"dvc exp show lists no experiment with train.learning_rate=1e-4: {table}"
    assert 0.0 <= float(ours[0]["accuracy"]) <= 1.0
    # the release's card names the experiment that holds the settings and dvc.lock HEAD does not
    card = (pipeline.root / "data" / "release" / "README.md").read_text()
    assert f"Reproduce: `dvc exp apply {ours[0]['Experiment']}` (the DVC experiment, on commit" in card, card[-3000:]
    # `make exp`: the same table without a column per code folder or data file
    drop = re.search(r"^EXP_SHOW := exp show --drop '(.+)'$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"dvc exp show --drop '{drop}'" in (ROOT / "README.md").read_text()  # the README shows the same
    slim = list(csv.DictReader(io.StringIO(pipeline.dvc("exp", "show", "--csv", "--drop", drop))))
    columns = set(slim[0])
    assert {"accuracy", "train.learning_rate", "prefers_longer"} <= columns
    assert not {c for c in columns if c.startswith(("rm_lib/", "data/", "models/"))}, columns
    assert len(columns) < len(table[0])
    # the experiment is applied to the workspace, outputs and dvc.lock agree
    assert "Data and pipelines are up to date." in pipeline.dvc("status")


@pytest.mark.slow
def test_metrics_and_plots_show(pipeline):
    output = pipeline.dvc("metrics", "show")
    assert "data/evaluation/metrics.json" in output and "accuracy" in output
    (workspace,) = json.loads(pipeline.dvc("metrics", "show", "--json")).values()
    assert 0.0 <= workspace["data"]["data/evaluation/metrics.json"]["data"]["accuracy"] <= 1.0
    plots = json.loads(pipeline.dvc("plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    assert {"data/train/metrics.plot.json", "data/evaluation/buckets.plot.json", "data/train/loss.png",
            "data/evaluation/rewards.png", "data/evaluation/accuracy_by_length.png",
            "data/filtered/lengths.png"} <= set(plots["data"])
    loss_points = json.loads((pipeline.root / "data/train/metrics.plot.json").read_text(encoding="utf-8"))
    assert [p["step"] for p in loss_points] == [1, 2]
    # the length buckets as bars in length order, also where two revisions' ranges differ: Vega-Lite sorts a
    # text axis as text unless told otherwise, so real data's "181-260" came before "95-180"
    (buckets,) = plots["data"]["data/evaluation/buckets.plot.json"]
    spec = buckets["content"]
    assert spec["encoding"]["y"] == {"field": "range", "type": "nominal", "title": "range",
                                     "sort": {"field": "range_start", "op": "min", "order": "ascending"}}
    assert spec["transform"] == [{"calculate": "toNumber(split(datum['range'], '-')[0])", "as": "range_start"}]
    assert all(re.fullmatch(r"\d+-\d+", row["range"]) for row in spec["data"]["values"])  # what the sort reads


@pytest.mark.slow
def test_a_change_to_the_training_code_trains_a_new_model(pipeline):
    """The run fingerprint covers the code train runs: `dvc repro` after an edit of rm_lib/model/loss.py trains
    from scratch (no resume of the old final checkpoint), and dvc.lock and the model say which code."""
    before = json.loads((pipeline.root / "data/train/run.json").read_text(encoding="utf-8"))
    loss = pipeline.root / "rm_lib" / "model" / "loss.py"
    loss.write_text(loss.read_text(encoding="utf-8") + "\n# an edit of the training code\n", encoding="utf-8")
    assert "train" in json.loads(pipeline.dvc("status", "--json"))
    output = pipeline.dvc("repro")
    # tokenize reruns too (it reads the tokenizer through rm_lib/model) and writes the same tokens
    assert {"train", "evaluate"} <= set(RAN.findall(output)) and "download" not in RAN.findall(output), output[-3000:]
    after = json.loads((pipeline.root / "data/train/run.json").read_text(encoding="utf-8"))
    summary = json.loads((pipeline.root / "data/train/summary.json").read_text(encoding="utf-8"))
    assert after["code_hash"] != before["code_hash"] and after["fingerprint"] != before["fingerprint"]
    assert summary["resumed_from"] is None and not summary["reused"]  # trained, not resumed
    model = json.loads((pipeline.root / "models/reward_model/rm_lib.json").read_text(encoding="utf-8"))
    assert model["code_hash"] == after["code_hash"]
    assert "Data and pipelines are up to date." in pipeline.dvc("status")

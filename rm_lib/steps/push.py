"""push: the release gate, then the model folder + a generated model card -> data/release, then to
the Hub if asked.

The gate (rm_lib.evaluation.quality.release_verdicts: finite training loss, push.min_accuracy on at
least push.min_test_pairs held-out pairs, not below the last release of the same source,
push.min_subset_accuracy per subset, push.max_length_correlation, push.max_test_seen_by_base) holds
here, so the CLI, `dvc repro` and Dagster refuse the same models; push.force releases anyway and the
model card says so (under push.dry_run the refused release is written, its card saying so). Without
push.repo_id (or with push.dry_run) it writes exactly what would be
uploaded and says so; no request leaves the machine and no token is needed.
Otherwise the release is uploaded as one revision of the repository (created private when
push.private, the default) and tagged with the training run (`run-<fingerprint>`). The release is
built in a temporary folder and becomes data/release only when the whole push succeeded: a refused
or failed push keeps the model and the previous data/release as they are (a dry run writes what a refused
push would upload, its card saying so).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rm_lib.data import sources, trained_prompts
from rm_lib.errors import UserError
from rm_lib.evaluation import quality
from rm_lib.files import atomic_dir, read_json, share_tree, write_json
from rm_lib.layout import Layout
from rm_lib.model.modeling import base_files, base_identity, resolve_model_path
from rm_lib.pipeline import chain, code_version, dvc_record
from rm_lib.publish import hub, licenses, model_card
from rm_lib.publish.public import public, public_text
from rm_lib.settings import DEFAULT_MODEL, Params, names_a_folder

PICTURES = ("rewards.png", "reward_vs_length.png", "accuracy_by_length.png")  # from data/evaluation
LOSS_PICTURE = "loss.png"  # from data/train


class ReleaseBlocked(UserError):
    """The release gate failed: nothing is written or uploaded."""


@dataclass
class PushResult:
    release_dir: Path
    uploaded: bool
    url: str | None
    commit: str | None
    files: list[str]
    repo_id: str | None = None
    tag: str | None = None
    gate: str | None = None  # the accuracy verdict: what the release was compared with, and on which pairs
    refused: bool = False  # the gate failed (a dry run writes the release all the same, saying so)
    tag_error: str | None = None  # the revision landed, but could not be tagged: why
    new_revision: bool = True  # False: the Hub's head held this release already, and no revision was made
    forced: bool = False  # released past a failed gate under push.force (the card says so)
    failed_checks: tuple[str, ...] = ()  # "check: why" of each blocking check that failed (refused or forced)

    def summary(self) -> str:
        if self.uploaded and not self.new_revision:
            line = (f"push: {self.url} holds this release already (revision {self.commit}): no new revision; its "
                    f"files are in {self.release_dir}" + (f" (tag {self.tag})" if self.tag else ""))
        elif self.uploaded:
            line = (f"push: uploaded {len(self.files)} files from {self.release_dir} to {self.url} "
                    f"(revision {self.commit}, " + (f"tag {self.tag})" if self.tag else "not tagged)"))
        elif self.refused:
            line = (f"push: nothing uploaded (push.dry_run); the release gate refuses this model, judged against "
                    f"data/release (a push to a Hub repository is judged against the release it holds): "
                    f"{'; '.join(self.failed_checks)}; the {len(self.files)} files it would upload are in "
                    f"{self.release_dir}, their card saying so")
        else:
            line = (f"push: nothing uploaded (no push.repo_id, or push.dry_run); the {len(self.files)} files that "
                    f"would be published are in {self.release_dir}")
        return (line + (f"\n  {self.gate}" if self.gate else "")
                + (f"\nwarning: the release gate failed ({'; '.join(self.failed_checks)}); "
                   + ("released anyway under push.force=true" if self.uploaded else
                      "under push.force=true it would be released anyway (nothing was uploaded)")
                   + ", its card saying so" if self.forced else "")
                + (f"\nwarning: revision {self.commit} is published, but it could not be tagged: {self.tag_error}; "
                   "push again to tag it (the Hub holds this release: no new revision is made): `python -m rm_lib "
                   "push`, or `dvc repro -f push` (dvc repro holds the stage done)"
                   if self.tag_error else ""))


def _copy_pictures(layout: Layout, out: Path) -> list[str]:
    sources = [layout.evaluation / name for name in PICTURES] + [layout.train_logs / LOSS_PICTURE]
    pictures = []
    for source in sources:
        if source.exists():
            shutil.copyfile(source, out / source.name)
            pictures.append(source.name)
    return pictures


def gate(params: Params, layout: Layout, release: Path | None = None) -> list[quality.Verdict]:
    """The release verdicts; raises ReleaseBlocked when one fails and push.force is off. `release`: the
    folder of the last release's evaluation.json and README.md (default data/release). Under push.dry_run
    a failed gate is said, not raised: a dry run shows what a push would upload and whether it may (a
    `dvc exp run -S push.dry_run=true` of a model below the last release failed, and the experiment was
    lost); the card and evaluation.json say the gate failed, and the bar stays for the next push."""
    cfg = params.push
    verdicts = quality.release_verdicts(layout, cfg, release)
    failed = quality.blocking_failures(verdicts)
    if failed and not cfg.force and not cfg.dry_run:
        reasons = "; ".join(f"{v.name}: {v.description}" for v in failed)
        raise ReleaseBlocked(f"push: release refused by the release gate ({reasons}); data/release and the Hub "
                             "are unchanged. Fix the model, or set push.force=true to release it anyway "
                             "(the model card then says the gate failed)")
    return verdicts


def build_release(params: Params, layout: Layout, out: Path, verdicts: list[quality.Verdict] = (),
                  release: Path | None = None) -> None:
    """data/release as `out`: the model, its card and evaluation.json, which records the bar of the last
    release it was judged against (or would have been, under push.compare_with_release=false) and
    whether it was forced past the gate (quality.release_bar reads both for the next release). No file
    names a folder of this machine (rm_lib.publish.public)."""
    metrics = read_json(layout.evaluation / "report.json")
    # the model's own files, no temporaries (a killed `dvc checkout`'s copies, an interrupted train's mark);
    # copied file by file: a DVC cache's read-only mode stays behind
    record = read_json(layout.model / "rm_lib.json") if (layout.model / "rm_lib.json").is_file() else {}
    recorded = record.get("files")
    names = list(recorded) if isinstance(recorded, dict) else chain.model_files(layout.model)
    for name in [*names, "rm_lib.json"] if record else names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(layout.model / name, out / name)
        except FileNotFoundError:
            raise UserError(f"push: {layout.model} lacks {name}: deleted as the release was copied; data/release and "
                            f"the Hub are unchanged. Run train and evaluate{chain.checkout_hint(layout)}") from None
    # the gate judged the model the report was made of: the copy must be that one, whole, also when a train
    # finished in the meantime
    saved = read_json(out / "rm_lib.json") if (out / "rm_lib.json").exists() else {}
    if saved.get("content_hash") != metrics.get("inputs", {}).get("model"):
        raise UserError(f"push: {layout.model} is not the model data/evaluation/report.json was made of (a train "
                        "finished meanwhile?); data/release and the Hub are unchanged. Run evaluate, then push")
    differs = chain.model_files_differ(out, saved) if saved.get("content_hash") else None
    if differs:
        raise UserError(f"push: {layout.model} {differs}; data/release and the Hub are unchanged. Run train and "
                        f"evaluate{chain.checkout_hint(layout)}")
    root = layout.root.resolve()
    withheld = () if params.push.publish_trained_prompts else (trained_prompts.FILE,)
    if saved:  # its `files` list what the release holds
        files = saved.get("files")
        kept = {**saved, "files": {k: v for k, v in files.items() if k not in withheld}} \
            if isinstance(files, dict) else saved
        write_json(out / "rm_lib.json", public(kept, root))
    for name in withheld:  # a model trained on from the release then names it unrecorded
        (out / name).unlink(missing_ok=True)
    _copy_pictures(layout, out)
    write_card(params, layout, out, verdicts, params.push.repo_id or "reward-model")
    share_tree(out)
    failed = bool(quality.blocking_failures(list(verdicts)))  # forced past the gate, or refused by it (dry run)
    # written here and nowhere else (no push.repo_id, or push.dry_run) without comparing with the last release
    uncompared = (params.push.dry_run or not params.push.repo_id) and not params.push.compare_with_release
    # a release forced past, or refused by, its gate passes on the bar, and so does one written here that
    # compared nothing: the release it replaces, also where that holds this very model (a dry run of the
    # released model under a stricter gate erased the bar)
    carried = failed or uncompared
    model = metrics.get("inputs", {}).get("model")
    judged_against = quality.release_bar(layout, None if carried else model, release)
    # "forced": the gate failed (the key an earlier version wrote, which quality.release_bar reads)
    marks = {"forced": failed, **({quality.UNCOMPARED_DRY_RUN: True} if uncompared else {})}
    write_json(out / "evaluation.json", {**public(metrics, root), quality.JUDGED_AGAINST: judged_against, **marks})


# The stages that made the model: dvc.lock recording them with other code or settings than the checkout
# holds means this commit does not remake it.
MODEL_STAGES = ("download", "tokenize", "filter", "train")


def data_code_differs(layout: Layout) -> list[str]:
    """Where no dvc.lock records the data steps' code (it does, and lock_differs compares it): the data
    steps whose output names other code than the checkout's, or none (made before it was recorded). Only
    the training code was compared, and a checkout whose download made other pairs was claimed to remake
    the model."""
    if (layout.root / "dvc.lock").exists():
        return []
    made = (("download", layout.pairs), ("tokenize", layout.tokenized), ("filter", layout.filtered))
    return [step for step, folder in made if _other_code(step, folder)]


def _other_code(step: str, folder: Path) -> bool:
    """Whether `folder` was made by other code of `step` than the checkout's (or by a version that did not
    record its code)."""
    return code_version.recorded_code(folder) != code_version.code_hash(step)


def base_doubts(layout: Layout, name_or_path: str, trained_from: str | None) -> list[str]:
    """Why a checkout cannot hold the local base model folder training read: gone, changed since (its content
    hash, `trained_from`: summary.json's base_content), or kept by neither git nor DVC. None for the default
    model (a pinned package) or a Hub model (its commit is on the card)."""
    if name_or_path == DEFAULT_MODEL:
        return []
    path = _in_project(Path(resolve_model_path(name_or_path)).expanduser(), layout)
    if not path.is_dir():  # training read a local folder (its hash recorded), or the name says it is one
        local = path.exists() or names_a_folder(name_or_path) or (trained_from or "").startswith("sha256:")
        return [f"the base model {name_or_path} is not a folder there now"] if local else []
    read = [path / name for name in base_files(path)]  # the files training read (not a download's leftovers)
    if not model_card.versioned(layout.root.resolve(), path, read):
        return [f"the base model {name_or_path} is kept by neither git nor DVC: no checkout holds it"]
    try:
        changed = bool(trained_from) and _base_identity(path) != trained_from
    except OSError as exc:
        return [f"the base model {name_or_path} cannot be read now ({exc.strerror})"]
    return [f"the base model {name_or_path} changed since training read it"] if changed else []


_identities: dict[tuple, str] = {}  # base folders hashed, by their files' sizes and times: a push hashes once


def _base_identity(path: Path) -> str:
    stats = tuple((name, (path / name).stat().st_size, (path / name).stat().st_mtime_ns) for name in base_files(path))
    key = (str(path.resolve()), stats)
    if key not in _identities:
        _identities[key] = base_identity(str(path))
    return _identities[key]


def _in_project(path: Path, layout: Layout) -> Path:
    """A relative path a step read, from the current folder, else from the project's (push run with --root
    from another folder than the step that read it)."""
    if path.exists() or path.is_absolute() or not (layout.root / path).exists():
        return path
    return layout.root / path


def source_doubts(layout: Layout) -> list[str]:
    """Why a checkout cannot hold the local file the pairs were read from as download read it: changed since
    (its content hash, the manifest's source_sha256), gone, or kept by neither git nor DVC. None for the demo
    set or a Hub dataset (its revision is on the card)."""
    manifest = read_json(layout.pairs / "manifest.json")
    if manifest.get("kind") != "local" or not manifest.get("source"):
        return []
    # as download read it: from the folder the command ran in, which push may not run in (--root)
    source = _in_project(Path(manifest["source"]).expanduser(), layout)
    if not source.exists():
        return [f"the source {source} that download read is not there now (a checkout of another commit?): no "
                "checkout is known to hold it"]
    doubts = []
    recorded = manifest.get("source_sha256")
    if recorded and _fingerprint(source)["sha256"] != recorded:
        doubts.append(f"the source {source} changed since download read it")
    if not model_card.versioned(layout.root.resolve(), source, sources.local_files(source)):
        doubts.append(f"the source {source} is kept by neither git nor DVC: no checkout holds it (`dvc add` it in "
                      "data/sources, docs/dvc.md)")
    return doubts


_fingerprints: dict[str, dict] = {}  # local sources hashed: read again only where a file's size or time changed


def _fingerprint(source: Path) -> dict:
    key = str(source.resolve())
    _fingerprints[key] = sources.local_fingerprint(source, _fingerprints.get(key))
    return _fingerprints[key]


def card_lineage(layout: Layout, summary: dict, trained: dict, recorded: dict[str, dict]) -> dict:
    """Where the model comes from, and each reason a commit of this checkout may not remake it, for the card:
    `summary` and `trained` are data/train's summary.json and run.json, `recorded` each step's settings as
    its output records them (chain.recorded_settings)."""
    manifest = read_json(layout.pairs / "manifest.json")
    lineage = model_card.lineage(layout.root.resolve(), summary, manifest,
                                 code_hash_now=code_version.code_hash("train"),
                                 lock_differs=dvc_record.lock_differs(layout.root, MODEL_STAGES))
    record = layout.model / "rm_lib.json"
    lineage["base_reward_model"] = read_json(record).get("base_reward_model") if record.exists() else None
    lineage["data_code_differs"] = data_code_differs(layout)
    lineage["evaluation_code_differs"] = _other_code("evaluate", layout.evaluation)  # with or without dvc.lock
    lineage["input_doubts"] = [*source_doubts(layout),
                               *base_doubts(layout, trained["model"]["name_or_path"], summary.get("base_content"))]
    model = {"model": trained["model"], "train": trained["train"]}
    # a null: a setting an earlier version did not record
    made = {section: {k: v for k, v in values.items() if v is not None} for section, values in recorded.items()}
    lineage["params_settings_differ"] = dvc_record.params_settings_other_than(
        layout.root, (*MODEL_STAGES, "evaluate"), {**made, **model})
    lineage["lock_settings_differ"] = dvc_record.lock_settings_other_than(layout.root, "train", model)
    ran = sorted({f for step in (*MODEL_STAGES, "evaluate") for f in code_version.step_code(step, cli=False)})
    lineage.update(model_card.code_checkout(layout.root.resolve(), code_version.ROOT, ran))
    commit = lineage.get("git_commit")
    if lineage["code_changed"] and not lineage["code_elsewhere"] and commit and "uncommitted" not in commit:
        lineage["git_commit"] = f"{commit} (with uncommitted changes)"  # the project is a folder of the checkout
    experiment = dvc_record.experiment_running()  # named only where the checkout is at its baseline commit
    head = (lineage.get("git_commit") or "").split(" ")[0]
    lineage["dvc_experiment"] = experiment if experiment and head == experiment["baseline"] else None
    tokenized = layout.tokenized / "manifest.json"  # what the chat template left out of, or refused, per split
    record = read_json(tokenized) if tokenized.exists() else {}
    lineage["template_left_out"] = record.get("prompts_left_out") or {}
    lineage["template_refused"] = record.get("refused_by_template") or {}
    return lineage


def write_card(params: Params, layout: Layout, out: Path, verdicts: list[quality.Verdict], repo_id: str) -> None:
    """The model card of the release in `out`, for the repository `repo_id` (its loading examples name it)."""
    metrics = read_json(layout.evaluation / "report.json")
    trained = read_json(layout.train_logs / "run.json")  # the settings the model was trained with
    recorded = chain.recorded_settings(layout)
    lineage = card_lineage(layout, read_json(layout.train_logs / "summary.json"), trained, recorded)
    pictures = [name for name in (*PICTURES, LOSS_PICTURE) if (out / name).exists()]
    gate_rows = [{"check": v.name, "passed": v.passed, "description": v.description} for v in verdicts]
    # what the model was made from, as recorded by the steps that made it; not params.yaml as it is now
    card_params = {**params.as_dict(), **recorded, "model": trained["model"], "train": trained["train"]}
    card = model_card.render(repo_id=repo_id, params=card_params, metrics=metrics, lineage=lineage,
                             pictures=pictures, gate=gate_rows,
                             forced=params.push.force and bool(quality.blocking_failures(list(verdicts))),
                             refused=not params.push.force and bool(quality.blocking_failures(list(verdicts))),
                             adapter=model_card.adapter_facts(out), tokenizer=model_card.tokenizer_facts(out))
    # the rm_lib folder that ran, where it is not the project's: by its name, as any other local path
    (out / "README.md").write_text(public_text(card, layout.root.resolve(), card_params, metrics,
                                               lineage.get("code_elsewhere")), encoding="utf-8")


def run_tag(layout: Layout) -> str:
    """The tag of a pushed revision: the training run's fingerprint (settings + data + code)."""
    return f"run-{read_json(layout.train_logs / 'run.json')['fingerprint']}"


def run(params: Params, layout: Layout) -> PushResult:
    cfg = params.push
    unlisted = licenses.unlisted_license_note(cfg.license)
    if unlisted:
        print(f"warning: {unlisted}", file=sys.stderr)
    if cfg.repo_id is None or cfg.dry_run:
        return _release(params, layout, None)
    with tempfile.TemporaryDirectory(prefix="rm-lib-hub-release-") as scratch:
        # the bar is the release the repository holds now, whoever pushed it: not this folder's data/release
        on_hub = hub.current_release(cfg.repo_id, Path(scratch), kept=layout.model)
        _check_visibility(cfg.private, on_hub, layout.model)
        refusal = hub.foreign_files_refusal(on_hub, layout.model)
        if refusal is not None:
            raise refusal
        return _release(params, layout, on_hub)


def _release(params: Params, layout: Layout, on_hub: hub.HubRelease | None) -> PushResult:
    cfg = params.push
    verdicts = gate(params, layout, on_hub.folder if on_hub else None)
    info = None
    # Built aside and uploaded from there: data/release changes only once the upload succeeded.
    with atomic_dir(layout.release) as out:
        build_release(params, layout, out, verdicts, on_hub.folder if on_hub else None)
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        if on_hub is not None:
            # a bare name lands in the token owner's namespace: the card's examples must name the full id
            info = hub.upload(out, cfg.repo_id, private=cfg.private, commit_message=cfg.commit_message,
                              tag=run_tag(layout), kept=layout.model, parent_commit=on_hub.commit,
                              named=lambda full_id: write_card(params, layout, out, verdicts, full_id))
    said = next((v.description for v in verdicts if v.name == "release_gate"), None)
    failures = tuple(f"{v.name}: {v.description}" for v in quality.blocking_failures(verdicts))
    failed = bool(failures)
    if info is None:
        return PushResult(layout.release, False, None, None, files, gate=said, refused=failed and not cfg.force,
                          forced=failed and cfg.force, failed_checks=failures)
    compared = _compared_with(on_hub, layout, verdicts) if cfg.compare_with_release else None
    if compared:
        said = f"{said}\n  {compared}" if said else compared
    return PushResult(layout.release, True, info["url"], info["commit"], files, info["repo_id"], info["tag"], said,
                      tag_error=info.get("tag_error"), new_revision=info["commit"] != on_hub.commit,
                      forced=failed and cfg.force, failed_checks=failures)


def _compared_with(on_hub: hub.HubRelease, layout: Layout, verdicts: list[quality.Verdict]) -> str | None:
    """Where the bar came from, in words: the Hub's head, what that head was judged against, or nothing."""
    if not on_hub.holds_release:
        return f"{on_hub.repo_id} held no release of this project before this one: no earlier model to compare with"
    accuracy = next((v for v in verdicts if v.name == "release_gate"), None)
    if accuracy is None or accuracy.metadata.get("compared_with_previous") is not True:
        return None  # the gate's line says why it compared nothing
    head = read_json(on_hub.folder / "evaluation.json")
    model = read_json(layout.evaluation / "report.json").get("inputs", {}).get("model")
    if quality.stands_on_its_bar(head, model):
        return (f"compared with what the release at {on_hub.repo_id} revision {on_hub.commit} was judged against "
                "(that release is this model, or was forced past its gate)")
    return f"compared with the release at {on_hub.repo_id} revision {on_hub.commit}, as the Hub held it"


def _check_visibility(private: bool, on_hub: hub.HubRelease, kept: Path) -> None:
    """push.private against the repository as it is: the Hub keeps an existing repository's visibility
    whatever the push asks, so a private release would go into a public repository unseen."""
    if private and on_hub.private is False:
        raise hub.visibility_refusal(on_hub.repo_id, kept)
    if not private and on_hub.private:
        print(f"note: {on_hub.repo_id} is private on the Hub: push.private=false does not make it public (its "
              "settings on the Hub do)", file=sys.stderr)

"""What each output was made from. Every step's record (its manifest) holds the content hash of what
it wrote and, under `inputs`, the content hash of the output it read; before a step runs, every link
upstream of its input must still hold, or the step would build on data that no longer matches
(a tokenize killed after a new download: filter would filter the old tokens under the new name)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from rm_lib.errors import UserError
from rm_lib.files import DVC_IGNORED, file_sha256, missing, read_json, tree_digest, tree_sha256
from rm_lib.layout import SPLITS, Layout
from rm_lib.settings import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, Params


class StaleInput(UserError):
    """An output was made from other data than its upstream folder holds now."""


@dataclass(frozen=True)
class Link:
    output: str  # the Layout property of the folder
    record: str  # its file that holds `content_hash` and `inputs`
    step: str  # the step that writes it
    made_from: str  # a different version of this output, in words: "other pairs"
    upstream: str | None = None
    files: str | None = None  # the files `content_hash` is over, per split ("{split}.jsonl"), where it is


CHAIN = (Link("pairs", "manifest.json", "download", "other pairs", files="{split}.jsonl"),
         Link("tokenized", "manifest.json", "tokenize", "other token ids", "pairs", files="{split}.parquet"),
         Link("filtered", "manifest.json", "filter", "other filtered pairs", "tokenized", files="{split}.parquet"),
         Link("model", "rm_lib.json", "train", "another model", "filtered"),
         Link("evaluation", "report.json", "evaluate", "another evaluation", "model"))
READS = {"tokenize": "pairs", "filter": "tokenized", "train": "filtered", "evaluate": "model", "push": "evaluation"}
STEPS = [link.step for link in CHAIN] + ["push"]
UPSTREAMS = {link.upstream for link in CHAIN}  # the outputs another is made from: their records need a content_hash


def download_settings(layout: Layout) -> dict:
    """The download settings the pairs in `layout` were made with (their manifest keeps them): what the
    report and the model card name as the data, whatever params.yaml says now."""
    manifest = read_json(layout.pairs / "manifest.json")
    if "settings" in manifest:
        return manifest["settings"]
    # a manifest from before the settings were kept: what it recorded itself (a demo source's rows are
    # its pairs); the rest is unknown
    demo_rows = manifest.get("rows_read") if manifest["source"] == "demo" else None
    seeded = re.search(r"\bseed=(\d+)", manifest.get("split") or "")  # "seeded by prompt, ..., seed=42"
    return {"source": manifest["source"], "subset": manifest.get("subset"), "revision": manifest.get("revision"),
            "train_split": None, "demo_pairs": demo_rows, "seed": int(seeded.group(1)) if seeded else None}


# What records made before the settings were kept held of them at their top level: filter its lengths and
# policy, tokenize the template it resolved ("auto" written as what it chose).
KEPT_AT_TOP = {"tokenize": ("template",), "filter": ("max_token_length", "max_prompt_token_length", "policy")}


def recorded_settings(layout: Layout) -> dict[str, dict]:
    """The settings of each step as the outputs in `layout` were made with them, by section (download,
    tokenize, filter, evaluate), where their records keep them; the model card quotes these, not
    params.yaml as it is now. The model's and training's are in data/train/run.json."""
    recorded = {"download": download_settings(layout)}
    for section, record in (("tokenize", layout.tokenized / "manifest.json"),
                            ("filter", layout.filtered / "manifest.json"),
                            ("evaluate", layout.evaluation / "report.json")):
        if not record.exists():
            continue
        made = read_json(record)
        # made by a version that did not record them: what the record kept, else unknown (null), as download's
        # are; never params.yaml's
        recorded[section] = made["settings"] if made.get("settings") is not None else {
            key: made.get(key) if key in KEPT_AT_TOP.get(section, ()) else None
            for key in asdict(getattr(Params(), section))}
    return recorded


def inputs(layout: Layout, upstream: str) -> dict[str, str]:
    """The `inputs` entry of a record made from `upstream` (a Layout property) as it is now."""
    link = next(link for link in CHAIN if link.output == upstream)
    return {upstream: read_json(getattr(layout, upstream) / link.record)["content_hash"]}


def _rerun(first: str, step: str) -> str:
    """`rerun tokenize`, or `rerun tokenize, then filter and train` when later steps built on it too."""
    later = STEPS[STEPS.index(first) + 1:STEPS.index(step)]
    if not later:
        return f"rerun {first}"
    listed = later[0] if len(later) == 1 else f"{', '.join(later[:-1])} and {later[-1]}"
    return f"rerun {first}, then {listed}"


def input_record(step: str, layout: Layout) -> Path | None:
    """The record of the output `step` reads (None for download, which reads a source)."""
    if step not in READS:
        return None
    link = next(link for link in CHAIN if link.output == READS[step])
    return getattr(layout, link.output) / link.record


# The other records a step reads (train the tokenizer's template, evaluate the pairs' source, push all of
# them for the card), each also one of its DVC dependencies: DVC hashes those once the stage has ended.
ALSO_READS = {"train": ("tokenized",), "evaluate": ("filtered", "pairs"),
              "push": ("model", "filtered", "tokenized", "pairs")}


def records_read(step: str, layout: Layout) -> list[Path]:
    """Every record `step` reads, its input's first: what must not change while it runs."""
    own = input_record(step, layout)
    others = [getattr(layout, link.output) / link.record for name in ALSO_READS.get(step, ())
              for link in CHAIN if link.output == name]
    if step == "push":  # the card quotes the settings the model trained with (written with the model)
        others.append(layout.train_logs / "run.json")
    return ([own] if own is not None else []) + others


def _records(layout: Layout, links: list[Link]) -> dict[str, dict]:
    """The records that exist (a missing one is the step's own "run ... first" error, or nothing to check)."""
    found = {}
    for link in links:
        path = getattr(layout, link.output) / link.record
        if path.exists():
            found[link.output] = read_json(path)
    return found


def check(step: str, layout: Layout) -> None:
    """Refuse to run `step` on input whose chain back to the pairs does not hold, naming the step to rerun."""
    if step not in READS:
        return
    links = list(CHAIN[:[link.output for link in CHAIN].index(READS[step]) + 1])
    records = _records(layout, links)
    for link in links:  # upstream first: the earliest broken link is the first step to rerun
        if link.output in records:
            _check_link(link, records, layout, step)
    _check_bytes(links[-1], records, layout, step)
    if "model" in records and "content_hash" in records["model"]:  # evaluate and push read the model itself
        differs = model_files_differ(layout.model, records["model"])
        if differs:
            raise StaleInput(f"{layout.model} {differs}; {_rerun('train', step)}{checkout_hint(layout)}")
    if step == "push":
        _check_summary(layout, records.get("model"))
        report = layout.evaluation / "report.json"
        if "model" in records and not report.exists():  # else the gate failed on it, and push.force led nowhere
            raise StaleInput(f"{missing(report)}: the evaluation the release gate judges; run evaluate"
                             + (", or let `dvc checkout -f evaluate` put back the one dvc.lock records"
                                if (layout.root / "dvc.lock").is_file() else ""))


def _check_link(link: Link, records: dict[str, dict], layout: Layout, step: str) -> None:
    path: Path = getattr(layout, link.output)
    record = records[link.output]
    if link.output in UPSTREAMS and "content_hash" not in record:
        raise StaleInput(f"{path / link.record} records no content hash (an older rm_lib wrote it); "
                         f"{_rerun(link.step, step)}")
    if link.upstream is None or link.upstream not in records:
        return
    recorded = record.get("inputs", {}).get(link.upstream)
    if recorded is None:
        raise StaleInput(f"{path / link.record} does not record which {_noun(link.upstream)} it was made from "
                         f"(an older rm_lib wrote it); {_rerun(link.step, step)}")
    if recorded != records[link.upstream]["content_hash"]:
        upstream = next(u for u in CHAIN if u.output == link.upstream)
        raise StaleInput(f"{path} was made from {upstream.made_from} than {getattr(layout, link.upstream)} "
                         f"holds now; {_rerun(link.step, step)}")


def _check_bytes(link: Link, records: dict[str, dict], layout: Layout, step: str) -> None:
    """The files the step reads are the ones their record describes: a file replaced, cut short or
    deleted since its step wrote it names that step instead of a traceback or a silent read."""
    record = records.get(link.output)
    if link.files is None or record is None or "content_hash" not in record:
        return
    folder: Path = getattr(layout, link.output)
    names = [link.files.format(split=split) for split in SPLITS]
    gone = [name for name in names if not (folder / name).is_file()]
    if gone:
        raise StaleInput(f"{folder / gone[0]} is missing (deleted since {link.step} wrote it); "
                         f"{_rerun(link.step, step)}")
    if tree_sha256(folder, names) != record["content_hash"]:
        raise StaleInput(f"{folder} holds other files than its {link.record} records (changed or damaged since "
                         f"{link.step} wrote them); {_rerun(link.step, step)}")


def model_files(folder: Path) -> list[str]:
    """The files of a trained model folder, in the order train hashed them: all but its rm_lib.json, hidden
    ones (a finder's .DS_Store, a notebook's checkpoints) and what .dvcignore ignores (the `.<random>.tmp`
    copies a killed `dvc checkout` or `dvc pull` leaves, an interrupted train's mark)."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    names = [str(p.relative_to(folder)) for p in paths]
    return [n for n in names if n != "rm_lib.json" and not DVC_IGNORED.search(Path(n).as_posix())
            and not any(part.startswith(".") for part in Path(n).parts)]


def file_record(folder: Path) -> tuple[dict[str, str], str]:
    """The sha256 of each of a model's files, and the content hash over them: what rm_lib.json records."""
    files = {name: file_sha256(folder / name) for name in model_files(folder)}
    return files, tree_digest(files)


def model_files_differ(folder: Path, record: dict) -> str | None:
    """Why `folder` does not hold the model its rm_lib.json (`record`) describes, in words, or None where it
    does. A killed `dvc checkout` or `dvc pull` deletes the model's files before it writes the new ones:
    evaluate refused the weightless folder it left, and push released it. Files train did not write are no
    part of the model (the release leaves them out)."""
    files = record.get("files")
    if isinstance(files, dict) and all(isinstance(v, str) for v in files.values()):
        gone = [name for name in files if not (folder / name).is_file()]
        if gone:
            return f"lacks {_listed(gone)}: deleted since train wrote {'them' if len(gone) > 1 else 'it'} " \
                   f"({INTERRUPTED})"
        changed = [name for name, sha in files.items() if file_sha256(folder / name) != sha]
        # in the order train hashed them (by path parts), not the JSON's (by characters: "a-b" before "a/")
        in_order = {name: files[name] for name in sorted(files, key=lambda name: Path(name).parts)}
        if changed or tree_digest(in_order) != record.get("content_hash"):
            changed = changed or list(files)
            return f"holds {_listed(changed)} changed since train wrote {'them' if len(changed) > 1 else 'it'} " \
                   f"({INTERRUPTED})"
        return None
    # recorded before the files were: the folder's files as a whole
    names = model_files(folder)
    if tree_sha256(folder, names) == record.get("content_hash"):
        return None
    top = [n for n in names if "/" not in n]
    lacks = ("weights (no model.safetensors)" if not any(n.startswith("model") and n.endswith(".safetensors")
                                                          for n in top)
             else "config.json" if "config.json" not in top else None)
    what = f"lacks its {lacks}" if lacks else "holds other files than its rm_lib.json records"
    return f"{what}: changed, added or deleted since train wrote it ({INTERRUPTED})"


INTERRUPTED = "an interrupted `dvc checkout` or `dvc pull` leaves such a folder"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def checkout_hint(layout: Layout) -> str:
    """Where DVC keeps the model (a dvc.lock): its checkout puts the recorded one back."""
    return ", or let `dvc checkout -f` put back the model dvc.lock records" if (layout.root / "dvc.lock").is_file() \
        else ""


def check_tokenized_for(layout: Layout, name_or_path: str, revision: str | None, step: str) -> None:
    """The token ids index the embeddings of the model whose tokenizer made them: another model's would
    train (and score) on ids that mean other words, with nothing to show for it but a bad accuracy."""
    record = layout.tokenized / "manifest.json"
    manifest = read_json(record) if record.exists() else {}
    made_for = manifest.get("model")
    if made_for is not None and not _same_model(made_for, name_or_path):
        raise StaleInput(f"{layout.tokenized} holds token ids made by the tokenizer of '{made_for}' ({record}), and "
                         f"model.name_or_path is '{name_or_path}'; {_rerun('tokenize', step)} (or set "
                         f"model.name_or_path back)")
    if "revision" in manifest and manifest["revision"] != revision:  # recorded since 2026-12-05
        raise StaleInput(f"{layout.tokenized} holds token ids made by the tokenizer of '{made_for}' at revision "
                         f"{manifest['revision']!r} ({record}), and model.revision is {revision!r}; "
                         f"{_rerun('tokenize', step)} (or set model.revision back)")


def tokenizer_of_tokenized(layout: Layout, name_or_path: str, revision: str | None) -> tuple[str, str | None]:
    """The model (and revision) whose tokenizer made the token ids in data/tokenized, as its manifest
    records them; the given ones where it records none."""
    record = layout.tokenized / "manifest.json"
    manifest = read_json(record) if record.exists() else {}
    made_for = manifest.get("model")
    if made_for is None or (_same_model(made_for, name_or_path) and manifest.get("revision", revision) == revision):
        return name_or_path, revision
    return made_for, manifest.get("revision")


def _same_model(a: str, b: str) -> bool:
    """Two names of one model: equal, 'default' and the Hub id of what it ships, or one local folder named
    two ways."""
    a, b = (DEFAULT_MODEL_HUB_ID if name == DEFAULT_MODEL else name for name in (a, b))
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _noun(output: str) -> str:
    return next(link.made_from for link in CHAIN if link.output == output).removeprefix("other ").removeprefix(
        "another ")


def _check_summary(layout: Layout, model: dict | None) -> None:
    """The model card quotes data/train/run.json and summary.json: they must be of the run that made the model.
    Missing, they are named: a train that failed under `dvc repro` leaves them deleted with the model, and
    `dvc checkout models/reward_model` brought back the model alone (the gate then failed on run.json)."""
    for record in (layout.train_logs / "run.json", layout.train_logs / "summary.json"):
        if model is None:
            continue
        if not record.exists():
            raise StaleInput(f"{missing(record)}: the record of the run that trained {layout.model} (a train that "
                             "failed under `dvc repro` leaves it deleted: `dvc checkout train` puts back the model "
                             "and its records as dvc.lock holds them); or rerun train, then evaluate")
        if read_json(record).get("fingerprint") != model.get("fingerprint"):
            raise StaleInput(f"{record} describes another training run than {layout.model} holds; rerun train")

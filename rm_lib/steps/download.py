"""download: source -> normalised pairs split into train/test, rejects and a manifest."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rm_lib.data import demo, formats, keys, sources
from rm_lib.errors import DataError, SettingsError
from rm_lib.files import atomic_dir, tree_sha256, write_json, write_jsonl
from rm_lib.layout import SPLITS, Layout
from rm_lib.pipeline.code_version import write_code_record
from rm_lib.progress import Progress
from rm_lib.settings import DownloadSettings, Params


@dataclass
class DownloadResult:
    source: str
    kind: str
    formats: list[str]
    rows_read: int
    pairs: dict[str, int]
    rejects: dict[str, int]
    content_hash: str
    output_dir: Path
    revision: str | None = None
    ignored_columns: dict[str, int] = field(default_factory=dict)
    warning: str | None = None  # the split is off test_fraction by more than download.split_tolerance
    subset: str | None = None
    split: str = "source"  # how train/test were split: the source's own splits, or seeded by prompt
    test_fraction_realised: float = 0.0
    note: str | None = None  # a local source that DVC cannot see (outside data/sources)
    settings: dict = field(default_factory=dict)  # the download settings these pairs were made with
    test_in_train: int = 0  # test pairs equal to a train pair in either order: a source's own splits may overlap
    test_swapped_in_train: int = 0  # of those, the ones whose train copy has chosen and rejected exchanged
    duplicates: dict[str, int] = field(default_factory=dict)  # per split: pairs that repeat one before them
    swapped: dict[str, int] = field(default_factory=dict)  # per split: pairs whose exchanged copy is there too
    skipped_files: list[str] = field(default_factory=list)  # files of a source folder of an unsupported type
    unnamed_splits: list[str] = field(default_factory=list)  # files named like a split download did not take as one
    margins: dict | None = None  # {"pairs", "min", "max"} of the pairs that carry a margin; train.use_margin adds them
    # a local source's content hash as read (sources.local_fingerprint): which version of the file these pairs
    # are of, whoever ran the step (the source sensor asks it of a `dvc repro`'s download)
    source_sha256: str | None = None

    def manifest(self) -> dict:
        """manifest.json: what the next steps and the model card read of this download."""
        return {"source": self.source, "kind": self.kind, "revision": self.revision, "subset": self.subset,
                "formats": self.formats, "rows_read": self.rows_read, "pairs": self.pairs,
                "rejected": sum(self.rejects.values()), "rejects_by_reason": self.rejects,
                "content_hash": self.content_hash, "ignored_columns": self.ignored_columns,
                "test_fraction_realised": self.test_fraction_realised, "split_warning": self.warning,
                "split": self.split, "test_pairs_in_train": self.test_in_train,
                "test_pairs_swapped_in_train": self.test_swapped_in_train, "duplicate_pairs": self.duplicates,
                "swapped_pairs": self.swapped, "skipped_files": self.skipped_files,
                "unnamed_splits": self.unnamed_splits, "margins": self.margins, "settings": self.settings,
                "source_sha256": self.source_sha256}

    def summary(self) -> str:
        rejected = sum(self.rejects.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejects.items())) or "none"
        ignored = f"; ignored columns {', '.join(sorted(self.ignored_columns))}" if self.ignored_columns else ""
        margins = (f"\nmargins: {self.margins['pairs']} pairs carry one, {self.margins['min']:g} to "
                   f"{self.margins['max']:g}; training adds them to the reward difference it asks for "
                   "(train.use_margin=false ignores them)" if self.margins else "")
        limit = self.settings.get("max_reject_ratio")
        too_many = limit is not None and self.rows_read and rejected / self.rows_read > limit
        return (f"download: {self.rows_read} rows from {self.source} ({', '.join(self.formats)}) -> "
                f"train {self.pairs['train']} / test {self.pairs['test']} pairs; "
                f"{rejected} rejected ({reasons}){ignored} -> {self.output_dir}" + margins
                # as Dagster's rejects_ratio check judges it: the CLI and dvc repro said only the count
                + (f"\nwarning: {rejected / self.rows_read:.1%} of the rows were rejected, more than "
                   f"download.max_reject_ratio ({limit:.1%}); the rows and reasons are in "
                   f"{self.output_dir / 'rejects.jsonl'}" if too_many else "")
                + (f"\nwarning: {self.warning}" if self.warning else "")
                + (f"\nwarning: {self.test_in_train} of the {self.pairs['test']} test pairs are also train pairs"
                   + (f" ({self.test_swapped_in_train} with chosen and rejected exchanged)"
                      if self.test_swapped_in_train else "")
                   + f" ({SAME}): the held-out accuracy overstates the model" if self.test_in_train else "")
                + _per_split("note", self.duplicates, f"repeat a pair before them in their split ({SAME}); kept: "
                             "a repeated pair weighs more in training and in the held-out accuracy")
                + _per_split("warning", self.swapped, "contradict another pair of their split, the same pair with "
                             f"chosen and rejected exchanged ({SAME}); kept: no model prefers both, and of such a "
                             "couple in test one always counts as wrong")
                + (f"\nnote: {len(self.skipped_files)} file(s) of the source folder not read, of a type other than "
                   f"{', '.join(sources.SUFFIXES)} (optionally .gz): {sources.list_some(self.skipped_files)}"
                   if self.skipped_files else "")
                + (f"\nwarning: {sources.list_some(self.unnamed_splits)} named like a split but read as "
                   f"{'training data' if self.split == 'source' else 'one pool split by prompt'}; to use a folder's "
                   "own splits, set download.train_split and download.test_split (e.g. train_prefs, test_prefs)"
                   if self.unnamed_splits else "")
                + (f"\n{self.note}" if self.note else ""))


SAME = "compared with case, whitespace and Unicode forms normalised"


def _per_split(kind: str, counts: dict[str, int], what: str) -> str:
    if not any(counts.values()):
        return ""
    by_split = ", ".join(f"{s} {n}" for s, n in counts.items())
    return f"\n{kind}: {sum(counts.values())} pairs ({by_split}) {what}"


def _head(rows: Iterable, limit: int | None) -> Iterator:
    """The first `limit` rows; reads no row past them (a bad row after the limit is never seen)."""
    return iter(rows) if limit is None else itertools.islice(rows, limit)


def _rank(key: str, seed: int) -> str:
    """A prompt group's place in the seeded order: a hash of its own, so a group added or removed
    moves no other group past another, and the split changes only where the test set ends."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def _pick_test_groups(counts: Counter[str], fraction: float, seed: int) -> set[str]:
    """Whole prompt groups, in a seeded order, taken while they fit under the target pair count;
    then the one group that brings the count closest to it, if it helps. Both splits keep a group."""
    groups = sorted(counts, key=lambda g: (_rank(g, seed), g))
    target, taken, test = sum(counts.values()) * fraction, 0, set()
    for group in groups:
        if taken + counts[group] <= target:
            test.add(group)
            taken += counts[group]
    rest = [g for g in groups if g not in test]
    best = min(rest, key=lambda g: abs(taken + counts[g] - target))
    if not test or (len(rest) > 1 and abs(taken + counts[best] - target) < target - taken):
        test.add(best)
    return test


def _grouped_split(pairs: list[dict], fraction: float, seed: int, source: str) -> tuple[dict[str, list[dict]], int]:
    """Seeded split by prompt, so no prompt is in both train and test, near `fraction` of the pairs;
    and the most pairs one prompt holds."""
    prompts = keys.prompt_keys(pairs)
    counts = Counter(prompts)
    if len(counts) == 1 and len(pairs) > 1:
        raise DataError(f"all {len(pairs)} pairs share one prompt, so a split by prompt cannot hold out a test "
                        "set; give the source's own test split (download.test_split or a test file) or more prompts",
                        file=source)
    test_keys = _pick_test_groups(counts, fraction, seed) if len(counts) > 1 else set()
    return ({"train": [p for p, k in zip(pairs, prompts) if k not in test_keys],
             "test": [p for p, k in zip(pairs, prompts) if k in test_keys]}, max(counts.values()))


def _split_warning(seeded: dict[str, list[dict]], cfg: DownloadSettings, largest: int) -> str | None:
    """A sentence when the seeded split's test share is off test_fraction by more than the tolerance."""
    total = sum(len(v) for v in seeded.values())
    share = len(seeded["test"]) / total if total else cfg.test_fraction
    if abs(share - cfg.test_fraction) <= cfg.split_tolerance + 1e-12:
        return None
    # the nearest share were every pair a prompt of its own, each split keeping one
    nearest = min(max(round(total * cfg.test_fraction), 1), total - 1) / total
    cause = (f"too few pairs (with {total}, the nearest share is {nearest:.2f})"
             if abs(nearest - cfg.test_fraction) > cfg.split_tolerance + 1e-12 else
             f"prompts repeat (the largest prompt holds {largest} pairs) and a prompt is never in both splits")
    return (f"test share {share:.2f} of {total} pairs is off test_fraction {cfg.test_fraction} by more than "
            f"download.split_tolerance {cfg.split_tolerance}: {cause}")


def _inputs(cfg: DownloadSettings, kind: str) -> tuple[list[tuple[str, object, str | None]], str | None]:
    """(label, rows, own split or None) for every input, and the revision the manifest records."""
    if kind == "demo":
        return [("demo", enumerate(demo.demo_pairs(cfg.demo_pairs, seed=cfg.seed), start=1), None)], cfg.revision
    if kind == "local":
        files = sources.local_files(cfg.source)
        if _names_splits(cfg):
            return _named_split_inputs(cfg, files), cfg.revision
        root = Path(cfg.source)
        own = {f: sources.split_of(f, root) for f in files} if len(files) > 1 else {files[0]: None}
        if not any(s == "test" for s in own.values()):
            return [(str(f), sources.read_file(f), None) for f in files], cfg.revision
        # the folder's own test file is the whole test set: a file that names no split trains, instead
        # of sending some of its prompts to a test set the user chose by hand
        return [(str(f), sources.read_file(f), own[f] or "train") for f in files], cfg.revision
    revision = sources.hub_fingerprint(cfg.source, cfg.revision) or cfg.revision
    inputs = [(f"hf://{cfg.source}", sources.read_hub(cfg.source, cfg.train_split, revision=cfg.revision,
                                                      subset=cfg.subset), "train" if cfg.test_split else None)]
    if cfg.test_split:
        inputs.append((f"hf://{cfg.source}", sources.read_hub(cfg.source, cfg.test_split, revision=cfg.revision,
                                                              subset=cfg.subset), "test"))
    return inputs, revision


def _names_splits(cfg: DownloadSettings) -> bool:
    return cfg.train_split != "train" or cfg.test_split is not None


def _named_split_inputs(cfg: DownloadSettings, files: list[Path]) -> list[tuple[str, object, str | None]]:
    """A local folder's files of the splits the settings name (train_prefs, test_prefs), by the rules of
    `split_of`; files of other splits are not read, as a Hub dataset's other splits are not."""
    root = Path(cfg.source)
    names = (cfg.train_split, *([cfg.test_split] if cfg.test_split else []))
    own = {f: sources.split_of(f, root, names) for f in files}
    for name in names:
        if name.lower() not in own.values():
            found = sorted({sources.split_like(f) or "(no split name)" for f in files})
            raise DataError(f"no file of split '{name}' (named {name}.<ext>, {name}-00000-of-00001.<ext>, or in a "
                            f"folder {name}/); the files name: {', '.join(found)}", file=cfg.source)
    as_test = cfg.test_split.lower() if cfg.test_split else None
    return [(str(f), sources.read_file(f), None if as_test is None else "test" if split == as_test else "train")
            for f, split in own.items() if split]


def _unnamed_splits(cfg: DownloadSettings, kind: str) -> list[str]:
    """Files of a local folder whose names look like splits that download did not take as such: read
    as one pool and split by prompt, a held-out file would be trained on."""
    if kind != "local" or _names_splits(cfg) or not Path(cfg.source).is_dir():
        return []
    root = Path(cfg.source)
    return [str(f.relative_to(root)) for f in sources.local_files(root)
            if sources.split_of(f, root) is None and sources.split_like(f)]


@dataclass
class _Read:
    by_split: dict[str | None, list[dict]] = field(default_factory=lambda: {None: [], "train": [], "test": []})
    rejects: list[dict] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    rows: int = 0


def _read(inputs: list[tuple[str, object, str | None]], max_rows: int | None) -> _Read:
    """Every input's rows, normalised. `max_rows` counts the rows of each split over all its files, so a
    folder of shards stops where one file of the same rows would; a source's own test split has its own
    count, or the files read first (test sorts before train) would leave the other split empty."""
    read = _Read()
    used: Counter[str | None] = Counter()
    progress = Progress("download", None, "rows read", note="")  # a large source reads for a minute or more
    for label, rows, split in inputs:
        normaliser = formats.Normaliser(label)
        left = None if max_rows is None else max_rows - used[split]
        try:
            if left is not None and left <= 0:
                continue  # its rows are past the limit: the file is not read at all
            for outcome, record in normaliser(_head(rows, left)):
                read.rows += 1
                used[split] += 1
                progress(read.rows)
                (read.by_split[split] if outcome == "pair" else read.rejects).append(record)
        finally:
            getattr(rows, "close", lambda: None)()  # a file left early (max_rows, an error) is closed now
        read.ignored.update(normaliser.ignored_columns)
        if normaliser.format and normaliser.format not in read.formats:
            read.formats.append(normaliser.format)
    return read


def _fail_without_pairs(read: _Read, splits: dict[str, list[dict]], cfg: DownloadSettings, layout: Layout) -> None:
    """No usable pair for a split: the last good output stays as it was; the rejects go beside it. The
    error says why the split is empty (no usable row at all, too few pairs to split, or the source's own
    split empty), then what was rejected, if anything."""
    beside = _failed_rejects(layout)
    write_jsonl(beside, read.rejects)
    split = "train" if not splits["train"] else "test"
    pool = len(read.by_split[None])
    if not (splits["train"] or splits["test"] or pool):
        why = "no row gave a usable pair"
    elif pool:
        more = f"raise download.max_rows ({cfg.max_rows})" if cfg.max_rows is not None else "add rows to the source"
        why = (f"{_count(pool, 'usable pair')} {'is' if pool == 1 else 'are'} too few to split by prompt at "
               f"download.test_fraction={cfg.test_fraction}: {more}, or give the source a test split")
    else:
        why = f"the source's {split} split holds no usable pair"
    counts = dict(Counter(r["reason"] for r in read.rejects).most_common())
    if counts:
        # an example of the commonest reason: the first reject may be of a rare one
        example = next(r for r in read.rejects if r["reason"] == next(iter(counts)))
        why += (f"; {len(read.rejects)} rejected: {counts}; e.g. row {example['row']}: {example['detail']}; "
                f"see {beside}")
    else:
        why += "; none rejected"
    raise DataError(f"no usable pairs for {split} after reading {_count(read.rows, 'row')} ({why})", file=cfg.source)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


@dataclass
class _Repeats:
    test_in_train: int
    test_swapped_in_train: int
    duplicates: dict[str, int]
    swapped: dict[str, int]


def _repeats(splits: dict[str, list[dict]]) -> _Repeats:
    """Pairs alike once normalised: repeats and exchanged copies within a split, test pairs in train.
    Kept as they are (a source may repeat a pair on purpose), but counted where a user reads them."""
    both = {s: [keys.pair_keys(p) for p in splits[s]] for s in SPLITS}
    same = {s: [k for k, _ in both[s]] for s in SPLITS}
    exchanged = {s: [x for _, x in both[s]] for s in SPLITS}
    within = {s: set(same[s]) for s in SPLITS}
    train = within["train"]
    return _Repeats(
        test_in_train=sum(k in train or x in train for k, x in zip(same["test"], exchanged["test"])),
        test_swapped_in_train=sum(x in train for k, x in zip(same["test"], exchanged["test"]) if x != k),
        duplicates={s: len(same[s]) - len(within[s]) for s in SPLITS},
        # a pair whose sides differ only in case reads as its own exchanged copy: not a contradiction
        swapped={s: sum(x in within[s] for k, x in zip(same[s], exchanged[s]) if x != k) for s in SPLITS})


def _margins(splits: dict[str, list[dict]]) -> dict | None:
    """The margins' range: scores on a 1-10 scale give margins of up to 9 logits, which a user should see."""
    margins = [p["margin"] for s in SPLITS for p in splits[s] if p.get("margin") is not None]
    return {"pairs": len(margins), "min": min(margins), "max": max(margins)} if margins else None


def _failed_rejects(layout: Layout) -> Path:
    return layout.pairs.with_name(f"{layout.pairs.name}.rejects.jsonl")


def _check_hub_settings(cfg: DownloadSettings, kind: str) -> None:
    """The Hub's settings name nothing in a local source or the demo: set, they would be recorded in the
    manifest and the card as if they had chosen the data."""
    if kind == "hub":
        return
    what = "the demo data" if kind == "demo" else f"'{cfg.source}' is a local source"
    folder = kind == "local" and Path(cfg.source).is_dir()
    for key, value, default in (("subset", cfg.subset, None), ("revision", cfg.revision, None),
                                ("train_split", cfg.train_split, "train"), ("test_split", cfg.test_split, None)):
        if value != default and not (folder and key.endswith("_split")):
            where = ("a Hub dataset or a local folder (whose files name their splits: train_prefs.parquet, "
                     "test_prefs-00000-of-00001.parquet)" if key.endswith("_split") else "a Hub dataset")
            back = "null" if default is None else default  # train_split takes no null: its default
            raise SettingsError(f"download.{key}: applies to {where} only, and {what}: set download.{key}={back}")


def run(params: Params, layout: Layout) -> DownloadResult:
    cfg = params.download
    kind = sources.source_kind(cfg.source)
    _check_hub_settings(cfg, kind)
    inputs, revision = _inputs(cfg, kind)
    # the step runner refuses a source that changed while it was read (inputs_read): this is the content read
    fingerprint = None
    if kind == "local":
        with contextlib.suppress(DataError, OSError):  # unreadable: the read below says so, naming the file
            fingerprint = sources.local_fingerprint(cfg.source)["sha256"]
    read = _read(inputs, cfg.max_rows)
    splits = {"train": read.by_split["train"], "test": read.by_split["test"]}
    warning = None
    if read.by_split[None]:
        seeded, largest = _grouped_split(read.by_split[None], cfg.test_fraction, cfg.seed, cfg.source)
        warning = _split_warning(seeded, cfg, largest) if seeded["train"] and seeded["test"] else None
        if warning and cfg.strict_split:
            raise DataError(f"{warning}; loosen download.split_tolerance, set download.strict_split=false, "
                            "or give the source's own test split", file=cfg.source)
        splits = {s: splits[s] + seeded[s] for s in SPLITS}
    if not splits["train"] or not splits["test"]:
        _fail_without_pairs(read, splits, cfg, layout)
    return _write(cfg, kind, revision, read, splits, warning, layout, fingerprint)


def _write(cfg: DownloadSettings, kind: str, revision: str | None, read: _Read, splits: dict[str, list[dict]],
           warning: str | None, layout: Layout, fingerprint: str | None) -> DownloadResult:
    reject_counts = dict(Counter(r["reason"] for r in read.rejects))
    pairs = {s: len(splits[s]) for s in SPLITS}
    realised = pairs["test"] / (pairs["train"] + pairs["test"])
    repeats = _repeats(splits)
    with atomic_dir(layout.pairs) as out:
        write_jsonl(out / "rejects.jsonl", read.rejects)
        for split in SPLITS:
            write_jsonl(out / f"{split}.jsonl", splits[split])
        result = DownloadResult(
            source=cfg.source, kind=kind, formats=read.formats, rows_read=read.rows, pairs=pairs,
            rejects=reject_counts, content_hash=tree_sha256(out, [f"{s}.jsonl" for s in SPLITS]),
            output_dir=layout.pairs, revision=revision, ignored_columns=dict(sorted(read.ignored.items())),
            warning=warning, subset=cfg.subset, test_fraction_realised=realised,
            split="source" if not read.by_split[None] else f"seeded by prompt, test_fraction={cfg.test_fraction}, "
                                                           f"seed={cfg.seed}",
            note=sources.untracked_note(cfg.source, layout.sources) if kind == "local" else None,
            settings=asdict(cfg), test_in_train=repeats.test_in_train,
            test_swapped_in_train=repeats.test_swapped_in_train, duplicates=repeats.duplicates,
            swapped=repeats.swapped,
            skipped_files=sources.unsupported_files(cfg.source) if kind == "local" else [],
            unnamed_splits=_unnamed_splits(cfg, kind), margins=_margins(splits), source_sha256=fingerprint)
        write_json(out / "manifest.json", result.manifest())
        write_code_record(out, "download")
    _failed_rejects(layout).unlink(missing_ok=True)  # rejects of an earlier failed run no longer apply
    return result


def inputs_read(params: Params) -> dict[Path, tuple[int, int] | None]:
    """{file: (size, mtime)} of a local source, which must not change while download reads it (the
    step runner compares them before and after): a file replaced or rewritten shows, and a source of
    gigabytes is not hashed twice. Nothing for the demo or a Hub dataset (its revision is recorded)."""
    source = params.download.source
    try:
        if sources.source_kind(source) != "local":
            return {}
        files = sources.local_files(source)
    except (DataError, OSError):  # gone or unreadable (after the step: a changed input, said as such)
        return {Path(source): None}
    stamps: dict[Path, tuple[int, int] | None] = {}
    for file in files:  # no inode: FUSE mounts (sshfs, s3fs) may give an unchanged file a new one
        try:
            info = file.stat()
            stamps[file] = (info.st_size, info.st_mtime_ns)
        except OSError:
            stamps[file] = None
    return stamps

"""download: source -> normalised pairs split into train/test, rejects and a manifest."""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import demo, formats, sources
from ..atomic import atomic_dir, write_json, write_jsonl
from ..errors import DataError
from ..hashing import tree_sha256
from ..layout import SPLITS, Layout
from ..settings import Params


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
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        rejected = sum(self.rejects.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejects.items())) or "none"
        ignored = f"; ignored columns {', '.join(sorted(self.ignored_columns))}" if self.ignored_columns else ""
        return (f"download: {self.rows_read} rows from {self.source} ({', '.join(self.formats)}) -> "
                f"train {self.pairs['train']} / test {self.pairs['test']} pairs; "
                f"{rejected} rejected ({reasons}){ignored} -> {self.output_dir}")


def _source_kind(source: str) -> str:
    if source == "demo":
        return "demo"
    if Path(source).exists():
        return "local"
    if source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".csv", ".parquet", ".gz"):
        raise DataError("no such file or folder", file=source)
    return "hub"


def _head(rows, limit: int | None):
    for i, item in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield item


def _grouped_split(pairs: list[dict], fraction: float, seed: int) -> dict[str, list[dict]]:
    """Seeded split by prompt, so no prompt is in both train and test."""
    def key(pair: dict) -> str:
        return json.dumps(pair.get("prompt", pair["id"]), sort_keys=True)

    groups = sorted({key(p) for p in pairs})
    random.Random(seed).shuffle(groups)
    target, test_keys, taken = round(len(pairs) * fraction), set(), 0
    counts = Counter(key(p) for p in pairs)
    for group in groups:
        if taken >= target:
            break
        test_keys.add(group)
        taken += counts[group]
    return {"train": [p for p in pairs if key(p) not in test_keys],
            "test": [p for p in pairs if key(p) in test_keys]}


def run(params: Params, layout: Layout) -> DownloadResult:
    cfg = params.download
    kind = _source_kind(cfg.source)
    # (label, rows, own split or None) for every input
    inputs: list[tuple[str, object, str | None]] = []
    revision = cfg.revision
    if kind == "demo":
        rows = enumerate(demo.demo_pairs(cfg.demo_pairs, seed=cfg.seed), start=1)
        inputs.append(("demo", rows, None))
    elif kind == "local":
        files = sources.local_files(cfg.source)
        own = {f: sources.split_of(f) for f in files} if len(files) > 1 else {files[0]: None}
        use_own = any(s == "test" for s in own.values())
        for path in files:
            inputs.append((str(path), sources.read_file(path), own[path] if use_own else None))
    else:
        revision = sources.hub_fingerprint(cfg.source, cfg.revision) or cfg.revision
        inputs.append((f"hf://{cfg.source}", sources.read_hub(cfg.source, cfg.train_split, revision=cfg.revision,
                                                              subset=cfg.subset), "train" if cfg.test_split else None))
        if cfg.test_split:
            inputs.append((f"hf://{cfg.source}", sources.read_hub(cfg.source, cfg.test_split, revision=cfg.revision,
                                                                  subset=cfg.subset), "test"))

    by_split: dict[str | None, list[dict]] = {None: [], "train": [], "test": []}
    rejects: list[dict] = []
    seen_formats: list[str] = []
    ignored: Counter[str] = Counter()
    rows_read = 0
    for label, rows, split in inputs:
        normaliser = formats.Normaliser(label)
        for outcome, record in normaliser(_head(rows, cfg.max_rows)):
            rows_read += 1
            (by_split[split] if outcome == "pair" else rejects).append(record)
        ignored.update(normaliser.ignored_columns)
        if normaliser.format and normaliser.format not in seen_formats:
            seen_formats.append(normaliser.format)

    splits = {"train": by_split["train"], "test": by_split["test"]}
    if by_split[None]:
        seeded = _grouped_split(by_split[None], cfg.test_fraction, cfg.seed)
        splits = {s: splits[s] + seeded[s] for s in SPLITS}

    reject_counts = dict(Counter(r["reason"] for r in rejects))
    if not splits["train"] or not splits["test"]:
        # Keep the rejects where the user can read them, and leave nothing that looks complete.
        with atomic_dir(layout.pairs) as out:
            write_jsonl(out / "rejects.jsonl", rejects)
        first = f"; first: row {rejects[0]['row']}: {rejects[0]['detail']}" if rejects else ""
        raise DataError(
            f"no usable pairs for {'train' if not splits['train'] else 'test'} after reading {rows_read} rows "
            f"({len(rejects)} rejected: {reject_counts or 'none'}{first}; see {layout.pairs / 'rejects.jsonl'})",
            file=cfg.source)
    with atomic_dir(layout.pairs) as out:
        write_jsonl(out / "rejects.jsonl", rejects)
        for split in SPLITS:
            write_jsonl(out / f"{split}.jsonl", splits[split])
        content_hash = tree_sha256(out, [f"{s}.jsonl" for s in SPLITS])
        result = DownloadResult(source=cfg.source, kind=kind, formats=seen_formats, rows_read=rows_read,
                                pairs={s: len(splits[s]) for s in SPLITS}, rejects=reject_counts,
                                content_hash=content_hash, output_dir=layout.pairs, revision=revision,
                                ignored_columns=dict(sorted(ignored.items())))
        write_json(out / "manifest.json", {
            "source": cfg.source, "kind": kind, "revision": revision, "subset": cfg.subset,
            "formats": seen_formats, "rows_read": rows_read, "pairs": result.pairs,
            "rejected": len(rejects), "rejects_by_reason": reject_counts, "content_hash": content_hash,
            "ignored_columns": result.ignored_columns,
            "split": "source" if not by_split[None] else f"seeded by prompt, test_fraction={cfg.test_fraction}, "
                                                          f"seed={cfg.seed}"})
    return result


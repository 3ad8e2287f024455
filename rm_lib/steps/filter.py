"""filter: token ids -> length-filtered ids, every dropped pair counted by reason and written out."""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rm_lib.data import length_filter
from rm_lib.data.tokenstore import read_batches, write_batches
from rm_lib.errors import DataError
from rm_lib.evaluation import plots
from rm_lib.files import atomic_dir, read_json, read_jsonl, tree_sha256, write_json, write_jsonl
from rm_lib.layout import SPLITS, Layout
from rm_lib.pipeline.code_version import write_code_record
from rm_lib.progress import Progress
from rm_lib.settings import FilterSettings, Params, check_within_positions


@dataclass
class FilterResult:
    policy: str
    kept: dict[str, int]
    dropped: dict[str, dict[str, int]]
    truncated: dict[str, int]
    content_hash: str
    output_dir: Path
    max_token_length: int
    max_prompt_token_length: int | None
    special_prefix: list[int]
    pad_token_id: int | None
    inputs: dict[str, str]
    plot: Path = field(default=None)
    settings: dict = field(default_factory=dict)  # the filter settings these pairs were kept by
    test_in_train: int = 0  # kept test pairs whose ids are a kept train pair's, in either order

    def manifest(self) -> dict:
        """manifest.json: what train and evaluate read of the filtered ids."""
        return {"policy": self.policy, "max_token_length": self.max_token_length,
                "max_prompt_token_length": self.max_prompt_token_length, "kept": self.kept,
                "dropped_by_reason": self.dropped, "truncated": self.truncated, "content_hash": self.content_hash,
                "special_prefix": self.special_prefix, "pad_token_id": self.pad_token_id, "inputs": self.inputs,
                "settings": self.settings, "test_pairs_in_train": self.test_in_train}

    def summary(self) -> str:
        parts = []
        for split in SPLITS:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped[split].items())) or "none"
            parts.append(f"{split} kept {self.kept[split]}, dropped {sum(self.dropped[split].values())} ({reasons}), "
                         f"truncated {self.truncated[split]}")
        return (f"filter ({self.policy}): " + "; ".join(parts) + f" -> {self.output_dir}"
                + (f"\nwarning: {self.test_in_train} of the {self.kept['test']} test pairs have the token ids of a "
                   "train pair (in either order): the texts differ only where the tokenizer does not look (case, "
                   "say), or in what the length limit cut, and the held-out accuracy overstates the model"
                   if self.test_in_train else ""))


def _ids_digest(first: list[int], second: list[int]) -> bytes:
    """A pair's ids in 16 bytes: a set of them for every train pair stays small."""
    ids = array("q", [len(first), *first, *second])
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest()


def _digests(rows: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(_ids_digest(r["input_ids_chosen"], r["input_ids_rejected"]),
             _ids_digest(r["input_ids_rejected"], r["input_ids_chosen"])) for r in rows]


def _test_in_train(digests: dict[str, list[tuple[bytes, bytes]]]) -> int:
    """Test pairs the model trains on as far as it can tell: what download compares as text, the
    tokenizer may still merge."""
    train = {same for same, _ in digests["train"]}
    return sum(same in train or exchanged in train for same, exchanged in digests["test"])


def _filtered(path: Path, cfg: FilterSettings, meta: dict, lengths: dict[str, list[int]],
              outcome: length_filter.FilterOutcome, digests: list) -> Iterator[list[dict]]:
    """The kept rows of one split a batch at a time, written as they come (a large split is never all in
    memory); each row's lengths go to `lengths`, the set-aside rows and the cut count to `outcome`, the
    kept rows' digests to `digests`."""
    progress, done = Progress(f"filter {path.stem}", None, "pairs read", note=""), 0
    for rows in read_batches(path):
        done += len(rows)
        progress(done)
        for row in rows:
            lengths["prompt"].append(row["prompt_length"] or 0)
            lengths["chosen"].append(len(row["input_ids_chosen"]))
            lengths["rejected"].append(len(row["input_ids_rejected"]))
        batch = length_filter.apply(rows, max_len=cfg.max_token_length, max_prompt=cfg.max_prompt_token_length,
                                    policy=cfg.policy, keep_front=len(meta["special_prefix"]),
                                    template_start=meta.get("template_start_id"))
        outcome.dropped += batch.dropped
        outcome.truncated += batch.truncated
        digests += _digests(batch.kept)
        yield batch.kept


def run(params: Params, layout: Layout) -> FilterResult:
    cfg = params.filter
    meta = read_json(layout.tokenized / "manifest.json")
    # the model's limit as tokenize read it: filter itself never loads the model
    check_within_positions(cfg.max_token_length, meta.get("max_length"), meta["model"])
    kept, dropped, truncated, lengths = {}, {}, {}, {"prompt": [], "chosen": [], "rejected": []}
    digests = {}
    # the pairs tokenize set aside (their chat template refused them) are counted with filter's: the held-out
    # figures are of the pairs left after both
    refused = read_jsonl(layout.refused) if layout.refused.exists() else []  # none from an earlier version
    with atomic_dir(layout.filtered) as out:
        all_dropped = []
        for split in SPLITS:
            outcome, digests[split] = length_filter.FilterOutcome(), []
            filtered = _filtered(layout.tokenized / f"{split}.parquet", cfg, meta, lengths, outcome, digests[split])
            kept[split] = write_batches(out / f"{split}.parquet", filtered)
            if not kept[split]:
                raise DataError(f"no {split} pair is left ({outcome.dropped_by_reason}): "
                                f"{_advice(outcome.dropped_by_reason, cfg.policy)}",
                                file=str(layout.tokenized / f"{split}.parquet"))
            by_template = [r for r in refused if r.get("split") == split]
            all_dropped += by_template + [dict(d, split=split) for d in outcome.dropped]
            dropped[split], truncated[split] = outcome.dropped_by_reason, outcome.truncated
            if by_template:
                dropped[split]["template_refused"] = len(by_template)
        write_jsonl(out / "dropped.jsonl", all_dropped)
        plots.length_histograms(lengths, {"prompt": cfg.max_prompt_token_length, "chosen": cfg.max_token_length,
                                          "rejected": cfg.max_token_length}, out / "lengths.png",
                                title="Token lengths before filtering (train + test)")
        result = FilterResult(
            policy=cfg.policy, kept=kept, dropped=dropped, truncated=truncated,
            content_hash=tree_sha256(out, [f"{s}.parquet" for s in SPLITS]), output_dir=layout.filtered,
            max_token_length=cfg.max_token_length, max_prompt_token_length=cfg.max_prompt_token_length,
            special_prefix=meta["special_prefix"], pad_token_id=meta["pad_token_id"],
            inputs={"tokenized": meta["content_hash"]}, plot=layout.filtered / "lengths.png", settings=asdict(cfg),
            test_in_train=_test_in_train(digests))
        write_json(out / "manifest.json", result.manifest())
        write_code_record(out, "filter")
    return result


def _advice(reasons: dict[str, int], policy: str) -> str:
    """What to change, for the reasons the pairs were set aside."""
    advice = []
    if any(r.endswith("_too_long") for r in reasons):
        advice.append("raise filter.max_token_length (and filter.max_prompt_token_length)"
                      + (" or use filter.policy=truncate" if policy == "drop" else ""))
    if "identical_after_truncation" in reasons:
        advice.append("raise filter.max_token_length: the cut left chosen and rejected the same")
    if "identical_tokens" in reasons:
        advice.append("chosen and rejected give the same token ids (they differ only where the tokenizer does not "
                      "look): there is no preference to learn")
    return "; ".join(advice)

"""Quality rules: each one reads the files a step wrote and returns a Verdict.

The release gate (`release_verdicts`) is what `push` enforces on every front-end (CLI, `dvc repro`,
Dagster); the Dagster asset checks only show these verdicts. Thresholds come from params.yaml
(`push.min_accuracy`, `push.min_test_pairs`, `push.compare_with_release`, `push.min_subset_accuracy`,
`push.max_length_correlation`, `push.max_test_seen_by_base`, `download.max_reject_ratio`).
"""
from __future__ import annotations

import hashlib
import math
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from rm_lib.data import keys
from rm_lib.data.trained_prompts import SEEN
from rm_lib.evaluation.metrics import subset_listing
from rm_lib.evaluation.visualize import one_line
from rm_lib.files import missing, read_json, read_jsonl
from rm_lib.layout import SPLITS, Layout
from rm_lib.settings import shown_value

EXAMPLES = 5  # ids shown with a failed verdict


@dataclass(frozen=True)
class Verdict:
    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    warn_only: bool = False  # a failure is a warning, not a stop


def _missing(name: str, path: Path, warn_only: bool = False) -> Verdict:
    said = missing(path) if path.is_symlink() else f"{path} not found; run the step that writes it first"
    return Verdict(name, False, said, {"missing": str(path)}, warn_only)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def length_baseline(report: dict) -> float:
    """The better of the two length heuristics (always the longer, always the shorter answer)."""
    return max(report["longer_wins_baseline"], report["shorter_wins_baseline"])


def logged_losses(layout: Layout) -> list[float]:
    """Every loss the training step logged (data/train/metrics.jsonl), in order."""
    path = layout.train_logs / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["loss"] for r in read_jsonl(path) if r.get("loss") is not None]


# ---------------------------------------------------------------- data

def _empty_side(pair: dict, side: str) -> bool:
    if f"input_ids_{side}" in pair:  # pretokenized input
        return not pair[f"input_ids_{side}"]
    messages = pair.get(side) or []
    if isinstance(messages, str):
        return not messages.strip()
    return not any(str(m.get("content", "")).strip() for m in messages if isinstance(m, dict))


def _identical(pair: dict) -> bool:
    if "input_ids_chosen" in pair:
        return pair["input_ids_chosen"] == pair.get("input_ids_rejected")
    return pair.get("chosen") == pair.get("rejected")


def pairs_well_formed(layout: Layout) -> Verdict:
    """No written pair has an empty side or chosen identical to rejected (download rejects those)."""
    name = "pairs_well_formed"
    empty, identical, total = [], [], 0
    for split in SPLITS:
        path = layout.pairs / f"{split}.jsonl"
        if not path.exists():
            return _missing(name, path)
        for pair in read_jsonl(path):
            total += 1
            if _empty_side(pair, "chosen") or _empty_side(pair, "rejected"):
                empty.append(f"{split}:{pair.get('id')}")
            elif _identical(pair):
                identical.append(f"{split}:{pair.get('id')}")
    passed = not empty and not identical
    return Verdict(
        name, passed,
        f"all {total} pairs have two non-empty, different sides" if passed else
        f"{len(empty)} pair(s) with an empty side and {len(identical)} with chosen == rejected were written; "
        "the download step should have rejected them",
        {"pairs": total, "empty_side": len(empty), "identical": len(identical),
         "examples": (empty + identical)[:EXAMPLES]})


def no_prompt_overlap(layout: Layout) -> Verdict:
    """No prompt is in both train and test (else the test accuracy measures memorisation). Prompts are
    compared as the seeded split groups them (rm_lib.data.keys): normalised text, or for pretokenized
    pairs the tokens both sides begin with."""
    name = "no_prompt_overlap"
    pairs = {}
    for split in SPLITS:
        path = layout.pairs / f"{split}.jsonl"
        if not path.exists():
            return _missing(name, path, warn_only=True)
        pairs[split] = list(read_jsonl(path))
    found = keys.prompt_keys(pairs["train"] + pairs["test"])
    prompts = {"train": {k for k in found[:len(pairs["train"])] if keys.names_a_prompt(k)},
               "test": {k for k in found[len(pairs["train"]):] if keys.names_a_prompt(k)}}
    shared = prompts["train"] & prompts["test"]
    metadata = {"train_prompts": len(prompts["train"]), "test_prompts": len(prompts["test"]),
                "shared_prompts": len(shared), "examples": [k[:200] for k in sorted(shared)[:EXAMPLES]],
                "checked": bool(prompts["train"] and prompts["test"])}
    if not metadata["checked"]:
        # nothing compared is no evidence of no overlap: say so rather than pass
        return Verdict(name, False, f"not checked: {'train' if not prompts['train'] else 'test'} has no pair with a "
                       "prompt (no prompt text, or pretokenized pairs whose sides share no tokens past those every "
                       "pair begins with), so there is no prompt to compare", metadata, warn_only=True)
    return Verdict(
        name, not shared,
        f"no prompt is in both train and test ({metadata['train_prompts']} train and {metadata['test_prompts']} "
        "test prompts compared)" if not shared else
        f"{len(shared)} prompt(s) are in both train and test; with the source's own test split "
        "(download.test_split) this comes from the source, else it is a bug of the split",
        metadata, warn_only=True)


def rejects_ratio(layout: Layout, max_ratio: float) -> Verdict:
    """The share of source rows the download step rejected stays at most `max_ratio`."""
    name = "rejects_ratio"
    path = layout.pairs / "manifest.json"
    if not path.exists():
        return _missing(name, path)
    manifest = read_json(path)
    reasons = manifest.get("rejects_by_reason", {})
    rejected = int(manifest.get("rejected", sum(reasons.values())))
    rows = int(manifest.get("rows_read", 0))
    ratio = rejected / rows if rows else 1.0
    passed = ratio <= max_ratio
    return Verdict(
        name, passed,
        f"{rejected} of {rows} rows rejected ({ratio:.1%}, limit {max_ratio:.1%})"
        + ("" if passed else "; see data/pairs/rejects.jsonl for the rows and reasons"),
        {"rows_read": rows, "rejected": rejected, "reject_ratio": ratio, "max_reject_ratio": max_ratio,
         "rejects_by_reason": reasons})


# ---------------------------------------------------------------- model

def loss_is_finite(layout: Layout) -> Verdict:
    """Training logged at least one loss and every logged loss (and the final one, data/train/run.json)
    is finite."""
    name = "loss_is_finite"
    path = layout.train_logs / "run.json"
    if not path.exists():
        return _missing(name, path)
    summary = read_json(path)  # json reads the NaN/Infinity written for a lost loss
    steps = int(summary.get("steps") or 0)
    final = summary.get("final_loss")
    logged = logged_losses(layout)
    bad = [v for v in logged if not _finite(v)]
    passed = _finite(final) and not bad and steps > 0
    if passed:
        description = f"final loss {final:.4f} after {steps} steps; all {len(logged)} logged losses finite"
    else:
        description = (f"final loss {final}, {len(bad)} of {len(logged)} logged losses not finite, {steps} steps: "
                       "training diverged or never logged; lower train.learning_rate or check the data")
    return Verdict(name, passed, description,
                   {"final_loss": str(final), "steps": steps, "logged_losses": len(logged),
                    "non_finite_losses": len(bad)})


# ---------------------------------------------------------------- evaluation

def beats_length_baseline(layout: Layout) -> Verdict:
    """Accuracy above the better length heuristic; at or below it the model learned nothing but length."""
    name = "beats_length_baseline"
    path = layout.evaluation / "report.json"
    if not path.exists():
        return _missing(name, path, warn_only=True)
    report = read_json(path)
    accuracy, baseline = report["accuracy"], length_baseline(report)
    passed = accuracy > baseline
    return Verdict(
        name, passed, f"accuracy {accuracy:.4f} {'>' if passed else '<='} length baseline {baseline:.4f}",
        {"accuracy": accuracy, "length_baseline": baseline,
         "longer_wins_baseline": report["longer_wins_baseline"],
         "shorter_wins_baseline": report["shorter_wins_baseline"], "margin": accuracy - baseline},
        warn_only=True)


JUDGED_AGAINST = "judged_against"  # in data/release/evaluation.json: the bar that release's gate compared it with
# in data/release/evaluation.json: a release written only there (push.dry_run, or no push.repo_id) under
# push.compare_with_release=false, whose gate compared nothing
UNCOMPARED_DRY_RUN = "uncompared_dry_run"
TEST_DATA = "test_data"  # in report.json: which held-out pairs the accuracy was measured on (test_data_record)
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
CHANCE = 0.5  # the accuracy of a coin: a released model's 95% interval lies above it


def _pair_digests(rows: list[dict]) -> list[bytes]:
    """Each held-out pair as scored (chosen and rejected token ids), hashed."""
    digests = []
    for row in rows:
        digest = hashlib.sha256()
        for side in ("chosen", "rejected"):
            ids = row[f"input_ids_{side}"]
            digest.update(len(ids).to_bytes(8, "little") + array("q", ids).tobytes())
        digests.append(digest.digest())
    return digests


def test_pairs_hash(rows: list[dict]) -> str:
    """One hash of the held-out pairs as scored, whatever their order: the identity of a test set.
    filtered/manifest.json's content_hash also covers train.parquet, so a change of the training pairs
    alone would read as other test data."""
    return hashlib.sha256(b"".join(sorted(_pair_digests(rows)))).hexdigest()


def test_data_record(source: str, subset: str | None, rows: list[dict],
                     correct: Sequence[bool] | None = None) -> dict:
    """report.json's `test_data`: the source (download.source, a local one by its name, and
    download.subset), the number of pairs, their hash (test_pairs_hash), each pair's short digest, which
    tell how many pairs two test sets share, and, given `correct` (each row's chosen reward above its
    rejected one), which of them the model got right ("1"/"0" in the digests' order). The gate compares a
    model with the last release only on the same source; on the pairs both were measured on where both
    say which they got right (_on_shared_pairs); else strictly where they share most of their pairs
    (SHARED_FOR_STRICT)."""
    digests = [d.hex()[:16] for d in _pair_digests(rows)]
    record = {"source": source, "subset": subset, "pairs": len(rows), "hash": test_pairs_hash(rows),
              "digests": sorted(digests)}
    if correct is not None:
        ordered = sorted(zip(digests, correct, strict=True))
        record["correct"] = "".join("1" if right else "0" for _, right in ordered)
    return record


def _outcomes(record: dict) -> dict[str, tuple[int, int]] | None:
    """digest -> (how often the test set holds that pair, how often the model got it right), or None where
    the record does not say which it got right (a report of an older version)."""
    digests, correct = record.get("digests"), record.get("correct")
    if not isinstance(digests, list) or not isinstance(correct, str) or len(correct) != len(digests):
        return None
    found: dict[str, tuple[int, int]] = {}
    for digest, right in zip(digests, correct):
        held, won = found.get(digest, (0, 0))
        found[digest] = (held + 1, won + (right == "1"))
    return found


class Shared(NamedTuple):
    """Two models on the held-out pairs both were measured on: how many (counted as the accuracy counts
    them), the share each got right, and the distinct pairs only one got right (the release and not this
    model: `lost`; this model and not the release: `gained`)."""

    pairs: int
    here: float
    there: float
    lost: float
    gained: float


def _shared_outcomes(mine: dict, theirs: dict) -> Shared | None:
    """This model and the release on the pairs both test sets hold, or None where a record does not say
    which it got right."""
    here, there = _outcomes(mine), _outcomes(theirs)
    if here is None or there is None:
        return None
    shared, right_here, right_there, lost, gained = 0, 0.0, 0.0, 0.0, 0.0
    for digest, (held, won) in here.items():
        if digest in there:
            held_there, won_there = there[digest]
            both = min(held, held_there)  # a repeated pair: the same ids, so the same outcome each time
            mine_right, theirs_right = won / held, won_there / held_there
            shared += both
            right_here += both * mine_right
            right_there += both * theirs_right
            # a repeated pair is one piece of evidence: the same ids, scored the same each time
            lost += theirs_right * (1 - mine_right)
            gained += mine_right * (1 - theirs_right)
    if not shared:
        return Shared(0, 0.0, 0.0, 0.0, 0.0)
    return Shared(shared, right_here / shared, right_there / shared, lost, gained)


def wilson_interval(accuracy: float, pairs: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on `pairs` pairs (95% by default)."""
    if not isinstance(pairs, int) or pairs <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / pairs
    centre = (accuracy + z * z / (2 * pairs)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / pairs + z * z / (4 * pairs * pairs)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def noise_margin(accuracy: float, pairs: int, previous: float, previous_pairs: int) -> float:
    """How far `accuracy` may lie below `previous`, measured on mostly other pairs, before the drop is
    more than sampling noise: Newcombe's interval for a difference of two proportions, from the Wilson
    intervals of both (the drop is real, at 95%, when it exceeds this)."""
    upper = wilson_interval(accuracy, pairs)[1]
    lower = wilson_interval(previous, previous_pairs)[0]
    return math.sqrt((upper - accuracy) ** 2 + (previous - lower) ** 2)


# Two test sets that share this much of the larger one are compared strictly: their accuracies are of
# nearly the same sample (a grown or edited source keeps its held-out pairs), and a drop is a drop.
SHARED_FOR_STRICT = 0.9


def _bar(release: dict) -> dict:
    return {"accuracy": release.get("accuracy"), "data_hash": release.get("data_hash"),
            "model": release.get("inputs", {}).get("model"), "pairs": release.get("pairs"),
            TEST_DATA: release.get(TEST_DATA)}


# the model card's words for a release forced past a failed gate (its only record before evaluation.json's)
FORCED_MARK = "Released with `push.force=true` although the release gate failed."
# the card's words for what push.dry_run wrote although the release gate failed (no push publishes it as is)
REFUSED_MARK = ("Written by `push.dry_run=true`; the release gate, judged against `data/release`, failed (a push to a "
                "Hub repository is judged against the release it holds).")
FORCED_BY_EARLIER_VERSION = "forced_by_earlier_version"


def stands_on_its_bar(record: dict, model: str | None) -> bool:
    """Whether a release's record (its evaluation.json) passes its own bar on to the next model rather than
    being one: forced past a failed gate, a dry run that compared nothing (a model below the last release
    lowered the bar of later dry runs and of Dagster's check), or holding `model` itself (a push again of
    what it holds)."""
    return (bool(record.get("forced")) or bool(record.get(UNCOMPARED_DRY_RUN))
            or (model is not None and _bar(record)["model"] == model))


def release_bar(layout: Layout, model: str | None = None, release: Path | None = None) -> dict | None:
    """What a release of `model` (its content hash) must not fall below: the last release ({"accuracy",
    "data_hash", "model", "pairs", "test_data"}; a release by an older version lacks the last two, or has
    them None), or None. `release`: the folder with that release's evaluation.json and README.md, by
    default data/release; a push to the Hub reads them from the repository's head (what it holds now,
    whoever pushed it). Not a forced one, whose gate failed, nor a dry run that compared nothing
    (UNCOMPARED_DRY_RUN): the bar it was judged against stays. Not
    `model` itself: a push of the model the release holds (after a dry run, or with push.force off
    again) is judged against what that release was judged against."""
    folder = layout.release if release is None else release
    path = folder / "evaluation.json"
    if not path.exists():
        return None
    record = read_json(path)
    judged_against = record.get(JUDGED_AGAINST)
    if stands_on_its_bar(record, model):
        return judged_against
    card = folder / "README.md"
    if "forced" not in record and card.is_file() and FORCED_MARK in card.read_text(errors="replace"):
        # an earlier version's forced release: its card says a check failed, not whether one that blocks
        # (a warning's failure was marked so too), so it stays a bar and a refusal says what it may be
        return {**_bar(record), FORCED_BY_EARLIER_VERSION: True}
    return _bar(record)


def _source_name(test_data: dict) -> str:
    subset = test_data.get("subset")
    return f"{test_data.get('source')}" + (f" (subset {subset})" if subset is not None else "")


def _compared(report: dict, bar: dict, min_test_pairs: int) -> tuple[str | None, str, dict[str, Any]]:
    """The new model against the last release's bar: (why it is refused, or None; what the verdict says
    of the comparison; metadata). Across sources nothing is compared; on the same pairs strictly. On
    other pairs of the same source: where both records say which pairs they got right and share at least
    min_test_pairs, on those shared pairs (_on_shared_pairs), and on the whole within the sampling noise
    of both (noise_margin); else strictly where the two share most pairs (SHARED_FOR_STRICT), else within
    that noise. The verdict says which. A release by an older version measured on fewer than
    min_test_pairs is no bar; one with no test_data is compared strictly, as then."""
    accuracy, pairs, previous = report["accuracy"], report.get("pairs"), bar.get("accuracy")
    mine, theirs = report.get(TEST_DATA), bar.get(TEST_DATA)
    previous_pairs = (theirs or {}).get("pairs", bar.get("pairs"))
    metadata: dict[str, Any] = {"previous_release_accuracy": previous if previous is not None else "none",
                                "previous_release_pairs": "unknown" if previous_pairs is None else previous_pairs}
    if previous is None:
        return None, "", metadata
    if not _finite(previous):  # NaN, Infinity (JSON readers take both), text: a damaged or hand-made release
        metadata["compared_with_previous"] = False
        return None, (f"; not compared with the last released model: its evaluation.json gives the accuracy "
                      f"{shown_value(previous)}, no number to compare with"), metadata
    counts = f"{pairs} pairs here, {'an unknown number' if previous_pairs is None else previous_pairs} there"
    if theirs is None and isinstance(previous_pairs, int) and previous_pairs < min_test_pairs:
        # made by a version without push.min_test_pairs (a release since then passed it): a smoke run's
        # accuracy on a handful of pairs is no bar
        metadata.update({"same_source_as_previous": "unknown", "same_test_data_as_previous": "unknown",
                         "compared_with_previous": False})
        return None, (f"; not compared with the last released model ({previous:.4f}): it was measured on only "
                      f"{previous_pairs} held-out pair{'' if previous_pairs == 1 else 's'} (this model on {pairs}), "
                      f"fewer than push.min_test_pairs ({min_test_pairs}), by a version that did not require "
                      "them"), metadata
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        same = bar.get("data_hash") is not None and bar.get("data_hash") == report.get("data_hash")
        metadata.update({"same_source_as_previous": "unknown", "compared_with_previous": True,
                         "same_test_data_as_previous": True if same else "unknown"})
        where = (f"on the same {pairs} test pairs" if same else
                 f"whether on the same test pairs is unknown ({counts}; the last release or this report was made "
                 "by an older version, which did not record them)")
        if accuracy < previous:
            return (f"accuracy {accuracy:.4f} is below the last released model's {previous:.4f}, {where}; set "
                    "push.compare_with_release=false to release anyway"), "", metadata
        return None, f" and >= the last released model's {previous:.4f}, {where}", metadata
    if (mine.get("source"), mine.get("subset")) != (theirs.get("source"), theirs.get("subset")):
        metadata.update({"same_source_as_previous": False, "compared_with_previous": False,
                         "same_test_data_as_previous": False})
        said = (f"; not compared with the last released model ({previous:.4f} on {previous_pairs} pairs): it was "
                f"measured on another source ({_source_name(theirs)}; this model: {_source_name(mine)})")
        return None, said, metadata
    same = mine.get("hash") == theirs.get("hash")
    metadata.update({"same_source_as_previous": True, "compared_with_previous": True,
                     "same_test_data_as_previous": same})
    if same:
        if accuracy < previous:
            return (f"accuracy {accuracy:.4f} is below the last released model's {previous:.4f} on the same "
                    f"{pairs} test pairs; set push.compare_with_release=false to release anyway"), "", metadata
        return None, f" and >= the last released model's {previous:.4f} on the same {pairs} test pairs", metadata
    larger = max(pairs if isinstance(pairs, int) else 0, previous_pairs if isinstance(previous_pairs, int) else 0)
    both = _shared_outcomes(mine, theirs)
    on_shared = None  # what the comparison on the pairs both hold said, where it let the model through
    if both is not None and both.pairs >= min_test_pairs:
        refused, on_shared = _on_shared_pairs(both, larger, counts, metadata)
        if refused:
            return refused, "", metadata
    # counted as the accuracy counts them: a repeated test pair is shared as often as both sets hold it
    shared = both.pairs if both is not None else \
        sum((Counter(mine.get("digests") or []) & Counter(theirs.get("digests") or [])).values())
    known = bool(mine.get("digests")) and bool(theirs.get("digests"))
    metadata["shared_test_pairs"] = shared if known else "unknown"
    other = f"measured on other test pairs ({counts}, {shared if known else 'an unknown number'} shared)"
    if on_shared is None and (not known or shared >= SHARED_FOR_STRICT * larger):
        if accuracy < previous:
            return (f"accuracy {accuracy:.4f} is below the last released model's {previous:.4f}, {other}; set "
                    "push.compare_with_release=false to release anyway"), "", metadata
        return None, f" and >= the last released model's {previous:.4f}, {other}: not like for like", metadata
    # mostly other pairs (another seed, test fraction or filter): a drop within the noise of two samples.
    # Beside a comparison on the shared pairs too, since the pairs only one set holds are evidence as well
    # (a model as good on the shared pairs, wrong on every new one, passed on them)
    margin = noise_margin(accuracy, pairs, previous, previous_pairs)
    metadata["noise_margin"] = margin
    shared_said = f"; {on_shared}" if on_shared else ""
    if accuracy < previous - margin:
        return (f"accuracy {accuracy:.4f} is below the last released model's {previous:.4f}, {other}, by more "
                f"than the sampling noise of the two ({margin:.4f} at 95%){shared_said}; set "
                "push.compare_with_release=false to release anyway"), "", metadata
    # after the shared pairs' words: "; on all their pairs >= ..."; alone, the words of the older versions
    above, below = (f"{shared_said}; on all their pairs ",) * 2 if on_shared else (" and ", "; ")
    if accuracy >= previous:
        return None, f"{above}>= the last released model's {previous:.4f}, {other}: not like for like", metadata
    return None, (f"{below}below the last released model's {previous:.4f}, {other}, by no more than the sampling "
                  f"noise of the two ({margin:.4f} at 95%)"), metadata


def _on_shared_pairs(both: Shared, larger: int, counts: str,
                     metadata: dict[str, Any]) -> tuple[str | None, str]:
    """(why refused, or None; what it says) of a model on the held-out pairs both test sets hold, where both
    records say which they got right: like for like. Strictly where those are nearly the whole sample
    (SHARED_FOR_STRICT); else, a part of each sample, a drop beyond chance: McNemar's test with a
    continuity correction, refused where the distinct pairs only the release got right (`lost`) outnumber
    those only this model got right (`gained`) by more than 1 + Z95 * sqrt(lost + gained), a drop that
    chance gives less than 2.5% of the time. Strictly, an equally good model measured on 200 shared pairs
    of 1,000 was refused 46% of the time (benchmarks/bench_gate.py)."""
    here, there = both.here, both.there
    metadata.update({"shared_test_pairs": both.pairs, "accuracy_on_shared_test_pairs": here,
                     "previous_release_accuracy_on_shared_test_pairs": there})
    on = f"on the {both.pairs} test pairs both were measured on ({counts})"
    if both.pairs >= SHARED_FOR_STRICT * larger:  # nearly the same sample: a drop is a drop
        if here < there:
            return (f"accuracy {here:.4f} {on} is below the last released model's {there:.4f} on them; set "
                    "push.compare_with_release=false to release anyway"), ""
        return None, f"{on} >= the last released model's {there:.4f} (this model {here:.4f})"
    bound = 1 + Z95 * math.sqrt(both.lost + both.gained)
    metadata.update({"shared_pairs_only_the_release_got_right": both.lost,
                     "shared_pairs_only_this_model_got_right": both.gained, "paired_noise_bound": bound})
    split = (f"{both.lost:g} of them only the release got right, {both.gained:g} only this model; chance allows a "
             f"difference of {bound:.1f}")
    if both.lost - both.gained > bound:
        return (f"accuracy {here:.4f} {on} is below the last released model's {there:.4f} on them by more than "
                f"chance allows ({split}); set push.compare_with_release=false to release anyway"), ""
    if here >= there:
        return None, f"{on} >= the last released model's {there:.4f} (this model {here:.4f})"
    return None, (f"{on} below the last released model's {there:.4f} (this model {here:.4f}) by no more than "
                  f"chance allows ({split})")


def accuracy_gate(layout: Layout, min_accuracy: float, compare_with_release: bool = True,
                  min_test_pairs: int = 1, release: Path | None = None) -> Verdict:
    """Accuracy >= min_accuracy, measured on at least min_test_pairs held-out pairs; where min_accuracy
    is above chance, above chance beyond sampling noise too (its 95% interval above 0.5: 0.6 on 50 pairs
    is not); and not below the last released model's (release_bar; see _compared)."""
    name = "release_gate"
    path = layout.evaluation / "report.json"
    if not path.exists():
        return _missing(name, path)
    report = read_json(path)
    accuracy, pairs = report["accuracy"], report.get("pairs")
    reasons = []
    if not _finite(accuracy) or accuracy < min_accuracy:
        reasons.append(f"accuracy {accuracy:.4f} is below the minimum {min_accuracy:.4f} (push.min_accuracy)")
    low, high = wilson_interval(accuracy, pairs) if isinstance(pairs, int) and _finite(accuracy) else (0, 1)
    if not isinstance(pairs, int) or pairs < min_test_pairs:
        reasons.append(f"accuracy measured on {pairs} held-out pair{'' if pairs == 1 else 's'}, fewer than "
                       f"push.min_test_pairs ({min_test_pairs}): on so few it says little (95% interval {low:.2f} "
                       f"to {high:.2f})")
    elif not reasons and min_accuracy > CHANCE and low <= CHANCE:
        # a minimum above chance asks for a model better than a coin, and a coin could have scored as well here
        reasons.append(f"accuracy {accuracy:.4f} on {pairs} held-out pairs is not above chance beyond sampling "
                       f"noise (95% interval {low:.2f} to {high:.2f} holds {CHANCE}): measure it on more pairs "
                       "(download.test_fraction) or train a better model")
    metadata: dict[str, Any] = {"accuracy": accuracy, "min_accuracy": min_accuracy,
                                "accuracy_interval_95": f"{low:.4f} to {high:.4f}",
                                "test_pairs": "unknown" if pairs is None else pairs,
                                "min_test_pairs": min_test_pairs, "previous_release_accuracy": "none"}
    bar = release_bar(layout, report.get("inputs", {}).get("model"), release) if compare_with_release else None
    said = ""
    if bar is not None:
        refused, said, compared = _compared(report, bar, min_test_pairs)
        metadata.update(compared)
        if refused and bar.get(FORCED_BY_EARLIER_VERSION):
            refused += (" (that release was forced past its release gate by an earlier version of rm_lib, which "
                        "did not record whether a check that blocks had failed: if it is no bar, set "
                        "push.compare_with_release=false)")
        if refused:
            reasons.append(refused)
    if reasons:
        return Verdict(name, False, "release blocked: " + "; ".join(reasons), metadata)
    description = (f"release gate passed: accuracy {accuracy:.4f} on {pairs} test pairs >= minimum "
                   f"{min_accuracy:.4f}{said}")
    return Verdict(name, True, description, metadata)


def _bounded_report(layout: Layout, name: str, bound: float | None, unset: str) -> dict | Verdict:
    """The evaluation report for a gate whose bound is set; the gate's verdict when it is not, or when
    there is no report yet."""
    path = layout.evaluation / "report.json"
    if bound is None:
        return Verdict(name, True, unset)
    return read_json(path) if path.exists() else _missing(name, path)


def subset_gate(layout: Layout, min_subset_accuracy: float | None) -> Verdict:
    """Every subset of the held-out pairs (the `subset` column) reaches min_subset_accuracy: a model
    can pass overall while failing one category (say, harmlessness) outright."""
    name = "subset_gate"
    report = _bounded_report(layout, name, min_subset_accuracy,
                             "no minimum accuracy per subset set (push.min_subset_accuracy)")
    if isinstance(report, Verdict):
        return report
    per_subset = report.get("per_subset", {})
    if not per_subset:
        return Verdict(name, True, "the held-out pairs name no subsets: push.min_subset_accuracy has nothing to hold",
                       {"min_subset_accuracy": min_subset_accuracy})
    below = {n: e["accuracy"] for n, e in per_subset.items()
             if not _finite(e["accuracy"]) or e["accuracy"] < min_subset_accuracy}
    metadata = {"min_subset_accuracy": min_subset_accuracy,
                "per_subset": {n: e["accuracy"] for n, e in per_subset.items()}}
    if below:
        shown, more = subset_listing(dict(sorted(below.items())))
        listed = ", ".join(f"{one_line(n)} {a:.4f}" for n, a in shown)
        listed += f", and {more} more (report.json)" if more else ""
        return Verdict(name, False, f"release blocked: {len(below)} of {len(per_subset)} subsets below the minimum "
                                    f"{min_subset_accuracy:.4f} (push.min_subset_accuracy): {listed}", metadata)
    return Verdict(name, True, f"every subset ({len(per_subset)}) reaches {min_subset_accuracy:.4f}", metadata)


def length_correlation_gate(layout: Layout, max_abs: float | None) -> Verdict:
    """|Pearson r of reward and length| at most push.max_length_correlation: a reward that follows the
    token count teaches the policy to pad its answers."""
    name = "length_correlation_gate"
    report = _bounded_report(layout, name, max_abs,
                             "no bound on the reward-length correlation set (push.max_length_correlation)")
    if isinstance(report, Verdict):
        return report
    r = report.get("reward_length_correlation")
    metadata = {"reward_length_correlation": "undefined" if r is None else r, "max_length_correlation": max_abs}
    if r is None:  # one side without spread: the reward cannot follow length here
        why = ("the model gives every answer one reward" if report.get("reward_std") == 0
               else "the answers share one length")
        return Verdict(name, True, f"the reward-length correlation is undefined ({why})", metadata)
    if not _finite(r):
        return Verdict(name, False, "release blocked: the reward-length correlation is not a number (a reward is "
                                    "not finite)", metadata)
    if abs(r) > max_abs:
        return Verdict(name, False, f"release blocked: |reward-length correlation| {abs(r):.4f} is above "
                                    f"{max_abs:.4f} (push.max_length_correlation)", metadata)
    return Verdict(name, True, f"|reward-length correlation| {abs(r):.4f} <= {max_abs:.4f}", metadata)


def seen_by_base_gate(layout: Layout, max_share: float) -> Verdict:
    """At most `max_share` of the held-out pairs ask a prompt that a base model (one this model was trained
    on from) trained on: on those the accuracy is partly memory (rm_lib.data.trained_prompts). A base
    whose training prompts are not recorded is a warning: what it trained on cannot be told."""
    name = "seen_by_base_gate"
    path = layout.evaluation / "report.json"
    if not path.exists():
        return _missing(name, path)
    seen = read_json(path).get(SEEN) or {}
    unrecorded = seen.get("unrecorded_bases") or []
    metadata: dict[str, Any] = {"max_test_seen_by_base": max_share, "unrecorded_bases": ", ".join(unrecorded)}
    if not seen.get("checked"):
        return Verdict(name, False, f"not checked: {seen.get('why') or 'the report predates the check'}", metadata,
                       warn_only=True)
    share = seen["share_base"]
    metadata.update(test_pairs_seen_by_base=seen["base"], share=share)
    if share > max_share + 1e-12:
        unseen = seen.get("accuracy_unseen")
        return Verdict(name, False, f"release blocked: {seen['base']} of {seen['pairs']} held-out pairs ({share:.1%}) "
                       f"ask a prompt a base model trained on, more than push.max_test_seen_by_base ({max_share:.1%}): "
                       "their accuracy is partly memory"
                       + (f" (accuracy on the other pairs {unseen:.4f})" if unseen is not None else "")
                       + "; hold out what the base held out (its download.seed, test_fraction and source), or train "
                       "from a model that did not train on them", metadata)
    if unrecorded:
        return Verdict(name, False, f"not checked for {', '.join(unrecorded)}: a base whose training prompts are not "
                       "recorded (trained by an earlier rm_lib, or its trained_prompts.json could not be fetched); "
                       "the held-out pairs may ask prompts it trained on", metadata, warn_only=True)
    return Verdict(name, True, f"{seen['base']} of {seen['pairs']} held-out pairs ask a prompt a base model trained on "
                   f"(at most {max_share:.1%})", metadata)


def evaluation_gate(layout: Layout, gate: Any, release: Path | None = None) -> list[Verdict]:
    """The gate's rules on the evaluation report. `gate`: the push settings (min_accuracy,
    compare_with_release, min_test_pairs, min_subset_accuracy, max_length_correlation,
    max_test_seen_by_base); `release`: the last release's folder (release_bar)."""
    return [accuracy_gate(layout, gate.min_accuracy, gate.compare_with_release, gate.min_test_pairs, release),
            subset_gate(layout, gate.min_subset_accuracy),
            length_correlation_gate(layout, gate.max_length_correlation),
            seen_by_base_gate(layout, gate.max_test_seen_by_base)]


def release_gate(layout: Layout, gate: Any) -> Verdict:
    """The evaluation gate as one verdict (the UI's release_gate check). Under push.force a failure is a
    warning: push releases the model anyway and its card says the gate failed, so nothing in front of it
    may stop it. So under push.dry_run: push writes what it would upload, its card saying the gate failed
    (as the CLI and dvc repro do)."""
    verdict = combined("release_gate", evaluation_gate(layout, gate))
    if verdict.passed or not (gate.force or gate.dry_run):
        return verdict
    anyway = "push.force=true releases it anyway" if gate.force else "push.dry_run=true writes it, saying so"
    return replace(verdict, warn_only=True, description=f"{anyway}: " + verdict.description)


def release_verdicts(layout: Layout, gate: Any, release: Path | None = None) -> list[Verdict]:
    """What must hold before a model is released: finite training loss, and the evaluation gate."""
    return [loss_is_finite(layout), *evaluation_gate(layout, gate, release)]


def combined(name: str, verdicts: list[Verdict]) -> Verdict:
    """Several verdicts shown as one (the UI's release_gate check): failed when any blocking one failed."""
    failed = blocking_failures(verdicts)
    shown = failed or verdicts
    return Verdict(name, not failed, "; ".join(v.description for v in shown),
                   {k: v for verdict in verdicts for k, v in verdict.metadata.items()})


def blocking_failures(verdicts: list[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if not v.passed and not v.warn_only]


def scores_consistent(layout: Layout) -> Verdict:
    """The held-out texts get the same score on every path the model is used by (batch size 1, left
    padding, the packed training forward, transformers' pipeline) as in evaluation, within the tolerance
    that report.json's `consistency` states. A warning: the evaluation's own scores stand either way."""
    name = "scores_consistent"
    path = layout.evaluation / "report.json"
    if not path.exists():
        return _missing(name, path, warn_only=True)
    result = read_json(path).get("consistency")
    if not isinstance(result, dict):
        return Verdict(name, False, f"{path} holds no score-consistency result; run the evaluate step again",
                       warn_only=True)
    diffs = {k: ("skipped" if v is None else v) for k, v in (result.get("max_abs_diff") or {}).items()}
    metadata = {"tolerance": result.get("tolerance"), "rule": result.get("rule"), "max_abs_diff": diffs,
                "failed": result.get("failed", []), "skipped": result.get("skipped", {})}
    if result.get("passed"):
        skipped = sorted(result.get("skipped") or {})
        return Verdict(name, True, f"{result.get('texts')} texts score the same on every path "
                                   + (f"scored (skipped: {', '.join(skipped)}; see the metadata for why) " if skipped
                                      else "")
                                   + f"within {result.get('tolerance')} of the reference ({result.get('reference')})",
                       metadata, warn_only=True)
    failed = ", ".join(f"{p} (max |diff| {diffs.get(p)})" for p in result.get("failed", []))
    hint = f"; {result['hint']}" if result.get("hint") else ""
    return Verdict(name, False, f"scores differ from the reference ({result.get('reference')}) by more than "
                                f"{result.get('tolerance')} on: {failed}{hint}", metadata, warn_only=True)

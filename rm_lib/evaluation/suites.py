"""Evaluation suites: labelled sets scored beside the held-out pairs (`evaluate.suites`).

An entry is a local file or folder (read by rm_lib.data.sources, as `download.source` is) or a Hub
dataset `owner/name[@split]` (split `test` when none is given). Two layouts, found from the first row
and then required of every row:

  pairwise   prompt / chosen / rejected, text or messages, any format rm_lib.data.formats reads
             (RewardBench 1, `allenai/reward-bench@filtered`). Correct when reward(chosen) > reward(rejected).
  best_of_n  prompt, chosen: [answer, ...], rejected: [answer, ...], each answer a text or a message list
             (RewardBench 2, `allenai/reward-bench-2`). Correct when every chosen answer outscores every
             rejected one.

A tie is wrong in both. A `subset` (or `category`) column gives accuracy per subset; the suite's
accuracy is over its rows, so each subset weighs by its row count. Rows that are well-formed but
unusable (an empty answer, chosen identical to rejected) are counted by reason, never dropped
silently; a structural problem is a DataError naming file, row and field.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rm_lib.data import formats, keys, sources, trained_prompts
from rm_lib.errors import DataError
from rm_lib.evaluation.metrics import subset_listing
from rm_lib.evaluation.visualize import one_line
from rm_lib.files import file_sha256

PAIRWISE, BEST_OF_N = "pairwise", "best_of_n"
DEFAULT_HUB_SPLIT = "test"
Messages = list[dict]


@dataclass(frozen=True)
class Suite:
    entry: str  # as the user wrote it
    name: str  # [a-z0-9_], unique among the suites of a run
    kind: str  # local | hub
    location: str  # the path, or the Hub dataset id
    split: str | None = None  # Hub only


@dataclass
class Row:
    id: str
    prompt: Messages
    chosen: list[Messages]
    rejected: list[Messages]
    subset: str | None = None
    origin: tuple[str, int, Any] | None = None  # (file label, row number, the row as read)


@dataclass
class _Read:
    layout: str | None = None
    rows: list[Row] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    set_aside: list[dict] = field(default_factory=list)  # each skipped row, its file, number and reason


SET_ASIDE = "set_aside"  # an entry's skipped rows; evaluate writes them to suites.rejects.jsonl, not the report


def sanitise(text: str) -> str:
    """A name for metrics.json keys: lower case, runs of anything else than [a-z0-9] become one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unnamed"


def _stem(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix in sources.SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def parse_entry(entry: str) -> Suite:
    """`path` or `owner/name[@split]` -> a Suite (its name not yet made unique)."""
    text = entry.strip()
    if Path(text).exists():
        return Suite(entry, sanitise(_stem(Path(text))), "local", text)
    location, at, split = text.rpartition("@") if "@" in text else (text, "", "")
    kind = sources.source_kind(location)  # a path-looking entry that does not exist is a DataError here
    if kind == "demo":
        raise DataError("the demo set is no evaluation suite; name a file or a Hub dataset", file=entry)
    if kind == "local":
        raise DataError("a local file has no split: drop the '@...'", file=entry)
    name = location.rsplit("/", 1)[-1] + (f"_{split}" if at else "")
    return Suite(entry, sanitise(name), "hub", location, split or DEFAULT_HUB_SPLIT)


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with each repeat given the first free `_2`, `_3`...: free of every name given, so a
    second `prefs` beside a suite named `prefs_2` becomes `prefs_3`, and each keeps its own report."""
    taken, seen, out = set(names), set(), []
    for name in names:
        if name in seen:
            n = 2
            while f"{name}_{n}" in taken:
                n += 1
            taken.add(f"{name}_{n}")
            name = f"{name}_{n}"
        seen.add(name)
        out.append(name)
    return out


def parse_entries(entries: Sequence[str]) -> list[Suite]:
    """Every entry parsed, names made unique (a second `prefs` becomes `prefs_2`, or the next free name)."""
    parsed = [parse_entry(entry) for entry in entries]
    return [replace(suite, name=name) for suite, name in zip(parsed, unique_names([s.name for s in parsed]))]


# ---- the accuracy rule, on rewards ---------------------------------------------------------------

def row_correct(chosen: Sequence[float], rejected: Sequence[float]) -> bool:
    """Every chosen reward strictly above every rejected one (a tie is wrong, and so is a NaN reward: min and
    max would keep or drop it by its place). A pair is N = 1."""
    scores = [*chosen, *rejected]
    return (bool(chosen) and bool(rejected) and not any(math.isnan(s) for s in scores)
            and min(chosen) > max(rejected))


def accuracy(correct: Sequence[bool], subsets: Sequence[str | None]) -> tuple[float, dict[str, dict]]:
    """(accuracy over all rows, {subset: {"rows", "accuracy"}}); rows without a subset count only overall."""
    groups: dict[str, list[bool]] = {}
    for ok, subset in zip(correct, subsets):
        if subset is not None:
            groups.setdefault(subset, []).append(ok)
    per_subset = {name: {"rows": len(v), "accuracy": sum(v) / len(v)} for name, v in sorted(groups.items())}
    return (sum(correct) / len(correct) if correct else 0.0), per_subset


# ---- reading rows --------------------------------------------------------------------------------

def _layout_of(row: Any, *, file: str, row_number: int) -> str:
    if not isinstance(row, dict):
        raise DataError(f"expected an object with prompt/chosen/rejected, got {type(row).__name__}",
                        file=file, row=row_number)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    answers = [a for side in (chosen, rejected) if isinstance(side, list) for a in side[:1]]
    if isinstance(chosen, list) and isinstance(rejected, list) and all(isinstance(a, (str, list)) for a in answers):
        return BEST_OF_N  # lists of answers; a pairwise conversation is a list of message objects
    ids = formats.id_columns(row)  # by any of TRL's names (a TRL-processed set keeps its texts beside them)
    if ids is not None:
        raise DataError(f"pretokenized rows ({'/'.join(ids)}) cannot be a suite: it renders texts with the model's "
                        "own template; give prompt/chosen/rejected as text or messages (without the id columns)",
                        file=file, row=row_number)
    formats.detect_format(row, file=file, row_number=row_number)  # names the missing columns or wrong types
    return PAIRWISE


def _subset(row: dict) -> str | None:
    value = row.get("subset", row.get("category"))
    return None if value in (None, "") else str(value)


def _best_of_n(row: dict, *, file: str, row_number: int) -> Row | str:
    """A Row, or the reason the row cannot be scored."""
    if "prompt" not in row:
        raise DataError("a best-of-N row needs a prompt", file=file, row=row_number, field="prompt")
    texts = [row["prompt"], *row["chosen"], *row["rejected"]]
    if any(isinstance(text, str) and formats.messages_as_text(text) for text in texts):
        return "messages_as_text"  # a list of messages written as text would be scored as words
    try:  # each conversation read as training reads a pair's: a row training would set aside is set aside
        prompt = formats.read_messages(row["prompt"], "prompt", file=file, row_number=row_number)
        sides = {side: [formats.read_messages(a, f"{side}[{i}]", file=file, row_number=row_number)
                        for i, a in enumerate(row[side])] for side in ("chosen", "rejected")}
    except formats.Rejected as exc:
        return exc.reason
    for side in ("chosen", "rejected"):
        if not sides[side]:
            return f"no_{side}"
        if any(all(formats.is_blank(m["content"]) for m in answer) for answer in sides[side]):
            return "empty_answer"
        if any(answer[-1]["role"] != "assistant" for answer in sides[side]):  # the reward would be read after it
            return "answer_not_assistant"
    identifier = row.get("id")
    return Row(str(identifier) if identifier not in (None, "") else f"{file}:{row_number}", prompt,
               sides["chosen"], sides["rejected"], _subset(row))


def _pairwise(row: dict, normaliser: formats.Normaliser, *, row_number: int) -> Row | str:
    if "subset" not in row and "category" in row:
        row = {**row, "subset": row["category"]}
    (outcome, record), = normaliser([(row_number, row)])
    if outcome == "reject":
        return record["reason"]
    identifier = row.get("id")
    return Row(str(identifier) if identifier not in (None, "") else record["id"], record["prompt"],
               [record["chosen"]], [record["rejected"]], record.get("subset"))


def read_rows(inputs: Iterable[tuple[str, Iterable[tuple[int, Any]]]]) -> _Read:
    """Rows of one suite from (file label, numbered rows) inputs; one layout for all of them."""
    read = _Read()
    for label, rows in inputs:
        normaliser = formats.Normaliser(label)
        try:
            for number, row in rows:
                layout = _layout_of(row, file=label, row_number=number)
                if layout == BEST_OF_N and not row["chosen"] and not row["rejected"]:
                    # two empty lists fit either layout: skipped as empty, the layout left to a row that decides
                    layout = read.layout
                if layout is None:
                    outcome: Row | str = "empty_side"
                else:
                    if read.layout is None:
                        read.layout = layout
                    elif layout != read.layout:
                        # the side that is not a list of answers when the suite is best-of-N (and the reverse)
                        lists = [isinstance(row.get(side), list) for side in ("chosen", "rejected")]
                        field = ("rejected" if lists[0] != lists[1] and lists[0] == (read.layout == BEST_OF_N)
                                 else "chosen")
                        raise DataError(f"row is {layout}, but the suite began {read.layout}",
                                        file=label, row=number, field=field)
                    outcome = (_best_of_n(row, file=label, row_number=number) if layout == BEST_OF_N
                               else _pairwise(row, normaliser, row_number=number))
                if isinstance(outcome, str):
                    read.skipped[outcome] += 1
                    read.set_aside.append({"file": label, "row": number, "reason": outcome,
                                           "data": formats.json_safe(row)})
                else:
                    outcome.origin = (label, number, row)
                    read.rows.append(outcome)
        finally:
            getattr(rows, "close", lambda: None)()
    return read


def _inputs(suite: Suite) -> tuple[Iterator[tuple[str, Iterable]], str | None]:
    """(label, rows) per file of the suite, and its content hash: a file's sha256, a folder's combined
    hash, or the Hub commit the rows are read at (None where the Hub does not say)."""
    if suite.kind == "local":
        files = sources.local_files(suite.location)
        digest = file_sha256(files[0]) if Path(suite.location).is_file() else \
            sources.local_fingerprint(suite.location)["sha256"]
        return ((str(f), sources.read_file(f)) for f in files), digest
    revision = sources.hub_fingerprint(suite.location, None)  # read at this commit, so the hash is what was scored
    rows = sources.read_hub(suite.location, suite.split, revision=revision, subset=None)
    return iter([(f"hf://{suite.location}@{suite.split}", rows)]), revision


# ---- scoring -------------------------------------------------------------------------------------

def _score_unique(scorer: Any, items: list[Messages], names: list[str],
                  prompts: list[Messages]) -> tuple[dict[str, float], set[str]]:
    """Rewards per distinct conversation (identical texts share one score, so they tie exactly),
    scored longest first so each batch pads little; a prompt longer than training held prompts to is
    cut as filter cuts a pair's. Returns ({_key: reward}, keys that were truncated)."""
    unique: dict[str, tuple[Messages, str, Messages]] = {}
    for item, name, prompt in zip(items, names, prompts):
        unique.setdefault(_key(scorer, item, prompt), (item, name, prompt))
    keys = sorted(unique, key=len, reverse=True)
    lengths = _prompt_lengths(scorer, [unique[k][2] for k in keys])
    scored = scorer.score_ids([scorer.encode(unique[k][0], unique[k][1]) for k in keys],
                              names=[unique[k][1] for k in keys], prompt_lengths=lengths)
    return dict(zip(keys, scored.rewards)), {k for k, cut in zip(keys, scored.truncated) if cut}


def _key(scorer: Any, item: Messages, prompt: Messages) -> str:
    """What makes a conversation's reward: its messages, and where prompts are cut, which are its prompt
    (one conversation under two rows' prompt splits is cut at two places)."""
    return json.dumps([item, prompt] if scorer.max_prompt is not None else item, sort_keys=True)


def _prompt_lengths(scorer: Any, prompts: list[Messages]) -> list[int]:
    """Each prompt's tokens (scorer.prompt_length), a prompt shared by many answers counted once."""
    known: dict[str, int] = {}
    for prompt in prompts:
        known.setdefault(json.dumps(prompt, sort_keys=True), scorer.prompt_length(prompt))
    return [known[json.dumps(prompt, sort_keys=True)] for prompt in prompts]


def _set_aside_sure_ties(scorer: Any, read: _Read) -> None:
    """Rows where a chosen and a rejected answer give the same token ids (they differ only in case or
    spaces the tokenizer drops, or where the cut to the model's length takes away): their rewards are
    equal but for rounding, so the verdict would be noise. Set aside as filter and score set them aside."""
    kept = []
    for row in read.rows:
        ids = {side: [scorer.encode(row.prompt + answer, row.id) for answer in getattr(row, side)]
               for side in ("chosen", "rejected")}
        prompt = scorer.prompt_length(row.prompt)
        ties = {scorer.sure_tie(c, r, row.id, prompt) for c in ids["chosen"] for r in ids["rejected"]} - {None}
        reason = "identical_tokens" if "identical_tokens" in ties else next(iter(ties), None)
        if reason is None:
            kept.append(row)
            continue
        label, number, raw = row.origin or (None, None, None)
        read.skipped[reason] += 1
        read.set_aside.append({"file": label, "row": number, "reason": reason, "data": formats.json_safe(raw)})
    read.rows = kept


def score_rows(scorer: Any, rows: list[Row]) -> tuple[list[bool], int]:
    """(correct per row, answers truncated to the model's length)."""
    items, names, prompts = [], [], []
    for row in rows:
        for side in ("chosen", "rejected"):
            for i, answer in enumerate(getattr(row, side)):
                items.append(row.prompt + answer)
                names.append(f"{row.id} ({side} {i})")
                prompts.append(row.prompt)
    rewards, truncated = _score_unique(scorer, items, names, prompts)
    correct = []
    for row in rows:
        chosen = [rewards[_key(scorer, row.prompt + a, row.prompt)] for a in row.chosen]
        rejected = [rewards[_key(scorer, row.prompt + a, row.prompt)] for a in row.rejected]
        correct.append(row_correct(chosen, rejected))
    cut = sum(_key(scorer, item, prompt) in truncated for item, prompt in zip(items, prompts))
    return correct, cut


def evaluate_suite(suite: Suite, scorer: Any, trained: dict | None = None) -> dict:
    """The report entry of one suite. `trained`: the model's trained_prompts.json (None: not counted)."""
    inputs, content_hash = _inputs(suite)
    read = read_rows(inputs)
    _set_aside_sure_ties(scorer, read)
    if not read.rows:
        raise DataError(f"no row of the suite can be scored ({sum(read.skipped.values())} skipped: "
                        f"{dict(read.skipped) or 'the set is empty'})", file=suite.entry)
    correct, truncated = score_rows(scorer, read.rows)
    overall, per_subset = accuracy(correct, [r.subset for r in read.rows])
    entry = {"source": suite.entry, "layout": read.layout, "rows": len(read.rows), "accuracy": overall,
             "per_subset": per_subset, "content_hash": content_hash, "skipped": sum(read.skipped.values()),
             "skipped_by_reason": dict(sorted(read.skipped.items())), "truncated_answers": truncated,
             SET_ASIDE: read.set_aside}
    seen = seen_rows(read.rows, correct, trained)
    if seen is not None:
        entry[trained_prompts.SEEN] = seen
    return {**entry, "split": suite.split} if suite.kind == "hub" else entry


def seen_rows(rows: Sequence[Row], correct: Sequence[bool], trained: dict | None) -> dict | None:
    """How many of a suite's rows ask a prompt the model, or a base it trained on from, trained on (as the
    held-out pairs are counted: trained_prompts.overlap), and the accuracy on the others: a suite made of
    training pairs scored as a benchmark with no word of it. None where the model keeps no record. A row
    without a prompt is keyed by its two sides, as tokenize keys such a training pair."""
    pairs = [{"prompt": r.prompt, "chosen": r.chosen[0], "rejected": r.rejected[0]} for r in rows]
    found = trained_prompts.overlap([keys.digest(k) for k in keys.prompt_keys(pairs)], trained)
    if not found["checked"]:
        return None
    marked = set(found["seen_rows"])
    others = [ok for i, ok in enumerate(correct) if i not in marked]
    return {"rows": len(marked), "accuracy_unseen": sum(others) / len(others) if others else None}


def evaluate_suites(entries: Sequence[str], model_dir: str | Path, *, batch_size: int,
                    sources: Path | None = None) -> dict[str, dict]:
    """{suite name: report entry} for every entry, scored by the model in `model_dir` with the template
    recorded beside it; texts longer than the model reads (the length training held its pairs to, else its
    positions) keep their end (as filter.policy=truncate).
    `sources`: the folder DVC watches (data/sources); a local suite elsewhere gets a `note` saying so."""
    from rm_lib.data.sources import untracked_note
    from rm_lib.evaluation.scoring import RewardScorer
    from rm_lib.model.modeling import TRAINED

    suites = parse_entries(entries)  # every entry checked before the model loads
    scorer = RewardScorer(model_dir, batch_size=batch_size, length_policy="truncate", setting=TRAINED)
    trained = trained_prompts.read(Path(model_dir))
    report = {suite.name: evaluate_suite(suite, scorer, trained) for suite in suites}
    for suite in suites:
        note = untracked_note(suite.location, sources) if sources is not None and suite.kind != "hub" else None
        if note:
            report[suite.name]["note"] = note
    return report


# ---- what other outputs read ---------------------------------------------------------------------

def flat_metrics(suites: dict[str, dict]) -> dict[str, float]:
    """metrics.json entries: suite_<name>_accuracy and suite_<name>__<subset>_accuracy. A sanitised name
    holds no `__`, so no two suites' keys meet (suite `prefs`, subset `easy` beside a suite `prefs_easy`);
    subsets of one suite that sanitise alike (`Precise IF`, `precise-if`) are told apart as names are."""
    flat = {}
    for name, entry in suites.items():
        flat[f"suite_{sanitise(name)}_accuracy"] = entry["accuracy"]
        subsets = list(entry.get("per_subset", {}).items())
        for key, (_, value) in zip(unique_names([sanitise(s) for s, _ in subsets]), subsets):
            flat[f"suite_{sanitise(name)}__{key}_accuracy"] = value["accuracy"]
    return flat


def subset_phrase(per_subset: dict[str, dict]) -> str:
    """'; easy 0.9100; hard 0.7300' for a summary line, names on one line; past 8 subsets the 8 least
    accurate, and how many more report.json holds."""
    shown, more = subset_listing({name: e["accuracy"] for name, e in per_subset.items()})
    listed = "".join(f"; {one_line(name)} {accuracy:.4f}" for name, accuracy in shown)
    if not more:
        return listed
    return f"; the {len(shown)} least accurate of {len(per_subset)} subsets{listed}; +{more} more in report.json"


def summary_lines(suites: dict[str, dict]) -> str:
    """One line per suite for the step's summary ('' when there is none)."""
    lines = []
    for name, e in suites.items():
        skipped = f", {e['skipped']} skipped" if e.get("skipped") else ""
        note = f"\n    {e['note']}" if e.get("note") else ""
        seen = e.get(trained_prompts.SEEN) or {}
        if seen.get("rows"):
            note += (f"\n    warning: {trained_prompts.seen_phrase(seen, e['rows'])}: not a benchmark of what the "
                     "model has not seen")
        lines.append(f"\n  suite {one_line(name)} ({e['layout']}, {e['rows']} rows{skipped}): accuracy "
                     f"{e['accuracy']:.4f}{subset_phrase(e['per_subset'])}{note}")
    return "".join(lines)

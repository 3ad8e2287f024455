"""score: every pair of a preference file (any supported format) -> rewards per row, accuracy."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rm_lib.data import formats, length_filter, sources, tokenization
from rm_lib.errors import DataError, UserError
from rm_lib.evaluation.metrics import pair_metrics
from rm_lib.evaluation.scoring import RewardScorer, check_model_folder, model_max_length
from rm_lib.files import atomic_files, special_file, unwritable_folder, write_jsonl, write_rows
from rm_lib.layout import OUTPUTS, Layout
from rm_lib.model.modeling import TRAINED
from rm_lib.progress import Progress
from rm_lib.settings import Params, check_within_positions, names_a_folder


@dataclass
class ScoreResult:
    metrics: dict
    rejected: int
    output: Path
    truncated: int = 0  # pairs with a side cut to max_length (filter.policy=truncate)
    max_length: int | None = None
    rejects: Path | None = None  # the rows set aside, with their reasons, where there were any
    reasons: dict[str, int] = field(default_factory=dict)  # rows set aside, by reason

    def summary(self) -> str:
        m = self.metrics
        aside = f"; rows set aside: {self.rejects}" if self.rejects else ""
        why = f": {', '.join(f'{k} {v}' for k, v in sorted(self.reasons.items()))}" if self.reasons else ""
        limit = f"truncated to {self.max_length} tokens" if self.max_length else "truncated (no length limit known)"
        return (f"score: {m['pairs']} pairs ({self.rejected} rejected{why}; {self.truncated} {limit}), "
                f"accuracy {m['accuracy']:.4f} "
                f"(ties {m['tie_rate']:.4f}; longer wins {m['longer_wins_baseline']:.4f}) -> {self.output}{aside}")


def rejects_path(output_path: str | Path) -> Path:
    """Where the rows that could not be scored go, with their reasons: beside the output."""
    output = Path(output_path)
    return output.with_name(output.name + ".rejects.jsonl")


def failed_rejects_path(output_path: str | Path) -> Path:
    """Where the rows set aside go when no pair is left to score: the output and its rejects stay a pair."""
    output = Path(output_path)
    return output.with_name(output.name + ".failed.rejects.jsonl")


def _check_paths(layout: Layout, model: str | None, input_path: str, output_path: str) -> None:
    if not Path(input_path).exists():
        raise UserError(f"{input_path}: no such file or folder")
    output = Path(output_path)
    if output.is_dir():
        raise UserError(f"--output {output_path}: is a folder; name the JSON Lines file to write")
    for path in (output, rejects_path(output), failed_rejects_path(output)):
        kind = special_file(path)
        if kind:  # the written file replaces what is there: a link to /dev/stdout would become a file
            raise UserError(f"--output {output_path}: {path} is {kind}; score writes its rewards (and the rows set "
                            "aside beside them) as files that replace what is at those paths: name a file")
    problem = unwritable_folder(output.parent)
    if problem:
        raise UserError(f"--output {output_path}: cannot be written: {problem}")
    inputs = {path.resolve() for path in sources.local_files(input_path)}
    if output.resolve() in inputs:
        raise UserError(f"--output {output_path}: is the input file; the rewards would replace the pairs. Name "
                        "another file")
    for written in (rejects_path(output), failed_rejects_path(output)):
        if written.resolve() in inputs:  # the rows set aside would replace it, or a clean run delete it
            raise UserError(f"--output {output_path}: its rows set aside go to {written}, which is the input "
                            "file; name another output")
        if written.is_dir():
            raise UserError(f"--output {output_path}: its rows set aside go to {written}, which is a folder")
    _check_not_kept(layout, model, output_path)
    if model is None and not layout.model.is_dir():
        raise UserError(f"{layout.model}: no trained model here; run the train step first, or pass --model")
    _check_model(model)


def _check_not_kept(layout: Layout, model: str | None, output_path: str) -> None:
    """The output may not land inside the model it scores (`--output <model>/model.safetensors` replaced its
    weights with the rewards) nor inside a folder a step of the pipeline writes and DVC records whole."""
    scored = layout.model if model is None else Path(model).expanduser()
    kept = {folder: f"a folder the {step} step writes" for step in OUTPUTS for folder in
            layout.outputs(step)}
    if scored.exists():
        kept[scored] = "the model it scores"
    for written in (Path(output_path), rejects_path(output_path), failed_rejects_path(output_path)):
        where = written.resolve()
        for folder, what in kept.items():
            if where.is_relative_to(folder.resolve()):
                raise UserError(f"--output {output_path}: {written} is inside {folder}, {what}; the rewards (and "
                                "the rows set aside beside them) would replace what is there. Name a file elsewhere "
                                "(data/scores.jsonl, say)")


def _check_model(model: str | None) -> None:
    if model is not None:
        check_model_folder(model, "--model")


def _noting_ids(rows: sources.Rows, file: str, own_ids: dict[str, Any]) -> sources.Rows:
    """The rows as read, each row's own `id` noted under its pair's id (file:row): the output names a pair
    as the user does, as evaluation suites do, and the pairs themselves keep file:row."""
    for number, row in rows:
        value = row.get("id") if isinstance(row, dict) else None
        if value is not None and value == value and value != "":  # value != value: a NaN, no id
            own_ids[f"{file}:{number}"] = formats.json_safe(value)
        yield number, row


def _reject_row(file: str, row: int, reason: str, detail: str, data: Any, own_ids: dict[str, Any]) -> dict:
    """One row of the rejects file, the same keys whoever set it aside (the reader or the tie check): the
    pair's id as the output names it, its file:row, and the file and row apart."""
    source = f"{file}:{row}"
    return {"id": own_ids.get(source, source), "source": source, "file": file, "row": row, "reason": reason,
            "detail": detail, "data": data}


def model_lengths(scorer: RewardScorer, chosen: dict[str, Any]) -> tuple[int | None, int | None, str | None]:
    """(max length, max prompt length, policy) a pair is held to: as the model was trained and evaluated
    (its rm_lib.json records how filter held its pairs; the scorer's max_length is that length within the
    positions), or as `chosen` (filter settings the user set on the score command) says; a model without
    a record (another project's, or one an earlier version saved) reads up to its positions, with no
    prompt limit and no policy of its own."""
    lengths = scorer.saved.get("lengths") or {}
    max_len = scorer.max_length
    if chosen.get("max_token_length") is not None:
        check_within_positions(chosen["max_token_length"], model_max_length(scorer.model, scorer.tokenizer),
                               str(scorer.model_dir))
        max_len = chosen["max_token_length"]
    prompt = chosen["max_prompt_token_length"] if "max_prompt_token_length" in chosen \
        else lengths.get("max_prompt_token_length")
    return max_len, prompt, chosen.get("policy") or lengths.get("policy")


def _pair_lengths(scorer: RewardScorer, params: Params, pairs: list[dict], rejects: list[dict],
                  own_ids: dict[str, Any], chosen: dict[str, Any]) -> tuple[list[dict], list[dict], int | None]:
    """(rows kept, rejects, the length they were held to): the pairs tokenized as tokenize does and held to
    the model's lengths as filter held its pairs (model_lengths), so scoring its test pairs gives
    evaluate's rewards. A longer pair is cut (truncate) or set aside with filter's reason (drop): as the
    user set filter.policy on the command, else as the model's pairs were, else by filter.policy.
    Pretokenized ids are read as given, as tokenize reads them. A sure tie is set aside as filter does."""
    max_len, max_prompt, policy = model_lengths(scorer, chosen)
    scorer.max_length = max_len  # the scorer reads the pairs to this length, not only to the model's own
    kept, dropped_rows, refused = [], [], []
    size = params.tokenize.batch_size  # a batch at a time, held to the lengths at once: memory of the cut rows only
    progress = Progress("score: tokenize", len(pairs), "pairs", note="")
    for start in range(0, len(pairs), size):
        rows = tokenization.tokenize_batch(pairs[start:start + size], scorer.tokenizer, scorer.template, scorer.special,
                                           refused)
        for row in rows:  # another project's model reads its reward where transformers reads it
            for side in ("chosen", "rejected"):
                row[f"input_ids_{side}"] = scorer.as_read(row[f"input_ids_{side}"])
                row[f"attention_mask_{side}"] = [1] * len(row[f"input_ids_{side}"])
        outcome = length_filter.apply(rows, max_len=max_len or max(_longest(rows), 1), max_prompt=max_prompt,
                                      policy=policy or params.filter.policy, keep_front=len(scorer.special.prefix),
                                      template_start=scorer.special.template_start)
        kept += outcome.kept
        dropped_rows += outcome.dropped
        progress(start + size)
    by_id = {pair["id"]: pair for pair in pairs}
    rejects = list(rejects)
    for aside in refused:  # as tokenize sets them aside
        file, row = aside["id"].rsplit(":", 1)
        rejects.append(_reject_row(file, int(row), aside["reason"], aside["why"], by_id[aside["id"]], own_ids))
    for dropped in dropped_rows:
        file, row = dropped["id"].rsplit(":", 1)
        rejects.append(_reject_row(file, int(row), dropped["reason"], _why(dropped, max_len, max_prompt),
                                   by_id[dropped["id"]], own_ids))
    return kept, rejects, max_len


def _longest(rows: list[dict]) -> int:
    return max((len(r[f"input_ids_{side}"]) for r in rows for side in ("chosen", "rejected")), default=0)


def _why(dropped: dict, max_len: int | None, max_prompt: int | None) -> str:
    reason = dropped["reason"]
    if reason.startswith("identical"):
        cut = f"cut to {max_len} tokens, " if reason == "identical_after_truncation" else ""
        return f"{cut}chosen and rejected give the same token ids: a sure tie"
    limit = (f"the model's prompt limit of {max_prompt}" if reason == "prompt_too_long"
             else f"the model's limit of {max_len}")
    prompt = "" if dropped["prompt_length"] is None else f"prompt {dropped['prompt_length']} tokens, "  # pretokenized
    return (f"{prompt}chosen {dropped['chosen_length']} tokens, rejected {dropped['rejected_length']}: over "
            f"{limit}, under filter.policy=drop (truncate keeps the end)")


def _remove(stale: Path, output_path: str) -> None:
    try:
        stale.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"{stale}: cannot be removed ({exc.strerror}); {output_path} was written, and {stale} is "
                        "an earlier run's") from None


def run_file(params: Params, layout: Layout, *, model: str | None, input_path: str, output_path: str,
             chosen: tuple[str, ...] = ()) -> ScoreResult:
    """Pairs are held to the lengths the model was trained and evaluated with (model_lengths): a longer
    one keeps its start token and its end (truncate), or is set aside (drop: counted, in the rejects), as
    the model's pairs were; `chosen` names the filter settings (policy, max_token_length,
    max_prompt_token_length) the user set on the command line, which are taken from `params` instead."""
    _check_paths(layout, model, input_path, output_path)
    model = str(Path(model).expanduser()) if model and names_a_folder(model) else model
    scorer = RewardScorer(model or layout.model, batch_size=params.evaluate.batch_size,
                          setting="--model" if model else TRAINED)
    pairs, rejects, own_ids = [], [], {}
    files = sources.local_files(input_path)
    for path in files:
        normaliser = formats.Normaliser(str(path))
        for outcome, record in normaliser(_noting_ids(sources.read_file(path), str(path), own_ids)):
            if outcome == "pair":
                pairs.append(record)
            else:
                rejects.append(_reject_row(record["file"], record["row"], record["reason"], record["detail"],
                                           record["data"], own_ids))
    if any("input_ids_chosen" in p for p in pairs):  # they bypass the tokenizer: checked as tokenize checks them
        tokenization.check_token_ids(pairs, scorer.model.get_input_embeddings().num_embeddings, file=None)
    rows, rejects, max_len = _pair_lengths(scorer, params, pairs, rejects, own_ids,
                                           {key: getattr(params.filter, key) for key in chosen})
    if not rows and not rejects:
        raise DataError("no rows to score: the input holds none", file=input_path)
    place = {str(path): i for i, path in enumerate(files)}  # the rejects in the input's order, whoever set them aside
    rejects.sort(key=lambda r: (place.get(r["file"], len(place)), r["row"]))
    if not rows:
        failed = failed_rejects_path(output_path)
        write_jsonl(failed, rejects)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r["reason"] for r in rejects).items()))
        raise DataError(f"no pair to score: all {len(rejects)} rows were set aside ({reasons}); see {failed}",
                        file=input_path)
    # both sides in one pass: one progress count of every text, and batches of like lengths across sides
    scored = scorer.score_ids([r[f"input_ids_{side}"] for side in ("chosen", "rejected") for r in rows],
                              names=[f"{r['id']} ({side})" for side in ("chosen", "rejected") for r in rows]).rewards
    rewards_c, rewards_r = scored[:len(rows)], scored[len(rows):]
    cut = [r["length_chosen"] > len(r["input_ids_chosen"]) or r["length_rejected"] > len(r["input_ids_rejected"])
           for r in rows]
    aside = rejects_path(output_path)
    out = ({"id": own_ids.get(r["id"], r["id"]), "source": r["id"], "reward_chosen": c, "reward_rejected": rj,
            "chosen_wins": c > rj, "truncated": t} for r, c, rj, t in zip(rows, rewards_c, rewards_r, cut))
    try:  # a disk that fills, a folder removed meanwhile: checked before the scoring, they can still happen
        # both written aside, then put in place together: a run that fails leaves the last run's pair of files
        # an earlier run's rejects, not about this input, go with it
        with atomic_files(output_path, *([aside] if rejects else []), remove=[] if rejects else [aside]) as handles:
            write_rows(handles[0], out)
            if rejects:
                write_rows(handles[1], rejects)
    except OSError as exc:
        which = aside if aside.name in str(exc.filename or "") else Path(output_path)
        raise UserError(f"{which}: cannot be written ({exc.strerror}); {output_path} and {aside} are as they "
                        "were") from None
    _remove(failed_rejects_path(output_path), output_path)  # an earlier failed run's: this one scored
    # the length figures count the tokens before any cut, as evaluate's do
    return ScoreResult(metrics=pair_metrics(rewards_c, rewards_r, [r["length_chosen"] for r in rows],
                                            [r["length_rejected"] for r in rows]),
                       rejected=len(rejects), output=Path(output_path), truncated=sum(cut),
                       max_length=max_len, rejects=aside if rejects else None,
                       reasons=dict(Counter(r["reason"] for r in rejects)))

"""score: every pair of a preference file (any supported format) -> rewards per row, accuracy."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rm_lib.data import formats, sources, tokenization
from rm_lib.errors import DataError, UserError
from rm_lib.evaluation.metrics import pair_metrics
from rm_lib.evaluation.scoring import RewardScorer
from rm_lib.files import atomic_files, unwritable_folder, write_jsonl, write_rows
from rm_lib.layout import Layout
from rm_lib.settings import Params, names_a_folder


@dataclass
class ScoreResult:
    metrics: dict
    rejected: int
    output: Path
    truncated: int = 0  # pairs with a side cut to max_length (filter.policy=truncate)
    max_length: int | None = None
    rejects: Path | None = None  # the rows set aside, with their reasons, where there were any

    def summary(self) -> str:
        m = self.metrics
        aside = f"; rows set aside: {self.rejects}" if self.rejects else ""
        return (f"score: {m['pairs']} pairs ({self.rejected} rejected, {self.truncated} truncated to the model's "
                f"{self.max_length} tokens), accuracy {m['accuracy']:.4f} "
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
    if model is None and not layout.model.is_dir():
        raise UserError(f"{layout.model}: no trained model here; run the train step first, or pass --model")
    _check_model(model)


def _check_model(model: str | None) -> None:
    """--model as model.name_or_path is checked, and a folder that holds no model said to be one: the
    libraries would otherwise read a missing folder as a malformed Hub id, and an empty one as a
    tokenizer that cannot be built."""
    if model is None:
        return
    folder = Path(model).expanduser()
    if not folder.exists():
        if names_a_folder(model):
            raise UserError(f"--model {model}: no such folder")
        return  # a Hub id
    if not folder.is_dir():
        raise UserError(f"--model {model}: is a file; name the folder train wrote (models/reward_model) or a Hub id")
    if not (folder / "config.json").is_file():
        raise UserError(f"--model {model}: the folder holds no model (no config.json); name the folder train wrote "
                        "(models/reward_model)")


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


def _encode_pairs(scorer: RewardScorer, pairs: list[dict], rejects: list[dict], own_ids: dict[str, Any]
                  ) -> tuple[list[dict], list[tuple[list[int], list[int]]], list[dict]]:
    """(pairs kept, their (chosen, rejected) ids, rejects): pretokenized ids are read as given, as tokenize
    reads them (decoding and encoding again could split words otherwise); a pair whose sides come out as
    the same ids is set aside as identical_tokens, as filter sets it aside from training and evaluation."""
    kept, encoded, rejects = [], [], list(rejects)
    for pair in pairs:
        if "input_ids_chosen" in pair:
            ids = (tokenization.add_special(pair["input_ids_chosen"], scorer.special),
                   tokenization.add_special(pair["input_ids_rejected"], scorer.special))
        else:
            ids = scorer.encode(pair["prompt"] + pair["chosen"]), scorer.encode(pair["prompt"] + pair["rejected"])
        reason = scorer.sure_tie(ids[0], ids[1], pair["id"])
        if reason is not None:
            cut = f"cut to the {scorer.max_length} tokens the model reads, " if reason != "identical_tokens" else ""
            file, row = pair["id"].rsplit(":", 1)
            rejects.append(_reject_row(file, int(row), reason, f"{cut}chosen and rejected give the same token ids: "
                                       "a sure tie", pair, own_ids))
            continue
        kept.append(pair)
        encoded.append(ids)
    return kept, encoded, rejects


def _remove(stale: Path, output_path: str) -> None:
    try:
        stale.unlink(missing_ok=True)
    except OSError as exc:
        raise UserError(f"{stale}: cannot be removed ({exc.strerror}); {output_path} was written, and {stale} is "
                        "an earlier run's") from None


def run_file(params: Params, layout: Layout, *, model: str | None, input_path: str, output_path: str) -> ScoreResult:
    """Texts longer than the model reads follow filter.policy, as in training: truncate keeps their
    end, drop refuses the first one by its row."""
    _check_paths(layout, model, input_path, output_path)
    model = str(Path(model).expanduser()) if model and names_a_folder(model) else model
    scorer = RewardScorer(model or layout.model, batch_size=params.evaluate.batch_size,
                          length_policy=params.filter.policy, policy_setting="filter.policy")
    pairs, rejects, own_ids = [], [], {}
    for path in sources.local_files(input_path):
        normaliser = formats.Normaliser(str(path))
        for outcome, record in normaliser(_noting_ids(sources.read_file(path), str(path), own_ids)):
            if outcome == "pair":
                pairs.append(record)
            else:
                rejects.append(_reject_row(record["file"], record["row"], record["reason"], record["detail"],
                                           record["data"], own_ids))
    if any("input_ids_chosen" in p for p in pairs):  # they bypass the tokenizer: checked as tokenize checks them
        tokenization.check_token_ids(pairs, scorer.model.get_input_embeddings().num_embeddings, file=None)
    pairs, encoded, rejects = _encode_pairs(scorer, pairs, rejects, own_ids)
    if not pairs:
        failed = failed_rejects_path(output_path)
        write_jsonl(failed, rejects)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r["reason"] for r in rejects).items()))
        raise DataError(f"no pair to score: all {len(rejects)} rows were set aside ({reasons}); see {failed}",
                        file=input_path)
    s_c = scorer.score_ids([c for c, _ in encoded], names=[f"{p['id']} (chosen)" for p in pairs])
    s_r = scorer.score_ids([r for _, r in encoded], names=[f"{p['id']} (rejected)" for p in pairs])
    cut = [a or b for a, b in zip(s_c.truncated, s_r.truncated)]
    aside = rejects_path(output_path)
    rows = ({"id": own_ids.get(p["id"], p["id"]), "source": p["id"], "reward_chosen": c, "reward_rejected": r,
             "chosen_wins": c > r, "truncated": t} for p, c, r, t in zip(pairs, s_c.rewards, s_r.rewards, cut))
    try:  # a disk that fills, a folder removed meanwhile: checked before the scoring, they can still happen
        # both written aside, then put in place together: a run that fails leaves the last run's pair of files
        with atomic_files(output_path, *([aside] if rejects else [])) as handles:
            write_rows(handles[0], rows)
            if rejects:
                write_rows(handles[1], rejects)
    except OSError as exc:
        which = aside if aside.name in str(exc.filename or "") else Path(output_path)
        raise UserError(f"{which}: cannot be written ({exc.strerror}); {output_path} and {aside} are as they "
                        "were") from None
    if not rejects:  # an earlier run's: not about this input
        _remove(aside, output_path)
    _remove(failed_rejects_path(output_path), output_path)  # an earlier failed run's: this one scored
    return ScoreResult(metrics=pair_metrics(s_c.rewards, s_r.rewards, s_c.lengths, s_r.lengths),
                       rejected=len(rejects), output=Path(output_path), truncated=sum(cut),
                       max_length=scorer.max_length, rejects=aside if rejects else None)

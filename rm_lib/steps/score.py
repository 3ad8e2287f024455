"""score: every pair of a preference file (any supported format) -> rewards per row, accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rm_lib.data import formats, sources
from rm_lib.errors import UserError
from rm_lib.evaluation.metrics import pair_metrics
from rm_lib.evaluation.scoring import RewardScorer
from rm_lib.files import write_jsonl
from rm_lib.layout import Layout
from rm_lib.settings import Params


@dataclass
class ScoreResult:
    metrics: dict
    rejected: int
    output: Path
    truncated: int = 0  # pairs with a side cut to max_length (filter.policy=truncate)
    max_length: int | None = None

    def summary(self) -> str:
        m = self.metrics
        return (f"score: {m['pairs']} pairs ({self.rejected} rejected, {self.truncated} truncated to the model's "
                f"{self.max_length} tokens), accuracy {m['accuracy']:.4f} "
                f"(ties {m['tie_rate']:.4f}; longer wins {m['longer_wins_baseline']:.4f}) -> {self.output}")


def _check_paths(layout: Layout, model: str | None, input_path: str) -> None:
    if not Path(input_path).exists():
        raise UserError(f"{input_path}: no such file or folder")
    if model is None and not layout.model.is_dir():
        raise UserError(f"{layout.model}: no trained model here; run the train step first, or pass --model")


def run_file(params: Params, layout: Layout, *, model: str | None, input_path: str, output_path: str) -> ScoreResult:
    """Texts longer than the model reads follow filter.policy, as in training: truncate keeps their
    end, drop refuses the first one by its row."""
    _check_paths(layout, model, input_path)
    scorer = RewardScorer(model or layout.model, batch_size=params.evaluate.batch_size,
                          length_policy=params.filter.policy)
    pairs, rejected = [], 0
    for path in sources.local_files(input_path):
        normaliser = formats.Normaliser(str(path))
        for outcome, record in normaliser(sources.read_file(path)):
            if outcome == "pair":
                pairs.append(record)
            else:
                rejected += 1
    chosen, rejected_items = [], []
    for pair in pairs:
        if "input_ids_chosen" in pair:
            chosen.append(scorer.tokenizer.decode(pair["input_ids_chosen"]))
            rejected_items.append(scorer.tokenizer.decode(pair["input_ids_rejected"]))
        else:
            chosen.append(pair["prompt"] + pair["chosen"])
            rejected_items.append(pair["prompt"] + pair["rejected"])
    s_c = scorer.score_detailed(chosen, names=[f"{p['id']} (chosen)" for p in pairs])
    s_r = scorer.score_detailed(rejected_items, names=[f"{p['id']} (rejected)" for p in pairs])
    cut = [a or b for a, b in zip(s_c.truncated, s_r.truncated)]
    write_jsonl(output_path, ({"id": p["id"], "reward_chosen": c, "reward_rejected": r, "chosen_wins": c > r,
                               "truncated": t} for p, c, r, t in zip(pairs, s_c.rewards, s_r.rewards, cut)))
    return ScoreResult(metrics=pair_metrics(s_c.rewards, s_r.rewards, s_c.lengths, s_r.lengths), rejected=rejected,
                       output=Path(output_path), truncated=sum(cut), max_length=scorer.max_length)

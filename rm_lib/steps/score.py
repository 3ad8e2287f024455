"""score: every pair of a preference file (any supported format) -> rewards per row, accuracy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import formats, sources
from ..atomic import write_jsonl
from ..layout import Layout
from ..metrics import pair_metrics
from ..scoring import RewardScorer
from ..settings import Params


@dataclass
class ScoreResult:
    metrics: dict
    rejected: int
    output: Path

    def summary(self) -> str:
        m = self.metrics
        return (f"score: {m['pairs']} pairs ({self.rejected} rejected), accuracy {m['accuracy']:.4f} "
                f"(ties {m['tie_rate']:.4f}; longer wins {m['longer_wins_baseline']:.4f}) -> {self.output}")


def run_file(params: Params, layout: Layout, *, model: str | None, input_path: str, output_path: str) -> ScoreResult:
    scorer = RewardScorer(model or layout.model, batch_size=params.evaluate.batch_size)
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
    r_c, r_r = scorer.score(chosen), scorer.score(rejected_items)
    len_c = [len(scorer.encode(x)) for x in chosen]
    len_r = [len(scorer.encode(x)) for x in rejected_items]
    write_jsonl(output_path, ({"id": p["id"], "reward_chosen": c, "reward_rejected": r, "chosen_wins": c > r}
                              for p, c, r in zip(pairs, r_c, r_r)))
    return ScoreResult(metrics=pair_metrics(r_c, r_r, len_c, len_r), rejected=rejected, output=Path(output_path))

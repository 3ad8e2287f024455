"""Asset checks. Each check reads the files its asset wrote (rm_lib.layout paths); the logic is in
plain functions of a Layout so that tests can build failing inputs in a temporary folder.

Blocking checks (a failure stops everything downstream in the same run):
  raw_preferences.pairs_well_formed, reward_model.loss_is_finite, evaluation.release_gate.
"""
import json
import math
from pathlib import Path

import dagster as dg

from rm_lib.layout import SPLITS, Layout

from . import assets
from .assets import logged_losses
from .resources import ProjectResource, QualityResource

EXAMPLES = 5  # ids shown in a failed check's metadata


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _missing(path: Path) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description=f"{path} not found; materialize the asset first",
                               metadata={"missing": dg.MetadataValue.path(str(path))})


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


def _prompt_key(pair: dict) -> str | None:
    if "prompt" not in pair:  # pretokenized pairs carry no prompt to compare
        return None
    return json.dumps(pair["prompt"], sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------- raw_preferences

def pairs_well_formed(layout: Layout) -> dg.AssetCheckResult:
    """No written pair has an empty side or chosen identical to rejected (the normaliser must have
    rejected those with a reason)."""
    empty, identical, total = [], [], 0
    for split in SPLITS:
        path = layout.pairs / f"{split}.jsonl"
        if not path.exists():
            return _missing(path)
        for pair in _read_jsonl(path):
            total += 1
            if _empty_side(pair, "chosen") or _empty_side(pair, "rejected"):
                empty.append(f"{split}:{pair.get('id')}")
            elif _identical(pair):
                identical.append(f"{split}:{pair.get('id')}")
    passed = not empty and not identical
    return dg.AssetCheckResult(
        passed=passed,
        description=(f"all {total} pairs have two non-empty, different sides" if passed else
                     f"{len(empty)} pair(s) with an empty side and {len(identical)} with chosen == rejected "
                     "were written; the download step should have rejected them"),
        metadata={"pairs": total, "empty_side": len(empty), "identical": len(identical),
                  "examples": dg.MetadataValue.json((empty + identical)[:EXAMPLES])})


def no_prompt_overlap(layout: Layout) -> dg.AssetCheckResult:
    """No prompt is in both train and test (else the test accuracy measures memorisation)."""
    keys = {}
    for split in SPLITS:
        path = layout.pairs / f"{split}.jsonl"
        if not path.exists():
            return _missing(path)
        keys[split] = {k for k in map(_prompt_key, _read_jsonl(path)) if k is not None}
    shared = keys["train"] & keys["test"]
    return dg.AssetCheckResult(
        passed=not shared,
        severity=dg.AssetCheckSeverity.WARN,
        description=("no prompt is in both train and test" if not shared else
                     f"{len(shared)} prompt(s) are in both train and test; with the source's own test split "
                     "(download.test_split) this comes from the source, else it is a bug of the split"),
        metadata={"train_prompts": len(keys["train"]), "test_prompts": len(keys["test"]),
                  "shared_prompts": len(shared),
                  "examples": dg.MetadataValue.json(sorted(shared)[:EXAMPLES])})


def rejects_ratio(layout: Layout, max_ratio: float) -> dg.AssetCheckResult:
    """The share of source rows the download step rejected stays below `max_ratio`."""
    path = layout.pairs / "manifest.json"
    if not path.exists():
        return _missing(path)
    manifest = _read_json(path)
    reasons = manifest.get("rejects_by_reason", {})
    rejected = int(manifest.get("rejected", sum(reasons.values())))
    rows = int(manifest.get("rows_read", 0))
    ratio = rejected / rows if rows else 1.0
    passed = ratio <= max_ratio
    return dg.AssetCheckResult(
        passed=passed,
        description=(f"{rejected} of {rows} rows rejected ({ratio:.1%}, limit {max_ratio:.1%})"
                     + ("" if passed else "; see data/pairs/rejects.jsonl for the rows and reasons")),
        metadata={"rows_read": rows, "rejected": rejected, "reject_ratio": ratio, "max_reject_ratio": max_ratio,
                  "rejects_by_reason": dg.MetadataValue.json(reasons)})


# ---------------------------------------------------------------- reward_model

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def loss_is_finite(layout: Layout) -> dg.AssetCheckResult:
    """Training logged at least one loss and every logged loss (and the final one) is finite."""
    path = layout.train_logs / "summary.json"
    if not path.exists():
        return _missing(path)
    summary = _read_json(path)  # json reads the NaN/Infinity that rm_lib writes for a lost loss
    steps = int(summary.get("steps") or 0)
    final = summary.get("final_loss")
    logged = logged_losses(layout)
    note = ""
    if not _finite(final) and summary.get("resumed_from") == steps and logged:
        # A re-run that found the final checkpoint trains no step and writes final_loss NaN
        # (rm_lib's summary has no history then); the losses logged by the run that did train count.
        final, note = logged[-1], f" (resumed at the final step {steps}: last logged loss)"
    bad = [v for v in logged if not _finite(v)]
    passed = _finite(final) and not bad and steps > 0
    if passed:
        description = f"final loss {final:.4f} after {steps} steps{note}; all {len(logged)} logged losses finite"
    else:
        description = (f"final loss {final}, {len(bad)} of {len(logged)} logged losses not finite, {steps} steps: "
                       "training diverged or never logged; lower train.learning_rate or check the data")
    return dg.AssetCheckResult(
        passed=passed, description=description,
        metadata={"final_loss": str(final), "steps": steps, "resumed_from": str(summary.get("resumed_from")),
                  "logged_losses": len(logged), "non_finite_losses": len(bad)})


# ---------------------------------------------------------------- evaluation

def beats_length_baseline(layout: Layout) -> dg.AssetCheckResult:
    """The model's accuracy is above the better length heuristic (always pick the longer, or always
    the shorter answer); a model at or below it has learned nothing but length."""
    path = layout.evaluation / "report.json"
    if not path.exists():
        return _missing(path)
    report = _read_json(path)
    accuracy = report["accuracy"]
    baseline = max(report["longer_wins_baseline"], report["shorter_wins_baseline"])
    passed = accuracy > baseline
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"accuracy {accuracy:.4f} {'>' if passed else '<='} length baseline {baseline:.4f}",
        metadata={"accuracy": accuracy, "length_baseline": baseline,
                  "longer_wins_baseline": report["longer_wins_baseline"],
                  "shorter_wins_baseline": report["shorter_wins_baseline"], "margin": accuracy - baseline})


def release_gate(layout: Layout, min_accuracy: float, compare_with_release: bool = True) -> dg.AssetCheckResult:
    """Publish only a model with accuracy >= min_accuracy and not below the last published model
    (data/release/evaluation.json, written by the previous hub_release)."""
    path = layout.evaluation / "report.json"
    if not path.exists():
        return _missing(path)
    report = _read_json(path)
    accuracy = report["accuracy"]
    reasons = []
    if accuracy < min_accuracy:
        reasons.append(f"accuracy {accuracy:.4f} is below the minimum {min_accuracy:.4f}")
    metadata = {"accuracy": accuracy, "min_accuracy": min_accuracy, "previous_release_accuracy": "none"}
    previous_path = layout.release / "evaluation.json"
    previous_accuracy = None
    if compare_with_release and previous_path.exists():
        previous = _read_json(previous_path)
        previous_accuracy = previous.get("accuracy")
        same_data = previous.get("data_hash") == report.get("data_hash")
        metadata.update({"previous_release_accuracy": previous_accuracy, "same_test_data_as_previous": same_data})
        if isinstance(previous_accuracy, (int, float)) and accuracy < previous_accuracy:
            reasons.append(f"accuracy {accuracy:.4f} is below the last published model's {previous_accuracy:.4f}"
                           + ("" if same_data else " (measured on other test data; set the quality resource's "
                                                   "compare_with_release=false to publish anyway)"))
    if reasons:
        description = "release blocked: " + "; ".join(reasons)
    else:
        description = f"release gate passed: accuracy {accuracy:.4f} >= minimum {min_accuracy:.4f}"
        if isinstance(previous_accuracy, (int, float)):
            description += f" and >= the last published model's {previous_accuracy:.4f}"
    return dg.AssetCheckResult(passed=not reasons, description=description, metadata=metadata)


# ---------------------------------------------------------------- the Dagster checks

@dg.asset_check(asset=assets.raw_preferences, name="pairs_well_formed", blocking=True,
                description="No written pair has an empty side or chosen == rejected. Blocking.")
def raw_pairs_well_formed(project: ProjectResource) -> dg.AssetCheckResult:
    return pairs_well_formed(project.layout())


@dg.asset_check(asset=assets.raw_preferences, name="no_prompt_overlap",
                description="No prompt is in both the train and the test split.")
def raw_no_prompt_overlap(project: ProjectResource) -> dg.AssetCheckResult:
    return no_prompt_overlap(project.layout())


@dg.asset_check(asset=assets.raw_preferences, name="rejects_ratio",
                description="The share of rejected source rows is at most quality.max_reject_ratio.")
def raw_rejects_ratio(project: ProjectResource, quality: QualityResource) -> dg.AssetCheckResult:
    return rejects_ratio(project.layout(), quality.max_reject_ratio)


@dg.asset_check(asset=assets.reward_model, name="loss_is_finite", blocking=True,
                description="Training logged finite losses (data/train/summary.json, metrics.jsonl). Blocking.")
def model_loss_is_finite(project: ProjectResource) -> dg.AssetCheckResult:
    return loss_is_finite(project.layout())


@dg.asset_check(asset=assets.evaluation, name="beats_length_baseline",
                description="Test accuracy is above max(longer-wins, shorter-wins) baselines.")
def evaluation_beats_length_baseline(project: ProjectResource) -> dg.AssetCheckResult:
    return beats_length_baseline(project.layout())


@dg.asset_check(asset=assets.evaluation, name="release_gate", blocking=True,
                description="Quality gate before hub_release: accuracy >= quality.min_accuracy and not below "
                            "the last published model. Blocking: hub_release does not run when it fails.")
def evaluation_release_gate(project: ProjectResource, quality: QualityResource) -> dg.AssetCheckResult:
    return release_gate(project.layout(), quality.min_accuracy, quality.compare_with_release)


CHECKS = [raw_pairs_well_formed, raw_no_prompt_overlap, raw_rejects_ratio, model_loss_is_finite,
          evaluation_beats_length_baseline, evaluation_release_gate]

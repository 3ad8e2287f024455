"""evaluate: the trained model on the held-out pairs -> report JSON, pictures, scored pairs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rm_lib.data import trained_prompts
from rm_lib.data.tokenstore import IDS_ONLY, read_rows, token_length
from rm_lib.errors import UserError
from rm_lib.evaluation import consistency, plots, quality, suites
from rm_lib.evaluation.metrics import pair_metrics, set_aside_by_filter, subset_accuracy
from rm_lib.evaluation.visualize import one_line, visualize_samples
from rm_lib.files import atomic_dir, read_json, write_json, write_jsonl
from rm_lib.layout import Layout
from rm_lib.model.inference import score_pairs
from rm_lib.model.modeling import TRAINED, load_reward_model, load_tokenizer
from rm_lib.pipeline import chain
from rm_lib.pipeline.code_version import write_code_record
from rm_lib.settings import Params


@dataclass
class EvaluateResult:
    metrics: dict
    report: Path
    output_dir: Path
    inputs: dict[str, str]  # the content hash of the model scored
    settings: dict = field(default_factory=dict)  # the evaluate settings the figures were made with

    def report_record(self) -> dict:
        """report.json: every figure, which model they are of, and the settings they were made with."""
        return {**self.metrics, "inputs": self.inputs, "settings": self.settings}

    def metrics_record(self) -> dict[str, float]:
        """metrics.json: the numbers `dvc metrics` and `dvc exp show` read."""
        return numeric_metrics(self.metrics)

    def summary(self) -> str:
        m = self.metrics
        subsets = suites.subset_phrase(m.get("per_subset", {}))
        demo = ("\n  (demo data: synthetic reviews, 10% of the labels flipped; this accuracy says the pipeline "
                "learns, not how good a reward model is)" if m.get("demo_data") else "")
        return (f"evaluate: {m['pairs']} pairs{_of_held_out(m)}, accuracy {m['accuracy']:.4f} "
                f"(ties {m['tie_rate']:.4f}; "
                f"longer wins {m['longer_wins_baseline']:.4f}, shorter wins {m['shorter_wins_baseline']:.4f}"
                f"{subsets}), loss {m['loss']:.4f}\n  length: prefers the longer answer {_fmt(m['prefers_longer'])}, "
                f"reward-length correlation {_fmt(m['reward_length_correlation'], '+.3f')}; "
                f"calibration error (ECE) {m['calibration_ece']:.4f} -> {self.report}{demo}"
                + suites.summary_lines(m.get("suites", {})) + _inconsistent(m.get("consistency") or {})
                + _seen_line(m.get(trained_prompts.SEEN) or {}))


def _of_held_out(metrics: dict) -> str:
    """' of 390 held out (253 set aside: prompt_too_long: 207, ...)', where any were (by the filter, or by
    tokenize: a pair the chat template refused)."""
    aside = set_aside_by_filter(metrics)
    return "" if aside is None else f" of {aside[0]} held out ({aside[1]} set aside: {aside[2]})"


def _seen_line(seen: dict) -> str:
    """Warning lines where held-out pairs ask prompts a base model trained on, or where a base keeps no
    record of its prompts."""
    lines = ""
    if seen.get("base"):
        lines += (f"\n  warning: {seen['base']} of {seen['pairs']} held-out pairs ask a prompt a base model trained "
                  f"on: their accuracy is partly memory (accuracy on the others {_fmt(seen.get('accuracy_unseen'))}; "
                  "push checks the share against push.max_test_seen_by_base)")
    if seen.get("unrecorded_bases"):
        lines += (f"\n  note: {', '.join(seen['unrecorded_bases'])} keeps no record of the prompts it trained on: "
                  "which held-out pairs ask one of them cannot be told")
    return lines


def _inconsistent(result: dict) -> str:
    """A warning line where a way of scoring the model disagrees with the evaluation's own scores."""
    if not result.get("failed"):
        return ""
    paths = ", ".join(f"{p} (by up to {result['max_abs_diff'][p]:.3g})" for p in result["failed"])
    hint = f"; {result['hint']}" if result.get("hint") else ""
    return (f"\n  warning: score consistency: {paths} gave other rewards than the evaluation's padded batches "
            f"(tolerance {result['tolerance']:g}){hint}; the model card lists them")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "undefined" if value is None else format(value, spec)


def evaluate_folder(model_dir: Path, rows: list[dict], batch_size: int, buckets: int) -> tuple[dict, list, list]:
    import torch

    tokenizer = load_tokenizer(str(model_dir), setting=TRAINED)
    model = load_reward_model(str(model_dir), trained=True, pad_token_id=tokenizer.pad_token_id, setting=TRAINED)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    r_c, r_r = score_pairs(model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size)
    metrics = pair_metrics(r_c, r_r, [token_length(r, "chosen") for r in rows],
                           [token_length(r, "rejected") for r in rows], buckets=buckets)
    return metrics, r_c, r_r


def held_out(filter_manifest: dict) -> dict:
    """The held-out pairs the figures are of, against those the filter had: a filter that set many
    aside (long prompts) leaves an accuracy of the short pairs only, and the reader must see that."""
    dropped = (filter_manifest.get("dropped_by_reason") or {}).get("test") or {}
    kept = (filter_manifest.get("kept") or {}).get("test", 0)
    return {"pairs_before_filter": kept + sum(dropped.values()), "set_aside_by_filter": dict(sorted(dropped.items())),
            "truncated_by_filter": (filter_manifest.get("truncated") or {}).get("test", 0),
            "filter_policy": filter_manifest.get("policy")}


def seen_in_training(rows: list[dict], r_c: list[float], r_r: list[float], trained: dict | None) -> dict:
    """report.json's `seen_in_training`: how many held-out pairs ask a prompt the model trained on (its own
    training pairs, or a base model's: trained_prompts.overlap), the accuracy on the others, and the
    first of those pairs by id."""
    found = trained_prompts.overlap([r.get("prompt_digest") for r in rows], trained)
    seen = found.pop("seen_rows", [])
    if seen:
        marked = set(seen)
        split = subset_accuracy(r_c, r_r, ["seen" if i in marked else "unseen" for i in range(len(rows))])
        found["accuracy_seen"] = split["seen"]["accuracy"]
        found["accuracy_unseen"] = split["unseen"]["accuracy"] if "unseen" in split else None
        found["examples"] = [rows[i]["id"] for i in seen[:quality.EXAMPLES]]
    return found


def source_identity(source: str, layout: Layout) -> str:
    """The source as the release gate tells sources apart: a Hub id or `demo` as it is, a local file or
    folder by its name. Its full path would differ in every clone of the project and with every way of
    writing it (relative, absolute), and a release compared with nothing is worse than two files of one
    name compared by their test pairs."""
    kind = read_json(layout.pairs / "manifest.json").get("kind")
    local = kind == "local" or (kind is None and source.startswith(("/", ".", "~")))
    return Path(source).name if local else source


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json for `dvc metrics` / `dvc exp show`: numbers only, subsets flattened to accuracy_<name>."""
    flat = {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # a control character from the data is no key part; two names alike without them keep a key each
    subsets = list(metrics.get("per_subset", {}).items())
    for key, (_, entry) in zip(suites.unique_names([one_line(str(name)) for name, _ in subsets]), subsets):
        flat["accuracy_" + key] = entry["accuracy"]
    flat.update(suites.flat_metrics(metrics.get("suites", {})))  # suite_<name>[__<subset>]_accuracy
    worst = consistency.worst_difference(metrics.get("consistency") or {})
    if worst is not None:
        flat["consistency_max_abs_diff"] = worst
    if metrics.get("held_out"):
        flat["pairs_before_filter"] = metrics["held_out"]["pairs_before_filter"]
    seen = metrics.get(trained_prompts.SEEN) or {}
    if seen.get("checked"):
        flat["test_pairs_seen_by_base"] = seen["base"]
    return flat


def run(params: Params, layout: Layout) -> EvaluateResult:
    cfg = params.evaluate
    meta = read_json(layout.filtered / "manifest.json")
    download = chain.download_settings(layout)  # the held-out pairs' source, read with them
    identity = source_identity(download["source"], layout)
    rows = read_rows(layout.filtered / "test.parquet", columns=IDS_ONLY)
    if not (layout.model / "config.json").exists():
        read_json(layout.model / "config.json")  # raises the "run train first" error
    scored = chain.inputs(layout, "model")  # the model about to be scored, before it is read
    metrics, r_c, r_r = evaluate_folder(layout.model, rows, cfg.batch_size, cfg.length_buckets)
    metrics["data_hash"] = meta["content_hash"]
    metrics["held_out"] = held_out(meta)
    metrics[trained_prompts.SEEN] = seen_in_training(rows, r_c, r_r, trained_prompts.read(layout.model))
    per_subset = subset_accuracy(r_c, r_r, [r.get("subset") for r in rows])
    if per_subset:
        metrics["per_subset"] = per_subset
    set_aside = []  # suite rows that could not be scored: written beside the report, with their reasons
    if cfg.suites:  # extra labelled sets (RewardBench 1/2, local files), scored through the scoring API
        metrics["suites"] = suites.evaluate_suites(cfg.suites, layout.model, batch_size=cfg.batch_size,
                                                     sources=layout.sources)
        for name, entry in metrics["suites"].items():
            set_aside += [{"suite": name, **record} for record in entry.pop(suites.SET_ASIDE)]
    source = download["source"]
    metrics["data_source"], metrics["demo_data"] = source, source == "demo"
    metrics[quality.TEST_DATA] = quality.test_data_record(identity, download.get("subset"), rows,
                                                          [c > r for c, r in zip(r_c, r_r)])  # a tie: wrong
    tokenizer = load_tokenizer(str(layout.model), setting=TRAINED)
    # The same texts scored every way the model is used (batch size 1, left padding, packed, pipeline).
    metrics["consistency"] = consistency.check(layout.model, rows, pad_token_id=tokenizer.pad_token_id,
                                               tokenizer=tokenizer)
    samples = [{"id": rows[i]["id"], "reward_chosen": r_c[i], "reward_rejected": r_r[i],
                "chosen_text": tokenizer.decode(rows[i]["input_ids_chosen"][-80:], skip_special_tokens=True),
                "rejected_text": tokenizer.decode(rows[i]["input_ids_rejected"][-80:], skip_special_tokens=True)}
               for i in range(min(cfg.num_print_samples, len(rows)))]
    if chain.inputs(layout, "model") != scored:  # the figures would be of no one model
        raise UserError(f"evaluate: {layout.model} was replaced while it was scored (a train finished meanwhile, "
                        "on another machine sharing the folder, or a `dvc checkout` or `dvc pull` there); the last "
                        "report is kept. Run evaluate again")
    result = EvaluateResult(metrics=metrics, report=layout.evaluation / "report.json", output_dir=layout.evaluation,
                            inputs=scored, settings=asdict(params.evaluate))
    with atomic_dir(layout.evaluation) as out:
        write_json(out / "metrics.json", result.metrics_record())
        write_json(out / "report.json", result.report_record())
        write_jsonl(out / "scores.jsonl", ({"id": r["id"], "reward_chosen": c, "reward_rejected": j}
                                           for r, c, j in zip(rows, r_c, r_r)))
        write_jsonl(out / "buckets.jsonl", metrics["per_length_bucket"])
        write_jsonl(out / "suites.rejects.jsonl", set_aside)  # empty when none: DVC versions it either way
        write_json(out / "buckets.plot.json", metrics["per_length_bucket"])  # `dvc plots` reads no JSON Lines
        write_code_record(out, "evaluate")  # the card's figures are this code's: push compares it with the checkout
        plots.reward_distributions(r_c, r_r, out / "rewards.png")
        plots.reward_vs_length([token_length(r, "chosen") for r in rows], r_c,
                               [token_length(r, "rejected") for r in rows], r_r,
                               metrics["reward_length_correlation"], out / "reward_vs_length.png")
        buckets = metrics["per_length_bucket"]
        plots.bucket_accuracy([b["range"] for b in buckets], [b["accuracy"] for b in buckets],
                              [b["longer_wins"] for b in buckets], [b["shorter_wins"] for b in buckets],
                              out / "accuracy_by_length.png")
    print(visualize_samples(samples, limit=cfg.num_print_samples))
    return result

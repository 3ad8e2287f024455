"""train: filtered token ids -> a one-output reward model in models/reward_model."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rm_lib.data import tokenization, trained_prompts
from rm_lib.data.length_filter import LENGTH_SETTINGS
from rm_lib.data.tokenstore import IDS_ONLY, read_rows, token_length
from rm_lib.errors import DataError, SettingsError, TrainingDiverged
from rm_lib.evaluation import plots
from rm_lib.evaluation.metrics import pair_metrics
from rm_lib.evaluation.scoring import local_training_record
from rm_lib.files import atomic_dirs, read_json, read_jsonl, write_json, write_jsonl
from rm_lib.layout import Layout
from rm_lib.model.inference import score_pairs_across
from rm_lib.model.modeling import (
    add_lora,
    base_identity,
    base_model_reference,
    check_max_token_length,
    load_reward_model,
    load_tokenizer,
    resolve_model_path,
    save_model,
)
from rm_lib.model.special import special_tokens
from rm_lib.pipeline import preflight
from rm_lib.pipeline.chain import file_record, model_files_differ
from rm_lib.pipeline.code_version import code_hash
from rm_lib.settings import Params, TrainSettings
from rm_lib.steps import launched_on_cpu
from rm_lib.training.checkpoints import check_launch, read_state, step_folders
from rm_lib.training.distributed import (
    Launch,
    agreed,
    check_distributed,
    check_same_run,
    gathered_state_dict,
    launch_of,
)
from rm_lib.training.tracking import Tracker, wandb_dir
from rm_lib.training.trainer import FitResult, fingerprint_parts, fit, mixed_precision, run_fingerprint

NORMALISATION_SAMPLE = 1000


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    final_accuracy: float
    tokens_per_s: float
    wall_s: float
    model_dir: Path
    resumed_from: int | None
    reward_mean: float | None  # None: not computed (run's reward_stats=False)
    reward_std: float | None
    wandb_url: str | None
    reused: bool = False  # the run had finished: nothing trained, the figures are those of the run that trained
    fingerprint: str = ""
    data_hash: str = ""
    code_hash: str = ""
    base_content: str = ""  # the base model's content (modeling.base_identity), part of the fingerprint
    model_settings: dict = field(default_factory=dict)
    train_settings: dict = field(default_factory=dict)
    best_checkpoint: str | None = None
    best_eval_accuracy: float | None = None
    processes: int = 1
    fsdp: bool = False  # with `processes`, the launch that trained it (distributed.Launch)
    launch: str = "1 process"  # that launch in words, and the command that trains the model again so
    launch_command: str = "python -m rm_lib run"
    device_plan: dict | None = None  # how the run used its device (rm_lib.training.device_plan)
    sessions: list[dict] = field(default_factory=list)  # the calls that trained it, where resumed with other settings

    def run_record(self) -> dict:
        """run.json: what the model is (settings, data, code, outcome), no timings, so that what depends
        on it (the push stage, the model card) changes only when the model does."""
        return {"steps": self.steps, "final_loss": self.final_loss, "final_accuracy": self.final_accuracy,
                "fingerprint": self.fingerprint, "data_hash": self.data_hash, "code_hash": self.code_hash,
                "base_content": self.base_content, "model": self.model_settings, "train": self.train_settings}

    def summary_record(self) -> dict:
        """summary.json: the run record with its timings and where things are."""
        return {"steps": self.steps, "final_loss": self.final_loss, "final_accuracy": self.final_accuracy,
                "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s, "resumed_from": self.resumed_from,
                "reused": self.reused, "best_checkpoint": self.best_checkpoint,
                "best_eval_accuracy": self.best_eval_accuracy, "reward_mean": self.reward_mean,
                "reward_std": self.reward_std, "model": self.model_settings.get("name_or_path"),
                "processes": self.processes, "fsdp": self.fsdp, "launch": self.launch,
                "launch_command": self.launch_command,
                "fingerprint": self.fingerprint, "data_hash": self.data_hash,
                "code_hash": self.code_hash, "base_content": self.base_content, "wandb": self.wandb_url,
                "train": self.train_settings,
                "device_plan": self.device_plan, "sessions": self.sessions}

    def summary(self) -> str:
        figures = (f"last loss {self.final_loss:.4f}, batch accuracy {self.final_accuracy:.3f}, "
                   f"{self.tokens_per_s:.0f} tokens/s, {self.wall_s:.1f}s")
        if self.reused:
            return f"train: already trained at step {self.steps}; reused (as trained: {figures}) -> {self.model_dir}"
        resumed = f" (resumed from step {self.resumed_from})" if self.resumed_from else ""
        return f"train: {self.steps} steps{resumed}, {figures} -> {self.model_dir}"


def new_accelerator(precision: str) -> Any:
    """The run's Accelerator. accelerate keeps one mixed precision per process and refuses another;
    a second run in one process (a notebook, Dagster's in-process executor) that trains in another
    precision starts accelerate's state afresh instead. Never under a launcher: its processes share
    that state (and the process group) with the run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state  # empty until a first Accelerator in this process
    if shared and shared.get("_mixed_precision") != precision and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision, cpu=launched_on_cpu())


def trained_with(cfg: TrainSettings, result: FitResult, recorded: dict | None = None) -> tuple[dict, dict | None]:
    """The train settings and device plan of the model: a run reused as it was finished keeps the settings
    outside its fingerprint (attention, logging, forward budget...) and the plan its last session trained
    with, not this call's; a checkpoint saved before sessions were kept, those its summary.json recorded
    (`recorded`, of the same fingerprint)."""
    if not result.reused:
        return asdict(cfg), result.device_plan
    if result.sessions:
        return {**asdict(cfg), **result.sessions[-1]["train"]}, result.device_plan
    if recorded is not None:
        return recorded.get("train") or asdict(cfg), recorded.get("device_plan")
    return asdict(cfg), result.device_plan


def base_reward_model(name_or_path: str) -> dict | None:
    """Where a base model that is itself a reward model this project trained (a local folder with an
    rm_lib.json: its model folder or release) came from, as that record says: a model trained on from it
    names it in its own record and card. None for any other base."""
    saved = local_training_record(name_or_path)
    return {k: saved.get(k) for k in ("base_model", "data_hash", "content_hash", "fingerprint")} if saved else None


def base_prompts(params: Params, model: Any) -> dict | None:
    """The training prompts of the base (trained_prompts.base_record), read before the run: a damaged
    record stops it now, not after the training. A base is a reward model of this project where its folder
    holds an rm_lib.json, or its config names a run of this project."""
    name = params.model.name_or_path
    folder = Path(resolve_model_path(name))
    # a copy saved with save_pretrained keeps the config's fingerprint, not rm_lib.json
    ours = getattr(model.config, "rm_lib_fingerprint", None) is not None
    if folder.is_dir():
        return trained_prompts.base_record(name, folder, ours or bool(local_training_record(name)))
    return trained_prompts.base_record(name, None, ours, revision=params.model.revision)


def _summary_of(layout: Layout, fingerprint: str) -> dict | None:
    """data/train/summary.json where it is of the run `fingerprint`; None where it is damaged (this run
    writes it again)."""
    path = layout.train_logs / "summary.json"
    try:
        summary = read_json(path) if path.exists() else None
    except DataError:
        return None
    return summary if isinstance(summary, dict) and summary.get("fingerprint") == fingerprint else None


LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def _intact(layout: Layout, fingerprint: str) -> dict | None:
    """The summary of the run `fingerprint` where it finished here and its model and every record of it are in
    place, as train wrote them; else None."""
    summary = _summary_of(layout, fingerprint)
    try:
        record = read_json(layout.model / "rm_lib.json") if (layout.model / "rm_lib.json").is_file() else None
    except DataError:
        return None
    records = [layout.train_logs / name for name in ("run.json", "metrics.jsonl", "metrics.plot.json", "loss.png")]
    # a benchmark's run (bench_train.py) saved no reward statistics: the pipeline's trains again for them
    if (summary is None or summary.get("reward_mean") is None or not isinstance(record, dict)
            or record.get("fingerprint") != fingerprint
            or not all(path.is_file() for path in records) or model_files_differ(layout.model, record)):
        return None
    return summary


def _finished_without_checkpoint(layout: Layout, fingerprint: str) -> str | None:
    """Where this run finished here, no checkpoint of it is here (none came with a `git clone` + `dvc pull`, or
    another run's replaced them: a try of other settings, stopped after its first checkpoint), and its model
    and records are intact: a sentence saying they are reused as they are, else None. It trained again from
    step 0, for the same weights, hours later."""
    checkpoints = step_folders(layout.checkpoints) if layout.checkpoints.is_dir() else []
    if any((read_state(c) or {}).get("fingerprint") == fingerprint for c in checkpoints):
        return None  # resumed or reused from its checkpoint, as fit does it
    summary = _intact(layout, fingerprint)
    if summary is None:
        return None
    return (f"already trained at step {summary.get('steps')}; reused {layout.model} (no checkpoint of this run is "
            "here: none was pulled, or another run's replaced them; its model and records are intact)")


def _as_the_first_process_has_it(accelerator: Any, value: Any) -> Any:
    """`value` as the first process has it, on every process (a collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def result_from_summary(layout: Layout) -> TrainResult:
    """The result of a training run that another process made, read back from its summary.json."""
    summary = read_json(layout.train_logs / "summary.json")
    model = read_json(layout.train_logs / "run.json")["model"]
    return TrainResult(steps=summary["steps"], final_loss=summary["final_loss"],
                       final_accuracy=summary["final_accuracy"], tokens_per_s=summary["tokens_per_s"],
                       wall_s=summary["wall_s"], model_dir=layout.model, resumed_from=summary["resumed_from"],
                       reward_mean=summary["reward_mean"], reward_std=summary["reward_std"],
                       wandb_url=summary["wandb"], reused=summary.get("reused", False),
                       fingerprint=summary["fingerprint"], data_hash=summary["data_hash"],
                       code_hash=summary["code_hash"], base_content=summary.get("base_content", ""),
                       model_settings=model, train_settings=summary["train"],
                       best_checkpoint=summary["best_checkpoint"], best_eval_accuracy=summary["best_eval_accuracy"],
                       processes=summary["processes"], fsdp=summary.get("fsdp", False),
                       launch=summary.get("launch", ""), launch_command=summary.get("launch_command", ""),
                       device_plan=summary.get("device_plan"),
                       sessions=summary.get("sessions", []))


def check_finite_rewards(rewards: list[float], step: int) -> None:
    """The loss the loop checks is that of the weights before their last update: an update that makes
    them NaN or infinite shows first in the rewards they give, which no metric or saved model should carry."""
    bad = next((r for r in rewards if not math.isfinite(r)), None)
    if bad is not None:
        raise TrainingDiverged(f"train: the weights became non-finite at step {step} (a reward of {bad}), though "
                               "the loss before that update was finite; lower train.learning_rate (a run with "
                               "other settings trains afresh). The model was not saved")


def run(params: Params, layout: Layout, accelerator=None,
        on_log: Callable[[dict], None] | None = None, *, final_checkpoint: bool = True,
        reward_stats: bool = True) -> TrainResult:
    """`on_log` receives every metrics record as it is logged (main process only). For benchmarks, whose
    runs are never resumed nor their rewards normalised: `final_checkpoint=False` saves no checkpoint at
    the last step (`fit`), `reward_stats=False` scores no training pairs for the normalisation stats
    (the model's config and the summary then hold none, and the last update's weights go unchecked for
    non-finite rewards). The pipeline keeps both."""
    cfg = params.train
    tracker = Tracker(layout.live_log, project=cfg.wandb_project, mode=cfg.wandb_mode,
                      config=params.as_dict(), run_dir=wandb_dir(layout.root), on_log=on_log)
    tracker.check()
    meta = read_json(layout.filtered / "manifest.json")
    tokenized = read_json(layout.tokenized / "manifest.json")  # its template, as the filtered ids were made
    # the processes agree on the run before any of them can stop alone (a check below that only one
    # fails would leave the others waiting at the first collective until the timeout)
    accelerator = accelerator or new_accelerator(mixed_precision(cfg.mixed_precision))
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # accelerate would train in fp32
        raise SettingsError(preflight.FP16_ON_CPU)
    check_distributed(accelerator)
    idle = [f"train.{k}" for k in LORA_KEYS if getattr(cfg, k) != getattr(TrainSettings, k)] if not cfg.lora else []
    if idle:  # a TRL user's peft settings without use_peft: said, not silently ignored
        accelerator.print(f"train: note: {', '.join(idle)} set, but train.lora is false: the whole model trains and "
                          "they do nothing (train.lora=true trains LoRA adapters)")
    # The code is part of the run: a change to the training code starts a new run, never a resume.
    code = code_hash("train")
    check_same_run(accelerator, {"train": asdict(cfg), "model": asdict(params.model),
                                 "evaluate": asdict(params.evaluate), "filtered data": meta["content_hash"],
                                 "training code": code})
    train_rows = read_rows(layout.filtered / "train.parquet", columns=IDS_ONLY)
    eval_rows = read_rows(layout.filtered / "test.parquet", columns=IDS_ONLY)
    # pairs filtered for a longer model (or before this check) would index past the position table
    longest = max((len(r[f"input_ids_{side}"]) for r in train_rows + eval_rows for side in ("chosen", "rejected")),
                  default=0)
    check_max_token_length(longest, params.model.name_or_path, revision=params.model.revision,
                           trust_remote_code=params.model.trust_remote_code, kept=" (the longest filtered sequence)")
    tokenizer = load_tokenizer(params.model.name_or_path, revision=params.model.revision,
                               trust_remote_code=params.model.trust_remote_code)
    pad_id = meta["pad_token_id"] if meta.get("pad_token_id") is not None else tokenizer.pad_token_id
    launch = launch_of(accelerator)

    # the base as it is now, not its name alone: a finished run of a base since changed is not reused. Read by
    # the first process, once: the processes' fingerprints must agree, and each reading every weight file costs
    base = _as_the_first_process_has_it(
        accelerator, base_identity(params.model.name_or_path, revision=params.model.revision)
        if accelerator.is_main_process else None)

    def fingerprint_of(other: Launch) -> str:
        return run_fingerprint(cfg, params.model, meta["content_hash"], code, other.processes, other.fsdp, base)

    fingerprint = fingerprint_of(launch)
    # judged by each process on its own disk (checkpoints may be local to each machine), refused by all
    agreed(accelerator, lambda: check_launch(layout.checkpoints, fingerprint, launch, fingerprint_of))
    finished = _as_the_first_process_has_it(
        accelerator, _finished_without_checkpoint(layout, fingerprint) if accelerator.is_main_process else None)
    if finished is not None:
        accelerator.print(f"train: {finished}")
        return replace(result_from_summary(layout), reused=True)
    import torch
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # before the model: its new score head is drawn at random
    # fp32 weights whatever the checkpoint holds (transformers loads a bf16 checkpoint as bf16): AdamW's small
    # updates would round away in bf16 weights; mixed precision is accelerate's autocast around them. LoRA
    # keeps the checkpoint's dtype: its base weights are frozen, and PEFT keeps the adapters in fp32.
    model = load_reward_model(params.model.name_or_path, revision=params.model.revision,
                              trust_remote_code=params.model.trust_remote_code, pad_token_id=pad_id,
                              dtype=None if cfg.lora else torch.float32)
    base_trained = base_prompts(params, model)
    if cfg.lora:
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_target_modules,
                         base_model=base_model_reference(params.model.name_or_path), revision=params.model.revision)
    os.environ.setdefault("WANDB_SILENT", "true")

    def on_eval(model, step: int) -> dict:
        r_c, r_r = score_pairs_across(accelerator, model, eval_rows, pad_token_id=pad_id,
                                      batch_size=params.evaluate.batch_size)
        check_finite_rewards(r_c + r_r, step)
        # lengths before the filter's cut, as evaluate measures them: its baselines and length figures
        result = pair_metrics(r_c, r_r, [token_length(r, "chosen") for r in eval_rows],
                              [token_length(r, "rejected") for r in eval_rows], buckets=1)
        samples = [{"id": eval_rows[i]["id"], "reward_chosen": r_c[i], "reward_rejected": r_r[i],
                    "chosen_text": tokenizer.decode(eval_rows[i]["input_ids_chosen"][-60:]),
                    "rejected_text": tokenizer.decode(eval_rows[i]["input_ids_rejected"][-60:])}
                   for i in range(min(cfg.num_print_samples, len(eval_rows)))]
        if accelerator.is_main_process:
            from rm_lib.evaluation.visualize import visualize_samples

            accelerator.print(f"\neval at step {step}: accuracy {result['accuracy']:.3f} (longer wins "
                              f"{result['longer_wins_baseline']:.3f})\n" + visualize_samples(samples))
            tracker.table("eval_samples", samples, step)
        return result

    try:
        result = fit(cfg, model, train_rows, pad_token_id=pad_id, checkpoints=layout.checkpoints,
                     fingerprint=fingerprint, accelerator=accelerator, tracker=tracker, on_eval=on_eval,
                     final_checkpoint=final_checkpoint,
                     made_of=fingerprint_parts(cfg, params.model, meta["content_hash"], code, launch.processes,
                                               launch.fsdp, base))
        stats = {"reward_mean": None, "reward_std": None}
        # the first process's reading: it may replace data/train while another still looks, and one branch
        # below scores across every process
        earlier = _as_the_first_process_has_it(
            accelerator, _summary_of(layout, fingerprint) if result.reused and accelerator.is_main_process else None)
        if reward_stats and earlier and earlier.get("reward_mean") is not None:
            # the finished run's own, from the same weights: scoring them again took minutes at real lengths
            stats = {k: earlier[k] for k in stats}
        elif reward_stats:  # reward normalisation stats, saved in the model's config for downstream RLHF
            sample = train_rows[:NORMALISATION_SAMPLE]
            # LoRA: of the adapters on the base, which the saved model (merged in fp32) gives to rounding; a
            # merged copy on the device would need room the device plan did not count
            r_c, r_r = score_pairs_across(accelerator, result.prepared, sample, pad_token_id=pad_id,
                                          batch_size=params.evaluate.batch_size)
            check_finite_rewards(r_c + r_r, result.steps)
            stats = pair_metrics(r_c, r_r, [1] * len(sample), [1] * len(sample), buckets=1)
        gathered = gathered_state_dict(accelerator, result.prepared)
        model = accelerator.unwrap_model(model)
    finally:
        if accelerator.is_main_process:
            tracker.finish()
    # The live log holds the whole run, also when this call resumed late or had nothing left to do.
    records = read_jsonl(layout.live_log) if layout.live_log.exists() else []
    logged = [r for r in records if "loss" in r]
    history = logged or result.history
    # The run's own last record (kept in its checkpoint), also when this call reused a finished run.
    last = result.last_log or (history[-1] if history else {"loss": float("nan"), "accuracy": float("nan")})
    settings, plan = trained_with(cfg, result, earlier)
    outcome = TrainResult(
        steps=result.steps, final_loss=last["loss"], final_accuracy=last["accuracy"],
        tokens_per_s=result.tokens_per_s, wall_s=result.wall_s, model_dir=layout.model,
        resumed_from=result.resumed_from, reward_mean=stats["reward_mean"], reward_std=stats["reward_std"],
        wandb_url=result.wandb_url, reused=result.reused, fingerprint=fingerprint, data_hash=meta["content_hash"],
        code_hash=code, base_content=base, model_settings=asdict(params.model), train_settings=settings,
        best_checkpoint=str(layout.checkpoints / f"step-{result.best_step}") if result.best_step else None,
        best_eval_accuracy=result.best_eval_accuracy, processes=launch.processes, fsdp=launch.fsdp,
        launch=str(launch), launch_command=launch.command("run"),
        device_plan=plan, sessions=result.sessions)
    # a finished run reused from its checkpoint, its model and records intact: they stay as they are (written
    # again, summary.json changed, `reused`, and DVC saw train's outputs changed: `dvc checkout` asked for -f)
    kept = result.reused and earlier is not None and _intact(layout, fingerprint) is not None
    if accelerator.is_main_process and not kept:
        # the model and its run's records replace the earlier ones together: an interrupted train leaves
        # the earlier pair, which push and the model card quote as one
        with atomic_dirs(layout.model, layout.train_logs) as (out, logs):
            normalisation = {k: stats[k] for k in ("reward_mean", "reward_std") if stats[k] is not None}
            # OpenRLHF normalises with config.mean and config.std; vLLM reads one label as a probability (a
            # sigmoid on the reward) unless the problem is a regression
            readers = {new: normalisation[old] for new, old in (("mean", "reward_mean"), ("std", "reward_std"))
                       if old in normalisation}
            chat = tokenized["template"] == "tokenizer"
            # the release's template writes the end token training added: TRL's reward functions and
            # apply_chat_template(tokenize=True) add none (a start token the tokenizer adds stays the tokenizer's)
            save_model(model, tokenization.template_as_trained(tokenizer) if chat else tokenizer, out,
                       extra_config={**normalisation, **readers, "problem_type": "regression",
                                     "rm_lib_fingerprint": fingerprint}, state_dict=gathered,
                       chat_template=chat)
            base_named = base_model_reference(params.model.name_or_path)
            write_json(out / trained_prompts.FILE, trained_prompts.record(train_rows, base_trained, base_named))
            # before rm_lib.json: each file's hash (evaluate and push name one deleted or changed since) and
            # the hash over them, which evaluate records it scored
            files, weights_hash = file_record(out)
            write_json(out / "rm_lib.json", {"template": tokenized["template"], "base_model": params.model.name_or_path,
                                             "data_hash": meta["content_hash"], "fingerprint": fingerprint,
                                             "code_hash": code, "content_hash": weights_hash, "files": files,
                                             "inputs": {"filtered": meta["content_hash"]},
                                             # what the pairs were held to: score holds its pairs to the same
                                             "lengths": {k: meta.get(k) for k in LENGTH_SETTINGS},
                                             "base_reward_model": base_reward_model(params.model.name_or_path),
                                             # the tokens the reward is read after: a scorer checks its tokenizer
                                             "special_tokens": _special_record(tokenizer)})
            plots.loss_curve([r["step"] for r in history], [r["loss"] for r in history],
                             [r["accuracy"] for r in history], logs / "loss.png")
            write_jsonl(logs / "metrics.jsonl", records)  # the finished run's log, published
            # `dvc plots` reads no JSON Lines: the logged records as one JSON list
            write_json(logs / "metrics.plot.json", logged)
            write_json(logs / "run.json", outcome.run_record())
            write_json(logs / "summary.json", outcome.summary_record())
    accelerator.wait_for_everyone()
    return outcome


def _special_record(tokenizer: Any) -> dict:
    special = special_tokens(tokenizer)
    return {"prefix": list(special.prefix), "end": special.end}

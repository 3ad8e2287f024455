"""The training loop: Bradley-Terry on pairs, chosen and rejected in one forward pass,
length-grouped batches, gradient accumulation, warm-up schedule, accelerate for devices and
processes, resumed exactly from a checkpoint (weights, optimizer, scheduler, data position, RNG;
rm_lib.training.checkpoints writes and judges them)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rm_lib import network
from rm_lib.errors import DevicePathError, TrainingDiverged
from rm_lib.model.batching import EpochSchedule, collate_pairs, pair_length, pair_tokens, step_forwards
from rm_lib.model.inference import PairScorer
from rm_lib.model.loss import bradley_terry_loss
from rm_lib.model.modeling import switches_attention, unwrap
from rm_lib.model.packing import (
    FLEX_BLOCK,
    any_width_compiles,
    check_attention_window,
    largest_batch_tokens,
    pack_pairs,
    pack_pairs_shared,
    pooling,
    why_not_packed,
)
from rm_lib.model.varlen import VARLEN, check_kernel, cuda_kernel
from rm_lib.settings import ModelSettings, TrainSettings
from rm_lib.training.checkpoints import (
    LOG_FILE,
    STATE_FILE,
    TrainState,
    latest_checkpoint,
    resume_point,
    save_checkpoint,
    step_folders,
)
from rm_lib.training.device_plan import UNSHARDED, DevicePlan, Sharding, arithmetic, model_shape, plan
from rm_lib.training.distributed import common_budget, launch_of, on_every_process, sharding
from rm_lib.training.length_debias import HEAD_LEARNING_RATE, LengthHead, debiased_loss, sequence_lengths
from rm_lib.training.memory import release_free_memory
from rm_lib.training.model_modes import attention_as, checkpoint_layers, compiled_layers, dropout_disabled
from rm_lib.training.progress import StepProgress

# Settings that leave the weights as they are (to float rounding): a run resumes across a change of them.
NOT_IN_FINGERPRINT = ("logging_steps", "eval_steps", "save_steps", "save_total_limit", "num_print_samples",
                      "wandb_project", "wandb_mode", "max_tokens_per_forward", "shared_prompt", "attention",
                      "compile", "gpu_memory_gib")


@dataclass
class FitResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    wandb_url: str | None = None
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    best_step: int | None = None
    best_eval_accuracy: float | None = None
    prepared: Any = None  # the model as accelerate wrapped it (DDP, FSDP)
    reused: bool = False  # the run had finished already: no step trained, the figures are the run's
    last_log: dict | None = None  # the last metrics record of the run (also when reused)
    device_plan: dict | None = None  # DevicePlan.record() of the plan that trained the last steps
    sessions: list[dict] = field(default_factory=list)  # TrainState.sessions


def run_fingerprint(train: TrainSettings, model: ModelSettings, data_hash: str, code_hash: str,
                    processes: int = 1, fsdp: bool = False, base: str | None = None) -> str:
    """What a checkpoint must match to be resumed: everything that changes the weights (the settings,
    the base model, the data, the training code, and the number of processes: each takes
    train.batch_size pairs of a step), and whether FSDP saves its checkpoints (`Launch`). `base`: the
    base model's content (modeling.base_identity), beside its name: a folder changed in place, a Hub
    branch that moved, is another run."""
    run = fingerprint_parts(train, model, data_hash, code_hash, processes, fsdp, base)
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_parts(train: TrainSettings, model: ModelSettings, data_hash: str, code_hash: str,
                      processes: int = 1, fsdp: bool = False, base: str | None = None) -> dict[str, Any]:
    """What run_fingerprint hashes; kept in each checkpoint, so that a run which passes over another's
    checkpoint can say what differs."""
    relevant = {k: v for k, v in asdict(train).items() if k not in NOT_IN_FINGERPRINT}
    described = {**asdict(model), **({"content": base} if base is not None else {})}
    run = {"train": relevant, "model": described, "data": data_hash, "code": code_hash, "processes": processes}
    if fsdp:  # only then: the fingerprints of runs without FSDP stay what they were
        run["fsdp"] = True
    return run


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _param_groups(scorer: PairScorer) -> list[dict]:
    """The model at train.learning_rate; the length head, when there is one, at its own rate and
    without weight decay (rm_lib.training.length_debias.HEAD_LEARNING_RATE says why)."""
    groups = [{"params": [p for p in scorer.scored_model.parameters() if p.requires_grad]}]
    if scorer.length_head is not None:
        groups.append({"params": list(scorer.length_head.parameters()), "lr": HEAD_LEARNING_RATE,
                       "weight_decay": 0.0})
    return groups


def _schedule(optimizer: Any, kind: str, warmup: int, total: int) -> Any:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def _first_bad(accelerator: Any, bad_step: torch.Tensor, bad_loss: torch.Tensor) -> tuple[int, float]:
    """(the first step whose loss was not finite on any process, that loss), or (0, 0.0): the same on every
    process, which then stops alike (one that saw none went on to wait at the next collective)."""
    pair = torch.stack([bad_step.double(), bad_loss.double()])
    rows = accelerator.gather(pair).reshape(-1, 2).tolist() if accelerator.num_processes > 1 else [pair.tolist()]
    bad = [(int(step), loss) for step, loss in rows if step]
    return min(bad, key=lambda b: b[0]) if bad else (0, 0.0)


def _diverged(loss: float, step: int, folder: Path, fingerprint: str) -> TrainingDiverged:
    """The message names only checkpoints that exist."""
    own = latest_checkpoint(folder, fingerprint) if folder.exists() else None
    if own is not None:
        kept = f"The last good checkpoint is {own}"
    else:
        others = folder.exists() and bool(step_folders(folder))
        kept = "no checkpoint of this run was saved" + (f"; the earlier run's checkpoints in {folder} are untouched"
                                                        if others else "")
    return TrainingDiverged(f"train: the loss became {loss} at step {step}; lower train.learning_rate or "
                            f"check the data. {kept}")


WINDOW_SUMS, WINDOW_COUNTS = ("loss", "acc", "margin", "mean"), ("n", "tokens", "computed", "padded")


def _new_window(device: torch.device) -> dict:
    sums = {k: torch.zeros((), device=device) for k in WINDOW_SUMS}
    return {**sums, **{k: 0 for k in WINDOW_COUNTS}}


def _saved_window(accelerator: Any, window: dict, elapsed: float) -> dict:
    """The logging window so far, summed over the processes, for a checkpoint: a run resumed from it
    logs what an uninterrupted run logs (a checkpoint falls between logs when save_steps is not a
    multiple of logging_steps, or at a new best evaluation)."""
    values = torch.stack([window[k].double() for k in WINDOW_SUMS]
                         + [torch.tensor(float(window[k]), dtype=torch.float64, device=window["loss"].device)
                            for k in WINDOW_COUNTS])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "sum")
    return {**dict(zip(WINDOW_SUMS + WINDOW_COUNTS, values.tolist())), "elapsed_s": elapsed}


def _restored_window(saved: dict | None, device: torch.device, main: bool) -> tuple[dict, float]:
    """A window as a checkpoint saved it (held by the main process: the log sums over processes) and its
    seconds so far."""
    window = _new_window(device)
    if not saved or not main:
        return window, 0.0
    for k in WINDOW_SUMS:
        window[k] += saved[k]
    for k in WINDOW_COUNTS:
        window[k] = int(saved[k])
    return window, float(saved.get("elapsed_s", 0.0))


def plan_for(cfg: TrainSettings, model: Any, device: torch.device, packed: bool, precision: str = "no",
             rows: list[dict] | None = None, world: int = 1, split: Sharding = UNSHARDED) -> DevicePlan:
    """The device plan of this run (rm_lib.training.device_plan), from free memory on a GPU and, for
    packed batches, the largest batch `rows` can make."""
    gpu = device.type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] if gpu else None
    inner = unwrap(model)
    flex = bool(getattr(inner, "_supports_flex_attn", False))
    largest = None
    if gpu and packed and rows:
        largest = largest_batch_tokens(rows, pairs=cfg.batch_size, shared_prompt=_shares_prompts(cfg, inner),
                                       batch_tokens=None if cfg.batch_tokens is None else cfg.batch_tokens * world)
    return plan(device_type=device.type, packed=packed, supports_flex=flex, shape=model_shape(inner), free_bytes=free,
                attention=cfg.attention,
                tokens_per_forward=cfg.max_tokens_per_forward, gradient_checkpointing=cfg.gradient_checkpointing,
                precision=precision, loaded_attention=inner.config._attn_implementation,
                supports_varlen=cuda_kernel() is not None, largest_forward=largest,
                limit_bytes=None if cfg.gpu_memory_gib is None else int(cfg.gpu_memory_gib * 2**30),
                switches_attention=switches_attention(inner),
                sharding=split)


def _shares_prompts(cfg: TrainSettings, inner: Any) -> bool:
    """The prompt once per pair: causal decoders only (an encoder's prompt would see both answers)."""
    return cfg.padding_free and cfg.shared_prompt and pooling(inner) == "last"


def fit(cfg: TrainSettings, model: Any, train_rows: list[dict], *, pad_token_id: int, checkpoints: Path,
        fingerprint: str, accelerator: Any, tracker: Any = None,
        on_eval: Callable[[Any, int], dict] | None = None, final_checkpoint: bool = True,
        made_of: dict | None = None) -> FitResult:
    """Train `model` in place. `accelerator` is an accelerate.Accelerator made by the caller. The model
    leaves as it came, whether training ends or raises: with its own attention (the run may switch it).
    `final_checkpoint=False` (benchmarks: a run never resumed) skips the last step's checkpoint, weights
    and optimizer state, where save_steps or a new best does not ask for it; a rerun then trains again.
    `made_of`: the fingerprint's parts (`fingerprint_parts`), kept in the checkpoints."""
    with contextlib.ExitStack() as run_scope:
        try:
            return _fit(cfg, model, train_rows, pad_token_id=pad_token_id, checkpoints=checkpoints,
                        fingerprint=fingerprint, accelerator=accelerator, tracker=tracker, on_eval=on_eval,
                        run_scope=run_scope, final_checkpoint=final_checkpoint, made_of=made_of)
        except torch.OutOfMemoryError as exc:  # outside a forward (a forward's is retried smaller): the state
            first = network.first_line(exc)
            raise DevicePathError(f"train: out of GPU memory outside the training forwards ({first}): the weights, "
                                  "their gradients and AdamW's state need room too; set train.lora=true, or free "
                                  "GPU memory. Checkpoints are kept: the run resumes from the last one") from exc


def _fit(cfg: TrainSettings, model: Any, train_rows: list[dict], *, pad_token_id: int, checkpoints: Path,
         fingerprint: str, accelerator: Any, tracker: Any, on_eval: Callable[[Any, int], dict] | None,
         run_scope: contextlib.ExitStack, final_checkpoint: bool = True, made_of: dict | None = None) -> FitResult:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    if cfg.disable_dropout:
        run_scope.enter_context(dropout_disabled(model))
    packed = cfg.padding_free and pooling(unwrap(model)) is not None
    if packed and train_rows:
        check_attention_window(unwrap(model).config, max(pair_length(r) for r in train_rows))
    world, rank = accelerator.num_processes, accelerator.process_index
    device_plan = plan_for(cfg, model, accelerator.device, packed, str(accelerator.mixed_precision), train_rows, world,
                           sharding(accelerator))
    # each process planned its own device; all run by one budget, the smallest (said so, and recorded)
    device_plan = replace(device_plan, tokens_per_forward=common_budget(accelerator, device_plan.tokens_per_forward))
    loaded_attention = unwrap(model).config._attn_implementation
    accelerator.print(f"train: {device_plan.describe(loaded_attention)}")
    if device_plan.attention == VARLEN and accelerator.device.type == "cuda":  # the plan refused it in fp32
        dtype = torch.float16 if str(accelerator.mixed_precision) == "fp16" else torch.bfloat16
        worst = check_kernel(str(accelerator.device), dtype)
        accelerator.print(f"train: the varlen kernel agrees with SDPA to {worst:.2g} on a layout of shared prompts")
    if device_plan.gradient_checkpointing:
        checkpoint_layers(model, device_plan.checkpointed_layers)
    run_scope.enter_context(attention_as(model, device_plan.attention))
    if cfg.compile:
        accelerator.print(f"train: {run_scope.enter_context(compiled_layers(model))} layers compiled (train.compile)")
    # compiled for any row width from the first forward, and stopped at dynamo's recompile limit
    compiles = any_width_compiles if cfg.compile else contextlib.nullcontext
    packer = pack_pairs_shared if packed and _shares_prompts(cfg, unwrap(model)) else pack_pairs
    # flex_attention's block mask skips what rows would separate (a row of whole 128-token blocks);
    # varlen needs no rows at all, nor padding
    one_row = device_plan.attention in ("flex_attention", VARLEN)
    varlen, causal = device_plan.attention == VARLEN, pooling(unwrap(model)) == "last"
    multiple = 1 if varlen else FLEX_BLOCK
    if cfg.padding_free and not packed:
        accelerator.print(f"train: padding_free is not supported for {type(unwrap(model)).__name__} "
                          f"({why_not_packed(unwrap(model))}); training on padded batches")
    host_activations = accelerator.device.type == "cpu"
    global_tokens = None if cfg.batch_tokens is None else cfg.batch_tokens * world
    accumulation = cfg.gradient_accumulation_steps
    # every `accumulation` micro-batches are one step's pairs, as one batch that many times larger has them
    schedule = EpochSchedule(train_rows, cfg.batch_size * world, seed=cfg.seed, group_by_length=cfg.group_by_length,
                             batch_tokens=global_tokens, accumulation=accumulation)
    # A run of num_epochs trains the whole steps of them, at least one. With max_steps the steps go on
    # into the next epochs.
    end = None if cfg.max_steps else max(schedule.micro_batches(cfg.num_epochs), accumulation)
    total = cfg.max_steps or end // accumulation
    scorer = PairScorer(model, LengthHead.for_rows(train_rows) if cfg.length_debias else None)
    optimizer = torch.optim.AdamW(_param_groups(scorer), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if device_plan.fused_adamw else {}))
    scheduler = _schedule(optimizer, cfg.lr_scheduler, int(cfg.warmup_ratio * total), total)
    # `total` counts optimizer steps already; a prepared scheduler would step once per process and
    # decay the learning rate `world` times too fast. Its state travels in trainer_state.json.
    model, optimizer = accelerator.prepare(scorer, optimizer)

    launch = launch_of(accelerator)
    state = TrainState(fingerprint=fingerprint, processes=launch.processes, fsdp=launch.fsdp, made_of=made_of)
    resumed_from = None
    # Another run's checkpoints stay until this run saved its own (save_checkpoint prunes them then).
    latest = resume_point(checkpoints, fingerprint, accelerator.print, made_of) if checkpoints.exists() else None
    if latest is not None:
        known = TrainState.__dataclass_fields__
        saved = TrainState(**{k: v for k, v in json.loads((latest / STATE_FILE).read_text()).items() if k in known})
        accelerator.load_state(str(latest))
        if saved.scheduler is not None:
            scheduler.load_state_dict(saved.scheduler)
        saved.processes, saved.fsdp = launch.processes, launch.fsdp
        state, resumed_from = saved, saved.step
        accelerator.print(f"train: already trained at step {saved.step}; reused {latest}" if saved.step >= total
                          else f"train: resuming from {latest} (step {saved.step} of {total})")
    accelerator.wait_for_everyone()
    base_tokens, base_s = state.tokens, state.train_s
    if tracker is not None and accelerator.is_main_process:
        tracker.start(state.metrics_lines if resumed_from is not None else None,
                      saved=latest / LOG_FILE if latest is not None else None, wandb_id=state.wandb_id,
                      wandb_url=state.wandb_url, reused=resumed_from is not None and state.step >= total)
        state.wandb_id, state.wandb_url = getattr(tracker, "wandb_id", None), getattr(tracker, "wandb_url", None)

    if state.step < total:
        state.sessions.append({"steps": [state.step, state.step],
                               "train": {k: getattr(cfg, k) for k in NOT_IN_FINGERPRINT}})
    history: list[dict] = []
    # loss, acc, margin, mean: sums kept on the device, read at logging only (no host sync per step);
    # tokens: of the pairs' sequences (a shared prompt counts for both sides, as a padded batch has it);
    # computed: what the forward passes ran on, padding aside
    window, window_s = _restored_window(state.window, accelerator.device, accelerator.is_main_process)
    # the first step whose loss was not finite (0: none yet), on the device; read where weights leave it
    bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)
    bad_loss = torch.zeros((), device=accelerator.device)
    started, window_start, tokens_total = time.perf_counter(), time.perf_counter() - window_s, 0
    bar = StepProgress(total, state.step, show=accelerator.is_main_process)
    model.train()
    budget, retries = device_plan.tokens_per_forward, 0

    def plan_record() -> dict:
        return {**device_plan.record(loaded_attention), "tokens_per_forward": budget, "out_of_memory_retries": retries,
                "arithmetic": arithmetic(accelerator.device)}

    def run_batches(micro: int, budget: int | None) -> dict:
        """Forward and backward of the step that begins at micro-batch `micro`, in forwards of at most
        `budget` tokens; the step's sums over its pairs (on the device) for its logging window."""
        sums = _new_window(accelerator.device)
        sums["step_loss"] = torch.zeros((), device=accelerator.device)
        seen = []  # the step's rewards and lengths, observed by the length head once all its forwards ran
        layout = step_forwards(train_rows, schedule, micro, accumulation, rank, world, budget, end)
        for k, forwards in enumerate(layout):
            for c, forward in enumerate(forwards):
                chunk = forward.pairs
                if packed:
                    batch = packer(chunk, pad_token_id, cfg.use_margin, one_row=one_row, multiple=multiple)
                    batch = batch.with_varlen(causal=causal) if varlen else batch
                else:
                    batch = collate_pairs(chunk, pad_token_id, cfg.use_margin)
                batch = batch.to(accelerator.device)
                last = k == len(layout) - 1 and c == len(forwards) - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with sync, accelerator.autocast(), compiles():
                    if cfg.length_debias:
                        # Every forward of a step is judged against the same running values, so the step's
                        # gradient is the same in one forward or several; the first step, with none yet,
                        # has no penalty (a batch's own estimate would depend on how it was split).
                        lengths = sequence_lengths(chunk, accelerator.device)
                        scores, length_scores = model(batch, lengths)
                        head = scorer.length_head
                        loss = debiased_loss(scores, length_scores, lengths, batch.n_pairs, batch.margin,
                                             cfg.center_rewards_coefficient, cfg.length_debias_weight * head.observed,
                                             head)
                        if forward.counts:
                            seen.append((scores.detach(), lengths))
                    else:
                        scores = model(batch)
                        loss = bradley_terry_loss(scores[:batch.n_pairs], scores[batch.n_pairs:], batch.margin,
                                                  cfg.center_rewards_coefficient)
                    r_c, r_r = scores[:batch.n_pairs], scores[batch.n_pairs:]
                    accelerator.backward(loss * forward.weight)
                if not forward.counts:
                    continue
                n = len(chunk)
                with torch.no_grad():
                    sums["loss"] += loss.detach().float() * n
                    sums["acc"] += (r_c > r_r).float().sum()
                    sums["margin"] += (r_c - r_r).float().sum()
                    sums["mean"] += scores.float().mean() * n
                    sums["step_loss"] += loss.detach().float() * forward.weight
                sums["n"] += n
                sums["tokens"] += getattr(batch, "sequence_tokens", batch.real_tokens)
                sums["computed"] += batch.real_tokens
                sums["padded"] += batch.padded_tokens
        if scorer.length_head is not None:
            observe_step(scorer.length_head, seen)
        return sums

    def observe_step(head: LengthHead, seen: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The head observes the step's rewards on every process, as one process holding all of them
        would: each process's sums, added up (a process whose share ran out adds none, yet joins in)."""
        sums = (head.sums(torch.cat([r for r, _ in seen]), torch.cat([n for _, n in seen])) if seen
                else torch.zeros(5, dtype=torch.float64, device=accelerator.device))
        head.observe_sums(accelerator.reduce(sums, "sum") if world > 1 else sums)

    while state.step < total:
        micro = state.step * accumulation
        # the running statistics of the length head, as they stand before the step: a step run again
        # observes its pairs again
        before = {k: v.clone() for k, v in scorer.length_head.named_buffers()} if scorer.length_head else {}
        # and the RNGs dropout draws from: a step run again draws the masks it drew the first time
        rng = _rng_states(accelerator.device)
        while True:
            widest = None
            try:
                sums = run_batches(micro, budget)
                break
            except torch.OutOfMemoryError:
                widest = max(sum(pair_tokens(r) for r in forward.pairs) for forwards in
                             step_forwards(train_rows, schedule, micro, accumulation, rank, world, budget, end)
                             for forward in forwards)
                if world > 1:  # the other processes are inside the step's collectives: no one can redo it alone
                    ways = "train.gpu_memory_gib, train.gradient_checkpointing=true or train.lora=true"
                    if widest > max(pair_tokens(r) for r in train_rows):  # a single pair runs alone whatever the budget
                        ways = f"train.max_tokens_per_forward below {widest} (or {ways})"
                    raise DevicePathError(
                        f"train: out of GPU memory at step {state.step + 1} in a forward of up to {widest} tokens; "
                        f"with several processes a step is not run again in smaller forwards: set {ways}. "
                        "Checkpoints are kept: the run resumes from the last one") from None
            # out of the except block: its traceback, and the tensors it holds, are gone
            budget = _smaller_budget(widest, train_rows, state.step + 1)
            retries += 1
            optimizer.zero_grad(set_to_none=True)
            for name, value in before.items():
                scorer.length_head.get_buffer(name).copy_(value)
            _restore_rng_states(rng, accelerator.device)
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()
            accelerator.print(f"train: out of GPU memory at step {state.step + 1} in a forward of up to {widest} "
                              f"tokens; the step runs again, and the rest of the run, with at most {budget} tokens "
                              "a forward (the same gradients)")
        step_loss = sums.pop("step_loss")
        for key, value in sums.items():
            window[key] += value
        first = (bad_step == 0) & ~torch.isfinite(step_loss)
        bad_step, bad_loss = torch.where(first, state.step + 1, bad_step), torch.where(first, step_loss, bad_loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if host_activations:  # the step's buffers are free: their pages go back (rm_lib.training.memory)
            release_free_memory()
        state.step += 1
        bar.update()

        logging = state.step % cfg.logging_steps == 0 or state.step == total
        evaluating = on_eval is not None and cfg.eval_steps and state.step % cfg.eval_steps == 0
        if logging or evaluating or state.step % cfg.save_steps == 0:
            # the only reads of the device between logs: no weights of a diverged run are logged, evaluated or saved
            first_bad, loss_then = _first_bad(accelerator, bad_step, bad_loss)
            if first_bad:
                raise on_every_process(_diverged(loss_then, first_bad, checkpoints, fingerprint))
        if logging:
            elapsed = time.perf_counter() - window_start
            # one read for all processes: each figure a mean over every pair the window trained on
            counts = torch.tensor([float(window[k]) for k in WINDOW_COUNTS], dtype=torch.float64)
            totals = torch.cat([torch.stack([window[k].double() for k in WINDOW_SUMS]), counts.to(accelerator.device)])
            loss_sum, acc_sum, margin_sum, mean_sum, pairs, tokens, computed, padded = \
                accelerator.reduce(totals, "sum").tolist()
            pairs, tokens = max(pairs, 1.0), int(tokens)
            # the epochs trained so far, this step's micro-batches included
            epoch, position = schedule.locate(state.step * accumulation if end is None
                                              else min(state.step * accumulation, end))
            record = {"step": state.step, "epoch": round(epoch + position / schedule.count(epoch), 4),
                      "loss": loss_sum / pairs, "accuracy": acc_sum / pairs, "reward_margin": margin_sum / pairs,
                      "reward_mean": mean_sum / pairs, "grad_norm": float(grad_norm),
                      "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(elapsed, 1e-9),
                      "padding_fraction": 1 - computed / max(padded, 1),
                      # seconds of training in this run, over its sessions: throughput past a warm-up can be read off
                      "elapsed_s": round(base_s + time.perf_counter() - started, 3)}
            if scorer.length_head is not None:  # what the length penalty holds down, as it stands now
                record["length_correlation"] = scorer.length_head.running_correlation().item()
            if accelerator.device.type == "cuda":  # the allocator's peak so far: what the device plan predicts
                record["peak_gpu_mib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
            tokens_total += tokens
            history.append(record)
            state.last_log = dict(record)
            if tracker is not None and accelerator.is_main_process:
                tracker.log(record)
                state.metrics_lines += 1
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
            window = _new_window(accelerator.device)
            window_start = time.perf_counter()
        new_best, best_before = False, (state.best_step, state.best_eval_accuracy)
        if evaluating:
            # scored as the saved model will be, by evaluation and by users: its own attention, not
            # compiled (flex_attention or compiled layers on padded batches would compile per batch shape)
            with attention_as(model, loaded_attention), torch.compiler.set_stance("force_eager"):
                result = on_eval(model, state.step)
            if state.best_eval_accuracy is None or result["accuracy"] > state.best_eval_accuracy:
                state.best_eval_accuracy, state.best_step, new_best = result["accuracy"], state.step, True
            if tracker is not None and accelerator.is_main_process:
                tracker.log({"step": state.step, **{f"eval_{k}": v for k, v in result.items()
                                                    if isinstance(v, (int, float))}})
                state.metrics_lines += 1
            model.train()
        saving = state.step % cfg.save_steps == 0 or (state.step == total and final_checkpoint) or new_best
        if saving or state.step == total:  # the session's figures, saved or not
            state.tokens, state.train_s = base_tokens + tokens_total, base_s + time.perf_counter() - started
        if saving:
            state.sessions[-1]["steps"][1] = state.step
            state.sessions[-1]["device_plan"] = plan_record()
            state.scheduler = scheduler.state_dict()
            state.window = _saved_window(accelerator, window, time.perf_counter() - window_start)
            try:
                save_checkpoint(accelerator, checkpoints, state, cfg.save_total_limit,
                                log=getattr(tracker, "metrics_path", None))
            except OSError as exc:
                # one process of several may fail alone (its own disk; the files only the first writes):
                # the others wait for it inside the save, so there the run ends as before
                if state.step < total or exc.errno != errno.ENOSPC or accelerator.num_processes > 1:
                    raise
                # the run is done: its model still fits where its last checkpoint did not (a checkpoint
                # holds the optimizer too), and a rerun trains the last steps again from the one before
                accelerator.print(f"train: {exc.strerror}; the trained model is saved without its last checkpoint")
                if new_best:  # summary.json names a checkpoint that exists: the best one saved
                    state.best_step, state.best_eval_accuracy = best_before
    bar.close()
    if host_activations:
        release_free_memory()
    # The state holds this session's figures (set at the last step); a reused run reports the run's.
    reused = resumed_from is not None and resumed_from == state.step
    tokens, wall = (state.tokens, state.train_s) if reused else (state.tokens - base_tokens, state.train_s - base_s)
    trained_by = state.sessions[-1].get("device_plan") if reused and state.sessions else None
    return FitResult(steps=state.step, history=history, resumed_from=resumed_from,
                     wandb_url=getattr(tracker, "wandb_url", None), tokens_per_s=tokens / max(wall, 1e-9),
                     wall_s=wall, best_step=state.best_step, best_eval_accuracy=state.best_eval_accuracy,
                     prepared=model, reused=reused, last_log=state.last_log,
                     device_plan=trained_by or plan_record(), sessions=state.sessions)


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The states of the RNGs a forward draws dropout masks from: the host's and `device`'s."""
    states = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        states[device.type] = torch.get_device_module(device.type).get_rng_state(device)
    return states


def _restore_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    """The RNGs as `_rng_states` found them."""
    torch.set_rng_state(states["cpu"])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(states[device.type], device)


def _smaller_budget(widest: int, rows: list[dict], step: int) -> int:
    """Tokens per forward after a forward of `widest` tokens ran out of GPU memory: half of it, down
    to the largest pair, which runs alone whatever the budget."""
    largest_pair = max(pair_tokens(r) for r in rows)
    if widest <= largest_pair:
        raise DevicePathError(f"train: out of GPU memory at step {step} in a forward of a single pair ({widest} "
                              "tokens); set train.gradient_checkpointing=true, train.lora=true or a lower "
                              "filter.max_token_length, or free GPU memory. Checkpoints are kept: the run resumes from "
                              "the last one")
    return max(widest // 2, largest_pair)


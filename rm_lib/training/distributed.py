"""A run of several processes (DDP, FSDP): how they were launched, how they split the state, and
checks that stop every process at once rather than leave some waiting at a collective."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rm_lib.errors import SettingsError, UserError
from rm_lib.training.device_plan import UNSHARDED, Sharding


@dataclass(frozen=True)
class Launch:
    """How a run's processes were started, as far as its checkpoints depend on it: how many take a
    step's pairs (train.batch_size each), and whether FSDP saved them (its sharded weights and
    optimizer state are a layout DDP cannot read, nor FSDP DDP's)."""
    processes: int = 1
    fsdp: bool = False

    def __str__(self) -> str:
        count = f"{self.processes} process{'' if self.processes == 1 else 'es'}"
        return f"{count} (FSDP)" if self.fsdp else count if self.processes == 1 else f"{count} (DDP)"

    def command(self, step: str = "train") -> str:
        """A command that starts this launch of `step` on one machine."""
        if self.fsdp:
            return f"accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes {self.processes} " \
                   f"-m rm_lib {step}"
        if self.processes > 1:
            return f"accelerate launch --multi_gpu --num_processes {self.processes} -m rm_lib {step}"
        return f"python -m rm_lib {step}"


def launch_of(accelerator: Any) -> Launch:
    from accelerate.utils import DistributedType

    return Launch(accelerator.num_processes, accelerator.distributed_type == DistributedType.FSDP)


_FSDP_STRATEGIES = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD",
                    "5": "HYBRID_SHARD_ZERO2", "TRUE": "FULL_SHARD", "FALSE": "SHARD_GRAD_OP"}


def sharding(accelerator: Any) -> Sharding:
    """How the processes split the weights, gradients and AdamW state (`device_plan.Sharding`): FSDP
    splits all three, keeping the weights gathered from forward to backward where it does not reshard
    after the forward (SHARD_GRAD_OP, FSDP2's `reshard_after_forward: false`); hybrid FSDP within a
    node. DDP splits nothing."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return UNSHARDED
    reshard = accelerator.state.fsdp_plugin.reshard_after_forward
    name = str(getattr(reshard, "name", reshard)).upper()
    strategy = _FSDP_STRATEGIES.get(name, name).lstrip("_")
    if strategy == "NO_SHARD":
        return UNSHARDED
    world = accelerator.num_processes
    if strategy.startswith("HYBRID"):  # sharded among a node's processes, replicated across nodes
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return Sharding(world, weights_gathered=strategy in ("SHARD_GRAD_OP", "HYBRID_SHARD_ZERO2"))


def check_distributed(accelerator: Any) -> None:
    """DeepSpeed's engine steps the optimizer at each backward it is not told is partial, and scales
    the loss by its own accumulation: the trainer's token-budgeted forwards and accumulation would
    step on parts of a batch. FSDP shards the same state."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise SettingsError("train: DeepSpeed is not supported; launch with configs/accelerate/fsdp.yaml, which "
                            "shards the weights, gradients and optimizer state as ZeRO-3 does (see "
                            "docs/distributed.md)")


def check_same_run(accelerator: Any, run: dict) -> None:
    """Every process of a launch must train the same `run` (its settings, data and code, as nested
    dicts and strings): one with other settings would train its share of another model into the
    common weights, or wait at a collective the others never reach (another number of steps, another
    evaluation or save step) until the process group times out. Compared before anything else is
    shared, so that every process stops at once, naming the processes and what differs."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    runs = gather_object([run])
    texts = [json.dumps(r, sort_keys=True, default=str) for r in runs]
    # the others are judged against the most common run (the first process's among equals)
    common = max(texts, key=lambda t: (texts.count(t), -texts.index(t)))
    reference = texts.index(common)
    differ = {rank: _differences(runs[reference], r) for rank, r in enumerate(runs) if texts[rank] != common}
    if not differ:
        return
    said = "; ".join(f"rank {rank} in {', '.join(keys[:4])}{' and more' if len(keys) > 4 else ''}"
                     for rank, keys in differ.items())
    raise on_every_process(SettingsError(
        f"train: the processes of this launch were not given the same run: against rank {reference}, {said}. "
        "Every process must read the same params.yaml and --set overrides, data and code (on several machines: "
        "the same commit and project folder, or `dvc pull` on each); nothing was trained"))


def on_every_process(error: UserError) -> UserError:
    """`error`, marked as raised alike by every process of the launch: the CLI prints it once."""
    error.every_process = True
    return error


def agreed(accelerator: Any, check: Callable[[], None]) -> None:
    """Run `check` on every process; if it raises a UserError on any, every process raises it (the first
    process's message among those that failed), so none goes on to wait for the others at a collective."""
    if accelerator.num_processes == 1:
        check()
        return
    from accelerate.utils import gather_object

    try:
        check()
        said = None
    except UserError as exc:
        said = str(exc)
    said = next((s for s in gather_object([said]) if s is not None), None)
    if said is not None:
        raise on_every_process(SettingsError(said))


def common_budget(accelerator: Any, budget: int | None) -> int | None:
    """The tokens a forward every process runs with: the smallest any process planned for its device (None:
    none has a limit). Each plans its own device's memory, but step_forwards lays out every process's share
    of a step by one budget, and under FSDP each forward is a collective: processes with other budgets would
    run other numbers of forwards and wait for each other for good."""
    if accelerator.num_processes == 1:
        return budget
    from accelerate.utils import gather_object

    planned = [b for b in gather_object([budget]) if b is not None]
    return min(planned) if planned else None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Where two nested dicts differ, as dotted keys with both values (a long one left out)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(a.keys() | b.keys(), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    if a == b:
        return []
    shown = f" ({a!r} against {b!r})" if len(repr(a)) + len(repr(b)) < 60 else ""
    return [prefix.rstrip(".") + shown]


def gathered_state_dict(accelerator: Any, prepared: Any) -> dict | None:
    """Full weights of a sharded run (FSDP), gathered on the main process; None for runs whose
    model holds its whole weights. Every process must call it: the gather is collective."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    full = accelerator.get_state_dict(prepared)
    prefix = "scored_model."  # the PairScorer around the model; its length head is not the model's
    return {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)} if full else None

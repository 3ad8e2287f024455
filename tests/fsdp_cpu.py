"""`python -m rm_lib <args>` with accelerate's FSDP2 on CPU processes (gloo), under torchrun.

accelerate runs FSDP on GPUs only: on a machine without one it joins the processes for plain data
parallelism. Here the run's Accelerator is made as a CPU run, then given the FSDP plugin that
configs/accelerate/fsdp.yaml describes, so the test suite runs the trainer's FSDP path: every
transformer layer its own unit, weights gathered at each forward, sharded checkpoints, the full
weights gathered for the saved model."""
import sys
from pathlib import Path

import yaml
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import rm_lib.steps.train as train_step
from rm_lib.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs/accelerate/fsdp.yaml"


def fsdp_accelerator(precision: str) -> Accelerator:
    fsdp = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"], state_dict_type=fsdp["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=fsdp["fsdp_activation_checkpointing"])
    accelerator = Accelerator(mixed_precision=precision, cpu=True)
    # both shared states: accelerate copies the process's own onto the accelerator's when it makes one anew
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


if __name__ == "__main__":
    train_step.new_accelerator = fsdp_accelerator
    sys.exit(main(sys.argv[1:]))

"""`rank_budget.py <rm_lib args>` under torchrun: `python -m rm_lib <rm_lib args>` with FSDP on CPU processes
(tests/fsdp_cpu.py), the second process planning half the tokens a forward the first plans, as a GPU with less
free memory would under train.max_tokens_per_forward=auto."""
import dataclasses
import os
import sys

import fsdp_cpu

import rm_lib.steps.train as train_step
import rm_lib.training.trainer as trainer
from rm_lib.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        planned = trainer.plan_for

        def smaller(*args, **kwargs):
            plan = planned(*args, **kwargs)
            return dataclasses.replace(plan, tokens_per_forward=plan.tokens_per_forward // 2)

        trainer.plan_for = smaller
    train_step.new_accelerator = fsdp_cpu.fsdp_accelerator
    sys.exit(main(sys.argv[1:]))

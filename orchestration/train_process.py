"""The training step as its own process, launched by the reward_model asset through Dagster Pipes:

    accelerate launch [--config_file configs/accelerate/ddp.yaml] -m orchestration.train_process \
        --root . --params params.yaml --set train.max_steps=100

The main process streams every metrics record back to the Dagster UI as it is logged (a log line and a
custom message); the other processes only train. Outside Dagster it runs like `python -m rm_lib train`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

from rm_lib import network
from rm_lib.errors import UserError
from rm_lib.evaluation.visualize import printable
from rm_lib.layout import Layout
from rm_lib.settings import load_params, params_file

SHOWN = ("loss", "accuracy", "reward_margin", "grad_norm", "learning_rate", "tokens_per_s", "eval_accuracy")


def describe(record: dict) -> str:
    """One log line for a metrics record: `step 10: loss 0.6931, accuracy 0.5000, ...`."""
    parts = [f"{k} {record[k]:.4g}" for k in SHOWN if isinstance(record.get(k), (int, float))]
    return f"train step {record.get('step')}: " + ", ".join(parts)


def launched_by_dagster() -> bool:
    """Every process of a group the reward_model asset launched (they inherit the Pipes variables)."""
    return "DAGSTER_PIPES_CONTEXT" in os.environ


def _pipes():
    """The Pipes connection on the main process (rank 0), nothing on the others."""
    if int(os.environ.get("RANK", "0")) != 0 or not launched_by_dagster():
        return contextlib.nullcontext(None)
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


def die_with_the_launcher() -> None:
    """Under torch's elastic launcher each training process runs in a session of its own: when the
    launcher is killed (SIGKILL, the out-of-memory killer) they trained on, writing checkpoints outside
    the group the asset stops and the run lock watches. On Linux each asks for SIGTERM when the process
    that started it ends, and ends at once where that happened between its start of main() and the
    request. (accelerate's simple launcher, one process, keeps its child in the group the asset stops.)"""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM) != 0:
        return
    if os.getppid() != parent:  # the launcher ended before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    die_with_the_launcher()
    parser = argparse.ArgumentParser(description="The rm_lib train step, reporting to Dagster through Pipes.")
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    from rm_lib import steps

    with _pipes() as pipes:
        def forward(record: dict) -> None:
            pipes.log.info(describe(record))
            pipes.report_custom_message({"metrics": record})

        try:
            params = load_params(params_file(args.params, args.root), args.overrides)
            # launched by Dagster, whose RetryPolicy is the one retry layer: each network call tried once
            with network.single_attempt() if launched_by_dagster() else contextlib.nullcontext():
                result = steps.run("train", params, Layout(Path(args.root)), on_log=forward if pipes else None)
        except UserError as exc:
            if pipes:
                pipes.report_custom_message({"error": str(exc), "transient": exc.transient})
            if not exc.every_process or steps.first_of_its_launch():  # the same line from each process: once
                print(f"error: {printable(str(exc))}", file=sys.stderr)
            return 2
        if pipes:
            # a run reused as it was writes no summary.json: the asset learns of it from here
            pipes.report_custom_message({"summary": result.summary(), "reused": result.reused})
        print(printable(result.summary()), flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        from rm_lib.steps import leave_the_launch

        leave_the_launch()
    sys.exit(code)

"""How the reward_model asset runs training: inside the Dagster step's own process (the default), or
as its own `accelerate launch` process group that reports back through Dagster Pipes. The second
form lets one materialization use every GPU of its machine (DDP or FSDP through an accelerate
config), and, with a Kubernetes executor from dagster-k8s running the step in a GPU pod, a cluster;
the asset stays the same (docs/distributed.md)."""
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from rm_lib.evaluation.visualize import printable

from .run_lock import hold_group

PROCESS_MODULE = "orchestration.train_process"


class TrainLauncherResource(dg.ConfigurableResource):
    """Where training runs. `separate_process: true` launches
    `accelerate launch [--config_file ...] -m orchestration.train_process`; its log lines and metrics
    stream into the run's event log as they happen."""

    separate_process: bool = Field(default=False, description="Run training as its own `accelerate launch` "
                                                              "process group (Dagster Pipes).")
    accelerate_config: Optional[str] = Field(default=None, description="accelerate config file, e.g. "
                                             "configs/accelerate/ddp.yaml; a relative path is read in the project "
                                             "folder. Unset: accelerate's own default config.")
    num_processes: Optional[int] = Field(default=None, description="Processes (GPUs) to launch; unset: what "
                                                                   "the accelerate config says.")
    launch_args: list[str] = Field(default=[], description="More `accelerate launch` arguments, e.g. "
                                                           "[\"--multi_gpu\"] or [\"--main_process_port\", \"29511\"].")
    stop_timeout_s: float = Field(default=30.0, description="After an interrupted run: how long the training "
                                                            "processes get to stop after SIGTERM before SIGKILL.")

    def command(self, root: Path, params_file: Path, overrides: Sequence[str]) -> list[str]:
        command = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.accelerate_config:
            config = Path(self.accelerate_config).expanduser()
            command += ["--config_file", str(config if config.is_absolute() else root / config)]
        if self.num_processes:
            command += ["--num_processes", str(self.num_processes)]
        command += [*self.launch_args, "-m", PROCESS_MODULE, "--root", str(root), "--params", str(params_file)]
        for override in overrides:
            command += ["--set", override]
        return command

    def launch(self, context: dg.AssetExecutionContext, command: list[str], cwd: Path) -> tuple[int, list[Any]]:
        """Run `command` in its own process group within a Pipes session: (exit code, custom messages).
        Whatever happens, no process of the group outlives this call."""
        context.log.info("train: launching " + printable(" ".join(command)))  # --set values may come from anywhere
        with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                                   message_reader=dg.PipesTempFileMessageReader()) as session:
            process = subprocess.Popen(command, cwd=cwd, start_new_session=True,
                                       env={**os.environ, **session.get_bootstrap_env_vars()})
            # for run monitoring (orchestration.run_launcher) and the project's run lock: the group
            # outlives a killed step process
            context.instance.report_engine_event(f"train: launched (process group: {process.pid}).", context.run)
            hold_group(context, cwd, process.pid)
            try:
                code = process.wait()
            finally:
                stop_group(process, self.stop_timeout_s)
        return code, list(session.get_custom_messages())


def stop_group(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL, every process left in `process`'s group (its own session: pgid == pid)."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        if not _group_alive(process.pid):
            break
        os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait_s
        while _group_alive(process.pid) and time.monotonic() < deadline:
            process.poll()  # reap the launcher itself
            time.sleep(0.1)
    process.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True

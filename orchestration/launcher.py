"""How the reward_model asset runs training: inside the Dagster step's own process (the default), or
as its own `accelerate launch` process group that reports back through Dagster Pipes. The second
form lets one materialization use every GPU of its machine (DDP or FSDP through an accelerate
config), and, with a Kubernetes executor from dagster-k8s running the step in a GPU pod, a cluster;
the asset stays the same (docs/distributed.md)."""
import collections
import os
import re
import signal
import subprocess
import sys
import threading
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

    def problem(self, root: Path) -> Optional[str]:
        """A mistake in this resource's settings, named before anything is launched (a missing accelerate
        config, a number of processes below 1, were only the launched process's exit code)."""
        if self.num_processes is not None and self.num_processes < 1:
            return f"trainer.num_processes: must be 1 or more, or unset, got {self.num_processes}"
        if self.accelerate_config:
            config = Path(self.accelerate_config).expanduser()
            config = config if config.is_absolute() else root / config
            if not config.is_file():
                return (f"trainer.accelerate_config: {config}: no such file (a relative path is read in the project "
                        "folder)")
        return None

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

    def launch(self, context: dg.AssetExecutionContext, command: list[str],
               cwd: Path) -> tuple[int, list[Any], Optional[str]]:
        """Run `command` in its own process group within a Pipes session: (exit code, custom messages, the
        line of its stderr that says why it failed, where one does). Its stderr is passed on to the
        step's as it comes. Whatever happens, no process of the group outlives this call."""
        context.log.info("train: launching " + printable(" ".join(command)))  # --set values may come from anywhere
        with dg.open_pipes_session(context=context, context_injector=dg.PipesTempFileContextInjector(),
                                   message_reader=dg.PipesTempFileMessageReader()) as session:
            process = subprocess.Popen(command, cwd=cwd, start_new_session=True, stderr=subprocess.PIPE,
                                       env={**os.environ, **session.get_bootstrap_env_vars()})
            # for run monitoring (orchestration.run_launcher) and the project's run lock: the group
            # outlives a killed step process
            context.instance.report_engine_event(f"train: launched (process group: {process.pid}).", context.run)
            hold_group(context, cwd, process.pid)
            tail: collections.deque = collections.deque(maxlen=200)
            relay = threading.Thread(target=_relay, args=(process.stderr, tail), daemon=True)
            relay.start()
            try:
                code = process.wait()
            finally:
                stop_group(process, self.stop_timeout_s)
                relay.join(timeout=10)
        return code, list(session.get_custom_messages()), _why(tail)


def _relay(stream: Any, tail: collections.deque) -> None:
    """The launched group's stderr to this step's, line by line, keeping the last lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line.rstrip())
    stream.close()


# `error: ...` (rm_lib, argparse after its program name), or an exception's last line
_ERROR_LINE = re.compile(r"(^|: )error: |^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:")


def _why(tail: Sequence[str]) -> Optional[str]:
    """The last line of a failed launch's stderr that names an error (an `error: ...` line, an exception's
    last line), without the bars tqdm redraws on it."""
    for line in reversed(tail):
        line = line.rsplit("\r", 1)[-1].strip()
        line = re.sub(r"^\[rank\d+\]: ", "", line)
        # the launchers' own (torchrun's ChildFailedError, accelerate's CalledProcessError) come after the child's
        if _ERROR_LINE.search(line) and "ChildFailedError" not in line and "CalledProcessError" not in line:
            return line
    return None


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

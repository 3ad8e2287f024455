"""Training's progress: tqdm's bar on a terminal; elsewhere (a log file, CI, Dagster's captured stderr) a
line now and then, as scoring's progress lines go (rm_lib.model.batching.Progress): the bar's redraws
joined into lines of thousands of characters there."""
from __future__ import annotations

import sys
import time
from typing import Any

from rm_lib.progress import PROGRESS_EVERY_S, so_far


class StepProgress:
    """`update()` after each step, `set_postfix(**figures)` after each log. Only `show` (the main process)
    says anything."""

    def __init__(self, total: int, initial: int, show: bool) -> None:
        from tqdm.auto import tqdm

        self.terminal = sys.stderr.isatty()
        self.show, self.total, self.step = show, total, initial
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not show or not self.terminal,
                        dynamic_ncols=True)
        self.start = self.last = time.monotonic()
        self.figures = ""

    def update(self) -> None:
        self.step += 1
        self.bar.update(1)
        now = time.monotonic()
        if not self.show or self.terminal or now - self.last < PROGRESS_EVERY_S or self.step >= self.total:
            return
        self.last = now
        print(f"train: step {self.step:,} of {self.total:,} ({100 * self.step // self.total}%), "
              f"{so_far(now - self.start)}{self.figures}", file=sys.stderr, flush=True)

    def set_postfix(self, **figures: Any) -> None:
        self.bar.set_postfix(**figures)
        self.figures = "; " + ", ".join(f"{k} {v}" for k, v in figures.items())

    def close(self) -> None:
        self.bar.close()

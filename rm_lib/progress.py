"""A line on stderr now and then in a long loop: how far it is, and the time so far. Torch-free, so the
data steps (download reads a large source for a minute) say it too."""
from __future__ import annotations

import os
import sys
import time

PROGRESS_EVERY_S = 30.0


def so_far(seconds: float) -> str:
    """`2 min 05 s so far`: the time a progress line says a long loop has run."""
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s so far"


class Progress:
    """A line on stderr every PROGRESS_EVERY_S seconds of a long loop (scoring thousands of pairs on a CPU
    takes many minutes), none for a short one; the first process of a distributed run alone speaks."""

    def __init__(self, what: str, count: int | None, unit: str, shared: bool = False,
                 note: str = "the shortest first") -> None:
        """`shared`: each process of the launch scores its share of the whole in step (`count` is one share);
        `note`: said after the time (the order the items go in); `count` None: a stream of unknown length."""
        self.what, self.count, self.unit, self.note = what, count, unit, f"; {note}" if note else ""
        self.start = self.last = time.monotonic()
        self.quiet = os.environ.get("RANK", "0") != "0"
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.share = f" on each of {world} processes" if shared and world > 1 else ""

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < PROGRESS_EVERY_S or (self.count is not None and done >= self.count):
            return
        self.last = now
        if self.count is None:  # a stream of unknown length: how many so far
            print(f"{self.what}: {done:,} {self.unit}{self.share}, {so_far(now - self.start)}{self.note}",
                  file=sys.stderr, flush=True)
            return
        print(f"{self.what}: {done:,} of {self.count:,} {self.unit}{self.share} ({100 * done // self.count}%), "
              f"{so_far(now - self.start)}{self.note}", file=sys.stderr, flush=True)

"""`rank_fails.py <rm_lib args>` under a launcher: `python -m rm_lib <rm_lib args>` on every process; the
second fails with a UserError at its first evaluation during training, as one process alone may (its
data unreadable, its device out of memory), while the others wait for it at a collective."""
import os
import sys

from rm_lib.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        from rm_lib.errors import UserError
        from rm_lib.steps import train

        def fails(*args, **kwargs):
            raise UserError("train: this process cannot read its share of the held-out pairs")

        train.score_pairs_across = fails  # the normalisation stats, scored across the processes
    sys.exit(main(sys.argv[1:]))

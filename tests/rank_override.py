"""`rank_override.py SECTION.KEY=VALUE <rm_lib args>` under a launcher: `python -m rm_lib <rm_lib args>` on
every process, the second with that setting overridden too, as a machine whose params.yaml differs would."""
import os
import sys

from rm_lib.cli import main

if __name__ == "__main__":
    override, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("RANK") == "1":
        argv = [*argv[:-1], "--set", override, argv[-1]]
    sys.exit(main(argv))

import sys

from rm_lib.cli import main

sys.exit(main())

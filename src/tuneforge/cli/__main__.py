"""`python -m tuneforge.cli ...`: the same command as `tuneforge ...` (used by torchrun)."""

import sys

from tuneforge.cli import main
from tuneforge.cli.startup import run_process

sys.exit(run_process(main, sys.argv[1:]))

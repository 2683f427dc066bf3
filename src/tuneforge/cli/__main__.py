"""`python -m tuneforge.cli ...`: the same command as `tuneforge ...` (used by torchrun)."""

import sys

from tuneforge.cli import main

sys.exit(main())

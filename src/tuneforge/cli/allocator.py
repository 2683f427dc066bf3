"""The `tuneforge` console command: `train` and `eval` re-execute themselves once under tcmalloc.

Where tcmalloc is installed and nothing opts out (tuneforge/heap.py decides); every other command,
and `python -m tuneforge.cli`, runs as started.
"""

from __future__ import annotations

import os
import sys

from tuneforge.heap import preload_env, tcmalloc_library


def entry() -> None:
    """The console script: re-execute once under tcmalloc where `preload_env` says so."""
    env = preload_env(sys.argv[1:], dict(os.environ), tcmalloc_library())
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "tuneforge.cli", *sys.argv[1:]], env)
    from tuneforge.cli import main
    from tuneforge.cli.startup import run_process

    sys.exit(run_process(main, sys.argv[1:]))

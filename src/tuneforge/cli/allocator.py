"""The `tuneforge` console command: `tuneforge train` runs under tcmalloc where it is installed.

glibc's heap keeps the holes that variable-length batches leave; tcmalloc reuses them, for a peak
RSS about a fifth lower at the same speed (bench/notes.md). TUNEFORGE_ALLOCATOR=system opts out.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

#: Commands re-executed under tcmalloc: the ones whose heap churns batch after batch.
COMMANDS = frozenset({"train"})
SWITCH = "TUNEFORGE_ALLOCATOR"


def preload_env(argv: list[str], environ: dict[str, str], library: str | None) -> dict | None:
    """The environment to re-execute `tuneforge argv` in, or None to run as we are: not a
    training command, switched off, tcmalloc missing, or a preload (ours or the user's) set."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS or library is None:
        return None
    if environ.get(SWITCH, "tcmalloc") != "tcmalloc" or environ.get("LD_PRELOAD"):
        return None
    # tcmalloc reports every allocation over 1 GB on stderr; a dense checkpoint makes several.
    quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    return {**environ, **quiet, "LD_PRELOAD": library, SWITCH: "tcmalloc"}


def entry() -> None:
    """The console script: re-execute once under tcmalloc where `preload_env` says so."""
    env = preload_env(sys.argv[1:], dict(os.environ), ctypes.util.find_library("tcmalloc_minimal"))
    if env is not None:
        args = [sys.executable, "-m", "tuneforge.cli", *sys.argv[1:]]
        os.execve(sys.executable, args, env)
    from tuneforge.cli import main

    sys.exit(main())

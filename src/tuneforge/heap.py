"""The malloc a process runs on, and the environment that puts training and evaluation on tcmalloc.

glibc's heap keeps the holes that variable-length batches leave; tcmalloc reuses them, for a peak
RSS about a fifth lower at the same speed (bench/notes.md). No torch import: the console command
decides before anything heavy loads (cli/allocator.py); the web page's jobs use it too.
"""

from __future__ import annotations

import ctypes.util
import os

#: Commands run under tcmalloc: the ones whose heap churns batch after batch. Evaluation's
#: activations of a few MB each fault in fresh pages on every op under glibc: the quickstart's
#: `eval --compare` takes 16.0 s under tcmalloc against 17.6 s (medians of 4, bench/notes.md).
#: `plan` times the machine for a `train` that runs on tcmalloc: bf16 attention over a
#: 512-token example took 15-16 ms a call under glibc (fresh pages for its score buffers) and
#: 8.3 ms under tcmalloc, as in training, so a plan on glibc predicted lora-512-8 at 1.6x.
COMMANDS = frozenset({"train", "eval", "plan"})
#: TUNEFORGE_ALLOCATOR=system keeps glibc's malloc.
SWITCH = "TUNEFORGE_ALLOCATOR"


def tcmalloc_library() -> str | None:
    """The installed tcmalloc's name for LD_PRELOAD (`make install` installs it), or None."""
    return ctypes.util.find_library("tcmalloc_minimal")


def command_of(argv: list[str]) -> str | None:
    """The subcommand named on a `tuneforge` command line (flags before it skipped)."""
    return next((a for a in argv if not a.startswith("-")), None)


def preload_env(argv: list[str], environ: dict[str, str], library: str | None) -> dict | None:
    """The environment to run `tuneforge argv` in, or None to leave it as it is: not a training
    command, switched off, tcmalloc missing, or a preload (ours or the user's) already set."""
    if command_of(argv) not in COMMANDS or library is None:
        return None
    if environ.get(SWITCH, "tcmalloc") != "tcmalloc" or environ.get("LD_PRELOAD"):
        return None
    # tcmalloc reports every allocation over 1 GB on stderr; a dense checkpoint makes several.
    quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    return {**environ, **quiet, "LD_PRELOAD": library, SWITCH: "tcmalloc"}


def heap_allocator() -> str:
    """tcmalloc or jemalloc when preloaded, else glibc (from this process's memory map)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            text = maps.read()
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in text), "glibc")


def training_heap(environ: dict[str, str] | None = None) -> str:
    """The heap a `tuneforge train` started from here would run on, for a plan made in another
    process: this one's when it is preloaded, tcmalloc where the console command would preload
    it, else glibc."""
    current = heap_allocator()
    if current not in ("glibc", "unknown"):
        return current
    env = dict(os.environ if environ is None else environ)
    return "tcmalloc" if preload_env(["train"], env, tcmalloc_library()) else "glibc"

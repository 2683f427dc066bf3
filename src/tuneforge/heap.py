"""The malloc a process runs on, and the environment that puts training and evaluation on tcmalloc.

glibc's heap keeps the holes that variable-length batches leave; tcmalloc reuses them, for a peak
RSS about a fifth lower at the same speed (bench/notes.md). No torch import: the console command
decides before anything heavy loads (cli/allocator.py); the web page's jobs use it too. Also this
process's heap as the plan and a run measure it: free pages handed back, the peak reset and read.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
from pathlib import Path

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


def release_free_heap() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system (malloc_trim), so the
    resident memory is what is live; a no-op off glibc."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Start this process's peak-resident-memory count again from what it holds now (Linux 4.0+
    /proc/self/clear_refs "5"), so that a run inside a long-lived process (a test session, a
    notebook) measures its own peak, not the process's. False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's peak resident memory since exec or the last reset_peak_rss (VmHWM;
    getrusage's ru_maxrss where /proc cannot be read — it is never reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

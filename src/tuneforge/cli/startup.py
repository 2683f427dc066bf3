"""Start-up and exit of a `tuneforge` process: heavy imports with the garbage collector off, then
frozen (`gc.freeze`), and no last walk over the whole heap when the process ends.

Importing torch and transformers creates millions of objects and frees none in cycles, yet the
collector walks them again and again while they load and once more at exit: 1.4 s of the
quickstart's `eval --compare` (bench/notes.md). Only for a process that runs one command and ends
(`tuneforge ...`, `python -m tuneforge.cli ...`); `cli.main()` called in-process (tests, notebooks)
leaves the collector as it is.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from tuneforge.heap import command_of

#: Commands that load a model, so import torch and transformers' model code anyway.
MODEL_COMMANDS = frozenset(
    {
        "train",
        "cv",
        "compare",
        "synthesize",
        "meta-train",
        "eval",
        "generate",
        "export",
        "serve",
        "retrain",
    }
)


def import_frozen() -> None:
    """Import torch and transformers' modelling code with the collector off, then freeze every
    object alive: later collections skip them (they are never garbage)."""
    gc.disable()
    try:
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    finally:
        gc.enable()
    gc.freeze()


def run_process(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """`main(argv)` as the whole life of this process: a model command imports its heavy
    libraries frozen first, and whatever is alive at the end is frozen too, so that the
    interpreter's exit does not walk it once more (nothing is collected after that)."""
    if command_of(argv) in MODEL_COMMANDS:
        import_frozen()
    try:
        return main(argv)
    finally:
        gc.freeze()

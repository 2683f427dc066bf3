"""The `tuneforge` command: argument parsing, one module per command group, one error handler.

Each module in COMMAND_GROUPS adds its subcommands with `add_parsers`; the recipes do the work.
A mistake the user can fix is printed as one `error: ...` message with its exit code, never as a
traceback (`-v` shows the traceback and third-party log lines for anyone who wants them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from typing import NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tuneforge.cli import (  # noqa: E402  (after the env defaults)
    augment,
    data,
    evaluate,
    export,
    feedback,
    models,
    plan,
    serve,
    settings,
    train,
    ui,
)
from tuneforge.errors import USER_ERROR_EXIT  # noqa: E402

#: Every command group, in the order `tuneforge --help` lists them.
COMMAND_GROUPS = (
    train,
    data,
    augment,
    evaluate,
    export,
    serve,
    feedback,
    plan,
    models,
    ui,
    settings,
)

log = logging.getLogger("tuneforge")


def _setup_logging(verbose: bool = False) -> None:
    """tuneforge's own messages on the terminal; third-party warnings only with -v."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)\.")
    # the GGUF writer; llama.cpp's native log; bitsandbytes, which on an AVX512-BF16 CPU warns at
    # import that an optional kernel package is missing
    noisy_loggers = ("gguf", "llama-cpp-python", "bitsandbytes")
    for noisy in ("transformers", "accelerate", "peft", "jieba", "absl", "httpx", *noisy_loggers):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line `error: ...` (subparsers inherit the class), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tuneforge", description="Fine-tune causal language models.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="full tracebacks and third-party warnings"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    import tuneforge.methods  # noqa: F401  (registers every method's options with the config)
    from tuneforge.errors import TuneforgeError
    from tuneforge.paths import output_error

    try:
        return int(args.func(args) or 0)
    except TuneforgeError as err:
        return _fail(err, err, args.verbose)
    except FileNotFoundError as err:
        return _fail(err, f"{err.filename or err}: not found", args.verbose)
    except OSError as err:  # a full disk or read-only directory under a writer we do not wrap
        mapped = output_error(err)
        if mapped is None:
            raise
        return _fail(err, mapped, args.verbose)


def _fail(err: BaseException, message: object, verbose: bool) -> int:
    """Print `error: FIRST LINE`, further lines indented (bad rows, config problems); the
    traceback only with -v."""
    if verbose:
        traceback.print_exception(err)
    first, *rest = str(message).splitlines() or [""]
    lines = [f"error: {first}"] + [line if line[:1].isspace() else f"  {line}" for line in rest]
    print("\n".join(lines), file=sys.stderr)
    return getattr(message, "exit_code", USER_ERROR_EXIT)


if __name__ == "__main__":
    sys.exit(main())

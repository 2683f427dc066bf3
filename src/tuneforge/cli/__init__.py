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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tuneforge.cli import data, evaluate, settings, train, ui  # noqa: E402  (after the env defaults)

#: Every command group, in the order `tuneforge --help` lists them.
COMMAND_GROUPS = (train, data, evaluate, settings, ui)

log = logging.getLogger("tuneforge")


def _setup_logging(verbose: bool = False) -> None:
    """tuneforge's own messages on the terminal; third-party warnings only with -v."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)\.")
    for noisy in ("transformers", "accelerate", "peft", "jieba", "absl", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge", description="Fine-tune causal language models."
    )
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

    try:
        return int(args.func(args) or 0)
    except TuneforgeError as err:
        return _fail(err, err.exit_code, args.verbose)
    except FileNotFoundError as err:
        return _fail(err, 2, args.verbose)


def _fail(err: BaseException, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(err)
    print(f"error: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

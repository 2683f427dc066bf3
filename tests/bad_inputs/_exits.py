"""A stand-in program that ends the way argv[1] says (tests only), run both forked and as
`python -m _exits` to show the two ways of running a row end alike. Judges nothing itself.
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    """Write to both streams without flushing, then end as asked: code, message, exception ..."""
    how = sys.argv[1]
    print(f"stdout of {how}")  # block-buffered: lost unless the process flushes on the way out
    print(f"stderr of {how}", file=sys.stderr)
    if how == "code":
        sys.exit(3)
    if how == "message":
        sys.exit("stopped: a message, not a code")
    if how == "none":
        sys.exit()
    if how == "raise":
        raise ValueError("boom")
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "argparse":
        argparse.ArgumentParser(prog="probe").parse_args(sys.argv[2:])
    if how == "cwd":  # `python -m` puts the working directory first on sys.path
        print(sys.path[0], sys.argv[0].endswith("_exits.py"))


main()

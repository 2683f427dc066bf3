"""`tuneforge config`: every key with its default and doc, or a resolved config as YAML.

Argument parsing and printing only; the config package describes itself.
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print every config key with its default and doc, or a resolved config"
    )
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    from tuneforge.config import describe, load_config

    if args.config:
        import yaml

        resolved = load_config(args.config, args.overrides).to_dict()
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        return 0
    for path, default, doc in describe():
        print(f"{path:32} {default:24} {doc}")
    return 0

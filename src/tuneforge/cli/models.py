"""`tuneforge models [--data FILE]`: the built-in models side by side, and how each tokenises
the user's data, so that the choice is made on numbers.

Argument parsing and printing only; the table is recipes/models.py, the registry models.py's.
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the built-in models; with --data, how each tokenises your data",
        description="Built-in models with parameters, context length, languages and licence; "
        "with --data, tokens per character and the share of rows over --max-length.",
    )
    p.add_argument("--data", help="a data file (jsonl / json / csv / parquet) to measure")
    p.add_argument("--max-length", type=int, default=512, help="data.max_length to check against")
    p.add_argument("--template", help="chat template for tokenizers without one (default chatml)")
    p.add_argument(
        "--model", action="append", default=[], help="also list a local HF directory (repeatable)"
    )
    p.add_argument(
        "--limit", type=int, default=2000, help="measure the first N rows (default 2000)"
    )
    p.add_argument(
        "--accept-license",
        metavar="NAME",
        help="accept a built-in model's licence once (those marked 'accept' in the table)",
    )
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from tuneforge.errors import UsageError
    from tuneforge.models import BUILTIN_MODELS, check_license
    from tuneforge.recipes.models import model_rows

    if args.max_length < 1 or args.limit < 1:
        raise UsageError("--max-length and --limit: must be at least 1")
    if args.accept_license:
        if args.accept_license not in BUILTIN_MODELS:
            raise UsageError(
                f"--accept-license: {args.accept_license!r} is not a built-in model "
                f"({', '.join(BUILTIN_MODELS)})"
            )
        check_license(args.accept_license, accept=True)
        print(f"licence of {args.accept_license} accepted")
        return 0
    if args.data is not None:
        from pathlib import Path

        if not Path(args.data).is_file():
            raise UsageError(f"--data: {args.data} does not exist")
    rows = model_rows(
        args.data,
        max_length=args.max_length,
        template=args.template,
        extra=args.model,
        limit=args.limit,
    )
    print(format_rows(rows, with_data=args.data is not None))
    return 0


def format_rows(rows: list[dict], with_data: bool) -> str:
    head = f"{'model':<30}{'params':>9}{'context':>9}  {'languages':<14}{'licence':<22}"
    if with_data:
        head += f"{'tokens/char':>12}{'> max_length':>14}"
    lines = [head]
    for r in rows:
        licence = r["license"] + (" (accept)" if r["accept_license"] else "")
        line = (
            f"{r['name']:<30}{r['params'] / 1e6:>8.1f}M{r['context'] or '?':>9}  "
            f"{r['languages']:<14}{licence:<22}"
        )
        if with_data and "tokens_per_char" in r:
            line += f"{r['tokens_per_char']:>12.2f}{r['over_max_length']:>13.1%}"
        elif with_data:
            line += "  not installed: " + r["install"]
        lines.append(line)
    if with_data and any("rows" in r for r in rows):
        r = next(r for r in rows if "rows" in r)
        lines.append(f"(measured on {r['rows']} rows; max_length {r['max_length']})")
    return "\n".join(lines)

"""`tuneforge export`: a finished run as a merged HF model, GGUF files for llama.cpp / Ollama, or NF4.

Argument parsing and printing only; recipes/export.py does the work. Exit 1 means an artefact
was written but failed its re-check (--max-regression); it stays, marked failed in export.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REGRESSION_EXIT = 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="merged HF model, GGUF (llama.cpp / Ollama) or NF4, re-checked on held-out data",
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", required=True, choices=["merged", "gguf", "nf4"], dest="fmt")
    p.add_argument(
        "--quant",
        default="q4_k_m",
        help="GGUF types, comma-separated: q8_0, q6_k, q5_k_m, q4_k_m, q4_k_s, q4_0, f16, bf16, "
        "f32 (default q4_k_m)",
    )
    p.add_argument("--out", help="output directory (default: RUN_DIR/export-FORMAT)")
    p.add_argument("--data", help="held-out file to re-check on (default: the run's validation)")
    p.add_argument(
        "--max-regression",
        action="append",
        default=[],
        metavar="METRIC=DELTA",
        help="fail (exit 1) when an artefact loses more than DELTA on METRIC against the "
        "unmerged run: loss, perplexity, accuracy, macro_f1 (accuracy in points); repeatable",
    )
    p.add_argument("--limit", type=int, default=200, help="held-out examples re-checked")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available)")
    p.add_argument("--no-recheck", action="store_true", help="skip the quality re-check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tuneforge.export.quantize import parse_quant_list
    from tuneforge.export.recheck import parse_max_regression, report_table
    from tuneforge.recipes.export import ExportJob, export_run

    job = ExportJob(
        run_dir=Path(args.run_dir),
        fmt=args.fmt,
        quants=parse_quant_list(args.quant),
        out=Path(args.out) if args.out else None,
        data=args.data,
        max_regression=parse_max_regression(args.max_regression),
        overwrite=args.overwrite,
        limit=args.limit,
        threads=args.threads,
        recheck=not args.no_recheck,
    )
    outcome = export_run(job)
    if outcome.report is not None:
        print(report_table(outcome.report))
    print(f"\nexport: {outcome.out_dir}  ({', '.join(outcome.files)})")
    if not outcome.passed:
        print("re-check failed: see export.json (the artefacts are kept, marked failed)")
        return REGRESSION_EXIT
    return 0

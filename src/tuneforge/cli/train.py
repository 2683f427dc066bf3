"""`tuneforge train`, `cv` and `compare`: the commands that fine-tune.

Argument parsing and printing only; the recipes in `tuneforge.recipes` do the work.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tuneforge.errors import UsageError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint in output.dir (auto) or a named one "
        "(step-000120 or its path); exit 2 if none is usable",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the base model, data, max_length, batch size, method, seed, "
        "schedule or number of processes changed (the result then differs from an "
        "uninterrupted run)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (torchrun --standalone for you; "
        "train.strategy picks ddp or fsdp2); multi-node: see docs/scaling.md",
    )
    p.add_argument(
        "--port", type=int, help="with --nproc: the rendezvous port (default: a free one)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="train even when the plan predicts more memory than is available",
    )
    p.set_defaults(func=cmd_train)

    _add_cv_and_compare(sub)


def _add_cv_and_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation: K runs, mean ± std of every metric")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser(
        "compare", help="train several methods on one config and budget; table to a Markdown file"
    )
    p.add_argument("config", help="the base run config (its method section is replaced)")
    p.add_argument(
        "--methods",
        help="comma-separated NAME[:key=value...] specs; train.KEY=... sets a train key "
        "(default: every method with a suited rate)",
    )
    p.add_argument("--test", required=True, help="held-out file for loss and accuracy")
    p.add_argument(
        "--out", default="runs/compare", help="work directory (finished runs are reused)"
    )
    p.add_argument("--doc", default="docs/methods.md", help="Markdown file to write the table into")
    p.add_argument("--steps", type=int, help="override train.max_steps for every method")
    p.add_argument("--limit", type=int, help="evaluate on the first N test rows only")
    p.add_argument(
        "--threads", type=int, help="torch threads per process (OMP_NUM_THREADS); default: cores"
    )
    p.set_defaults(func=cmd_compare)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    resume, overrides = args.resume, list(args.overrides)
    if resume is not None and "=" in resume and not Path(resume).exists():
        resume, overrides = "auto", [*overrides, resume]  # `--resume key=value`: argparse took it
    cfg = load_config(args.config, overrides)  # fails before anything heavy is imported
    if args.nproc is not None:
        return _launch(args, resume, overrides)
    if args.port is not None:
        raise UsageError("--port: only with --nproc N")
    from tuneforge.recipes.train import run_training
    from tuneforge.train.guards import interrupt_exit_code

    outcome = run_training(
        cfg,
        show_progress=not args.quiet,
        resume=resume,
        allow_config_change=args.allow_config_change,
        force=args.force,
    )
    if outcome.interrupted:
        code = interrupt_exit_code(outcome.interrupted)
        if _is_main_rank():
            print(
                f"\ninterrupted (exit {code}); checkpoint: {outcome.checkpoint}\n"
                f"continue with: tuneforge train {args.config} ... --resume auto",
                file=sys.stderr,
            )
        return code
    s = outcome.summary
    if _is_main_rank():
        print(f"\nrun dir: {outcome.run_dir}")
        print(
            f"steps {s['steps']}  train_loss {s['train_loss']:.4f}  tokens/s {s['tokens_per_s']:.0f}  "
            f"wall {s['train_runtime_s']:.1f}s  peak {s['peak_memory_mb']:.0f} MB"
        )
        if s["eval"]:
            print(
                "eval: "
                + "  ".join(f"{k} {v:.4f}" for k, v in s["eval"].items() if isinstance(v, float))
            )
    return 0


def _launch(args: argparse.Namespace, resume: str | None, overrides: list[str]) -> int:
    """`train ... --nproc N`: the same command on N processes (the config was checked once)."""
    from tuneforge.train.launch import launch_local

    argv = ["-v"] if args.verbose else []
    argv += ["train", args.config, *overrides]
    argv += ["--quiet"] if args.quiet else []
    argv += ["--resume", resume] if resume is not None else []
    argv += ["--allow-config-change"] if args.allow_config_change else []
    return launch_local(argv, args.nproc, args.port)


def cmd_cv(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tuneforge.recipes.cv import run_cross_validation
    from tuneforge.reporting.tables import cv_table

    result = run_cross_validation(cfg, args.folds, show_progress=not args.quiet)
    print(cv_table(result))
    print(f"per-fold table and mean ± std: {Path(cfg.output.dir) / 'cv.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tuneforge.recipes.compare import CompareJob, run_compare

    job = CompareJob(
        config=args.config,
        methods=args.methods,
        test=args.test,
        out=Path(args.out),
        doc=Path(args.doc),
        steps=args.steps,
        limit=args.limit,
        threads=args.threads,
    )
    return run_compare(job)

"""`tuneforge augment`, `synthesize` and `meta-train`: more from scarce data.

Argument parsing and printing only; tuneforge.augment and the recipes do the work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tuneforge.errors import UsageError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "augment", help="EDA copies of each row's prompt side (synonym, insert, swap, delete)"
    )
    p.add_argument("data", help="a training file (.jsonl, .json, .csv, .parquet)")
    p.add_argument("--ops", default="synonym,insert,swap,delete", help="comma-separated ops")
    p.add_argument("--n", type=int, default=4, help="copies per row (copy c applies op c mod k)")
    p.add_argument("--alpha", type=float, default=0.1, help="share of words a copy changes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lang", default="auto", help="auto (per text, by script), zh (Cilin) or en (WordNet)"
    )
    p.add_argument("--format", default="auto", help="row format (default: detected)")
    p.add_argument(
        "--targets", action="store_true", help="also change answers (labels never change)"
    )
    p.add_argument("--only-new", action="store_true", help="write the copies without the rows")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser(
        "synthesize", help="a model writes new rows from few-shot seeds; filters keep good ones"
    )
    p.add_argument("--model", required=True, help="a run directory or a base model")
    p.add_argument("--seed-data", required=True, help="the seed rows (any row format)")
    p.add_argument("--n", type=int, required=True, help="rows to keep")
    p.add_argument("--out", required=True, help="output .jsonl (stats beside it: .stats.json)")
    p.add_argument("--labels", help="classification: comma-separated labels to write inputs for")
    p.add_argument("--existing", help="more rows that new ones must not resemble")
    p.add_argument("--shots", type=int, default=4, help="seeds shown per prompt")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--similarity", type=float, default=0.7, help="reject at this ROUGE-L to any row"
    )
    p.add_argument("--min-chars", type=int, default=5)
    p.add_argument("--max-chars", type=int, default=1000)
    p.add_argument("--lang", default="auto", help="auto (the seeds'), zh, en, or any (no check)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser(
        "meta-train", help="Reptile / first-order MAML over tasks: an adapter to start from"
    )
    p.add_argument("config", help="a run config with a meta: section")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. meta.shots=8")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint (auto) or a named one",
    )
    p.set_defaults(func=cmd_meta_train)


def cmd_augment(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tuneforge.augment.rows import AugmentPlan, augment_records
    from tuneforge.data.formats import load_examples, read_records, write_jsonl

    out = Path(args.out)
    if out.suffix.lower() != ".jsonl":
        raise UsageError(f"--out {out}: write a .jsonl file")
    if out.resolve() == Path(args.data).resolve():
        raise UsageError(f"--out {out}: is the input file; choose another path")
    ops = tuple(op.strip() for op in args.ops.split(",") if op.strip())
    plan = AugmentPlan(ops, args.n, args.alpha, args.seed, args.lang, args.targets)
    loaded = load_examples(args.data, args.format, "fail")  # every bad row named, file:line
    if not loaded.examples:
        raise UsageError(f"{args.data}: the file has no rows")
    records = [(f"{args.data}:{line}", rec) for line, rec in read_records(args.data)]
    start = time.perf_counter()
    bar = tqdm(records, desc="augment", unit="row", disable=args.quiet or len(records) < 2000)
    copies, stats = augment_records(bar, loaded.format, plan)
    elapsed = time.perf_counter() - start
    rows = copies if args.only_new else [rec for _, rec in records] + copies
    write_jsonl(out, rows)
    dropped = ", ".join(f"{k} {v}" for k, v in stats.dropped.items()) or "none"
    print(
        f"{out}: {len(rows)} rows ({stats.rows} read, {stats.copies} copies: "
        + ", ".join(f"{k} {v}" for k, v in stats.by_op.items())
        + f"; dropped {dropped}) in {elapsed:.2f}s, {stats.rows / max(elapsed, 1e-9):.0f} rows/s",
        file=sys.stdout,
    )
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from tuneforge.recipes.synthesize import SynthJob, run_synthesis

    job = SynthJob(
        model=args.model,
        seed_data=args.seed_data,
        n=args.n,
        out=Path(args.out),
        labels=[x.strip() for x in args.labels.split(",")] if args.labels else None,
        existing=args.existing,
        shots=args.shots,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        max_similarity=args.similarity,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        lang=args.lang,
    )
    stats = run_synthesis(job, show_progress=not args.quiet)
    print(
        f"{job.out}: kept {stats['kept']} of {stats['generated']} generated "
        f"({stats['kept_share']:.0%}; rejected {stats['rejected'] or 'none'}) in "
        f"{stats['seconds']}s, {stats['generated_rows_per_s']} generated rows/s"
    )
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tuneforge.recipes.meta_train import run_meta_training
    from tuneforge.train.guards import interrupt_exit_code

    outcome = run_meta_training(cfg, show_progress=not args.quiet, resume=args.resume)
    if outcome.interrupted:
        code = interrupt_exit_code(outcome.interrupted)
        print(
            f"interrupted (exit {code}); continue with: tuneforge meta-train {args.config} "
            "--resume auto",
            file=sys.stderr,
        )
        return code
    print(f"run dir: {outcome.run_dir} (start training from it with method.init_from)")
    mean = (outcome.summary.get("held_out") or {}).get("mean")
    if mean:
        print(
            f"held-out query loss after adaptation: meta-adapter {mean['meta']:.4f}, "
            f"fresh adapter {mean['fresh']:.4f}"
        )
    return 0

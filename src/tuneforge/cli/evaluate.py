"""`tuneforge eval`, `score`, `report` and `generate`: look at what a run learned.

Argument parsing and printing only; evaluation and loading live in `evaluation/` and `loading.py`.
"""

from __future__ import annotations

import argparse
import json

from tuneforge.constants import EVAL_METRICS, GENERATION_METRICS
from tuneforge.paths import check_output_path, write_json_atomic


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count, a batch size, a token budget)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


TEMPLATE_HELP = (
    "chat template for a base model without one (chatml, llama3, alpaca, or a jinja template); "
    "a run always uses the template it was trained with"
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run dir or base model on a data file")
    p.add_argument("--model", required=True, help="run dir, HF dir, .gguf or built-in name")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--metrics",
        default="loss,accuracy",
        help="comma-separated: loss, perplexity, accuracy, macro_f1 (label log-likelihood), "
        "bleu, chrf, rouge, exact_match (greedy generation)",
    )
    p.add_argument(
        "--compare",
        help="a base model to put beside it, with deltas; scored with the run's chat template",
    )
    p.add_argument("--template", help=TEMPLATE_HELP)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--limit", type=positive_int, help="evaluate the first N rows only")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="for generation metrics")
    p.add_argument("--lang", choices=["auto", "zh", "en"], default="auto")
    p.add_argument("--zh-rouge", choices=["word", "char"], default="word")
    p.set_defaults(func=cmd_eval)

    _add_score_parser(sub)

    p = sub.add_parser("report", help="(re)write report.html and plots/ of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("generate", help="generate with a run's chat template")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--template", help=TEMPLATE_HELP)
    p.set_defaults(func=cmd_generate)


def _add_score_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="BLEU / chrF / ROUGE / exact match of a predictions file against references",
        description="Score one prediction per line against one reference per line.",
    )
    p.add_argument("--predictions", required=True, help="file with one prediction per line")
    p.add_argument("--references", required=True, help="file with one reference per line")
    p.add_argument(
        "--metrics",
        default="bleu,chrf,rouge",
        help=f"comma-separated, from: {', '.join(GENERATION_METRICS)} (default: bleu,chrf,rouge)",
    )
    p.add_argument(
        "--lang",
        choices=("zh", "en", "auto"),
        default="auto",
        help="zh uses sacrebleu's zh tokenizer and rouge_chinese; auto detects from references",
    )
    p.add_argument(
        "--zh-rouge",
        choices=("word", "char"),
        default="word",
        dest="zh_mode",
        help="Chinese ROUGE units: jieba words or characters (default: word)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: metric -> 0-100 score"
    )
    p.set_defaults(func=cmd_score)


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.evaluation.metrics import parse_metric_list
    from tuneforge.evaluation.offline import evaluate_reference, evaluate_run_and_base
    from tuneforge.loading import run_chat_template
    from tuneforge.reporting.tables import compare_table

    metrics = parse_metric_list(args.metrics, EVAL_METRICS)
    if args.output:
        check_output_path(args.output, "--output")
    gen = {"max_new_tokens": args.max_new_tokens, "lang": args.lang, "zh_mode": args.zh_rouge}
    common = (args.data, metrics, args.batch_size, args.limit)
    rows = {}
    if args.compare:  # the base sees the run's prompts: the run's template unless --template
        template = args.template or run_chat_template(args.model)
        both = evaluate_run_and_base(args.model, args.compare, *common, template=template, **gen)
        if both is not None:  # the run's own base: loaded once
            rows[f"base ({args.compare})"], rows[str(args.model)] = both
        else:
            rows[f"base ({args.compare})"] = evaluate_reference(
                args.compare, *common, template=template, **gen
            )
    if str(args.model) not in rows:
        rows[str(args.model)] = evaluate_reference(
            args.model, *common, template=args.template, **gen
        )
    if args.output:
        write_json_atomic(args.output, rows)
    print(compare_table(rows))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from tuneforge.evaluation.score import format_table, parse_metrics, score_files

    scores = score_files(
        args.predictions,
        args.references,
        parse_metrics(args.metrics),
        lang=args.lang,
        zh_mode=args.zh_mode,
    )
    print(json.dumps(scores, ensure_ascii=False) if args.json else format_table(scores))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuneforge.reporting.htmlreport import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.loading import generate, load_reference

    loaded = load_reference(args.model, args.dtype, template=args.template)
    text = generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens, system=args.system)
    print(text)  # print() ends the answer with a newline, so the shell prompt starts on its own
    return 0

"""Score prediction texts against references: ``tuneforge score`` and its library functions.

Metric math is in metrics.py / textmetrics.py; registering the command is left to cli.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.evaluation.lang import LANGS, check_lang, detect_lang
from tuneforge.evaluation.metrics import check_pairs, exact_match
from tuneforge.evaluation.textmetrics import ZH_MODES, bleu, chrf, rouge

METRICS = ("bleu", "chrf", "rouge", "exact_match")
META_KEY = "meta"  # the one key of a score dict that is not a metric


def parse_metrics(text: str) -> list[str]:
    """``"bleu, rouge"`` -> ``["bleu", "rouge"]``; ValueError naming unknown and allowed names."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"unknown metric(s): {', '.join(unknown) or '(none given)'}; "
            f"allowed: {', '.join(METRICS)}"
        )
    return list(dict.fromkeys(names))


def score_texts(
    preds: Sequence[str],
    refs: Sequence[str],
    metrics: Sequence[str],
    lang: str = "auto",
    zh_mode: str = "word",
) -> dict[str, Any]:
    """Requested metrics on a 0-100 scale, plus ``"meta"`` (lang, count, signatures).

    ``"rouge"`` yields ``rouge1``, ``rouge2`` and ``rougeL``. ``lang="auto"`` detects zh or en
    from the references.
    """
    metrics = parse_metrics(",".join(metrics))
    check_pairs(preds, refs)
    lang = detect_lang(refs) if lang == "auto" else check_lang(lang)
    scores: dict[str, Any] = {}
    meta: dict[str, Any] = {"lang": lang, "n": len(preds), "signatures": {}}
    for name in metrics:
        if name == "bleu":
            result = bleu(preds, refs, lang)
            scores["bleu"] = result["bleu"]
            meta["signatures"]["bleu"] = result["signature"]
        elif name == "chrf":
            result = chrf(preds, refs)
            scores["chrf"] = result["chrf"]
            meta["signatures"]["chrf"] = result["signature"]
        elif name == "rouge":
            scores.update(rouge(preds, refs, lang, zh_mode))
            meta["signatures"]["rouge"] = _rouge_signature(lang, zh_mode)
        else:
            scores["exact_match"] = exact_match(preds, refs)
    scores[META_KEY] = meta
    return scores


def _rouge_signature(lang: str, zh_mode: str) -> str:
    if lang == "zh":
        tokens = "jieba" if zh_mode == "word" else "char"
        return f"lib:rouge_chinese|tok:{tokens}|avg:pairs|stat:f"
    return "lib:rouge_score|tok:default|stemmer:no|avg:pairs|stat:f"


def read_lines(path: str | Path) -> list[str]:
    """One text per line, trailing whitespace dropped: the way sacrebleu's CLI reads files."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip() for line in f]


def score_files(
    pred_path: str | Path,
    ref_path: str | Path,
    metrics: Sequence[str],
    lang: str = "auto",
    zh_mode: str = "word",
) -> dict[str, Any]:
    """score_texts on two line-aligned files; a line-count mismatch names both files and counts."""
    preds, refs = read_lines(pred_path), read_lines(ref_path)
    if len(preds) != len(refs):
        raise ValueError(
            f"line counts differ: {pred_path} has {len(preds)} predictions, "
            f"{ref_path} has {len(refs)} references"
        )
    return score_texts(preds, refs, metrics, lang=lang, zh_mode=zh_mode)


def format_table(scores: dict[str, Any]) -> str:
    """An aligned ``metric  score`` table followed by the language and the signatures."""
    meta = scores[META_KEY]
    rows = [(name, f"{value:.2f}") for name, value in scores.items() if name != META_KEY]
    width = max(len(name) for name, _ in rows + [("metric", "")])
    lines = [f"{'metric':<{width}}  score"]
    lines += [f"{name:<{width}}  {value:>6}" for name, value in rows]
    lines.append(f"lang: {meta['lang']}   n: {meta['n']}")
    lines += [f"{name} signature: {sig}" for name, sig in meta["signatures"].items()]
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="file with one prediction per line")
    parser.add_argument("--references", required=True, help="file with one reference per line")
    parser.add_argument(
        "--metrics",
        default="bleu,chrf,rouge",
        help=f"comma-separated, from: {', '.join(METRICS)} (default: bleu,chrf,rouge)",
    )
    parser.add_argument(
        "--lang",
        choices=(*LANGS, "auto"),
        default="auto",
        help="zh uses sacrebleu's zh tokenizer and rouge_chinese; auto detects from references",
    )
    parser.add_argument(
        "--zh-rouge",
        choices=ZH_MODES,
        default="word",
        dest="zh_mode",
        help="Chinese ROUGE units: jieba words or characters (default: word)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: metric -> 0-100 score"
    )


def add_score_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``score`` on a subparsers object; ``run_score`` is set as ``func``."""
    parser = subparsers.add_parser(
        "score",
        help="BLEU / chrF / ROUGE / exact match of a predictions file against references",
        description="Score one prediction per line against one reference per line.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_score)
    return parser


def run_score(args: argparse.Namespace) -> int:
    """Run the command: 0 on success, 2 for unknown metric names, 1 for unreadable input."""
    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as e:
        print(f"tuneforge score: {e}", file=sys.stderr)
        return 2
    try:
        scores = score_files(
            args.predictions, args.references, metrics, lang=args.lang, zh_mode=args.zh_mode
        )
    except (OSError, UnicodeDecodeError, ValueError) as e:
        print(f"tuneforge score: {e}", file=sys.stderr)
        return 1
    print(json.dumps(scores, ensure_ascii=False) if args.json else format_table(scores))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tuneforge.evaluation.score``), same flags as the CLI."""
    parser = argparse.ArgumentParser(
        prog="tuneforge score", description="Score one prediction per line against references."
    )
    _add_arguments(parser)
    return run_score(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

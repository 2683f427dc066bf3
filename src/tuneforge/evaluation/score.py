"""Score prediction texts against references: the library behind ``tuneforge score``.

Metric math is in metrics.py / textmetrics.py; the command line is in cli/evaluate.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.constants import GENERATION_METRICS as METRICS
from tuneforge.errors import DataError
from tuneforge.evaluation.lang import check_lang, detect_lang
from tuneforge.evaluation.metrics import check_pairs, exact_match, parse_metric_list
from tuneforge.evaluation.textmetrics import bleu, chrf, rouge

META_KEY = "meta"  # the one key of a score dict that is not a metric


def parse_metrics(text: str) -> list[str]:
    """``"bleu, rouge"`` -> ``["bleu", "rouge"]``; UsageError naming unknown and allowed names."""
    return parse_metric_list(text, METRICS)


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
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a text file with one text per line")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            return [line.rstrip() for line in f]
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not a UTF-8 text file (invalid byte at {err.start}); give one text per line"
        ) from None


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
        raise DataError(
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

"""Corpus BLEU and chrF (sacrebleu) and ROUGE (rouge_score for en, rouge_chinese + jieba for zh).

Glue only: scores come from the reference libraries (imported on first use: 0.3 s that a loss
or accuracy evaluation does not pay); choosing the language is left to callers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from tuneforge.evaluation.lang import CJK_CLASS, check_lang
from tuneforge.evaluation.metrics import check_pairs

ZH_MODES = ("word", "char")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_ROUGE_CHINESE_KEYS = {"rouge1": "rouge-1", "rouge2": "rouge-2", "rougeL": "rouge-l"}
# Char mode: one token per CJK ideograph, a run of other word characters, or one other symbol.
_CHAR_TOKEN = re.compile(f"[{CJK_CLASS}]|[^\\W{CJK_CLASS}]+|\\S")


@functools.cache
def _jieba():
    import jieba

    jieba.setLogLevel(60)
    return jieba


def bleu(preds: Sequence[str], refs: Sequence[str], lang: str) -> dict[str, float | str]:
    """Corpus BLEU (0-100), one reference per prediction; sacrebleu's ``zh`` tokenizer for zh."""
    from sacrebleu.metrics import BLEU

    check_pairs(preds, refs)
    metric = BLEU(tokenize="zh" if check_lang(lang) == "zh" else "13a")
    score = metric.corpus_score(list(preds), [list(refs)]).score
    return {"bleu": float(score), "signature": str(metric.get_signature())}


def chrf(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float | str]:
    """Corpus chrF (0-100) with sacrebleu's defaults (character 6-grams, beta 2)."""
    from sacrebleu.metrics import CHRF

    check_pairs(preds, refs)
    metric = CHRF()
    score = metric.corpus_score(list(preds), [list(refs)]).score
    return {"chrf": float(score), "signature": str(metric.get_signature())}


def segment_zh(text: str, zh_mode: str = "word") -> str:
    """Space-joined tokens as rouge_chinese expects: jieba words, or single CJK characters."""
    if zh_mode == "word":
        return " ".join(token for token in _jieba().cut(text) if token.strip())
    if zh_mode == "char":
        return " ".join(_CHAR_TOKEN.findall(text))
    raise ValueError(f"zh_mode: {zh_mode!r} is not one of {', '.join(ZH_MODES)}")


def rouge(
    preds: Sequence[str], refs: Sequence[str], lang: str, zh_mode: str = "word"
) -> dict[str, float]:
    """Mean per-pair ROUGE-1/2/L F-measure, 0-100.

    English uses rouge_score without stemming; Chinese uses rouge_chinese on jieba words
    (``zh_mode="word"``) or characters (``"char"``), because rouge_score's tokenizer drops CJK.
    """
    from rouge_score.rouge_scorer import RougeScorer

    check_pairs(preds, refs)
    if check_lang(lang) == "zh":
        return _rouge_zh(preds, refs, zh_mode)
    scorer = RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    pair_scores = [scorer.score(ref, pred) for pred, ref in zip(preds, refs, strict=True)]
    return {
        key: 100.0 * sum(s[key].fmeasure for s in pair_scores) / len(pair_scores)
        for key in ROUGE_KEYS
    }


def _rouge_zh(preds: Sequence[str], refs: Sequence[str], zh_mode: str) -> dict[str, float]:
    from rouge_chinese import Rouge

    hyps = [segment_zh(p, zh_mode) for p in preds]
    segmented_refs = [segment_zh(r, zh_mode) for r in refs]
    # rouge_chinese raises on an empty side; such a pair scores 0 and still counts in the mean.
    kept = [(h, r) for h, r in zip(hyps, segmented_refs, strict=True) if h.strip() and r.strip()]
    if not kept:
        return {key: 0.0 for key in ROUGE_KEYS}
    avg = Rouge().get_scores([h for h, _ in kept], [r for _, r in kept], avg=True)
    share = len(kept) / len(hyps)
    return {key: 100.0 * share * avg[_ROUGE_CHINESE_KEYS[key]]["f"] for key in ROUGE_KEYS}

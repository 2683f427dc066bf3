"""Pure metric math for fine-tuning: perplexity, token accuracy, exact match, classification.

Text-overlap metrics (BLEU, chrF, ROUGE) are in textmetrics.py; counting tokens is the loop's job.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

from tuneforge.errors import UsageError
from tuneforge.evaluation.lang import CJK_CLASS, is_cjk

#: Metrics reported on a 0-100 scale, where higher is better (loss and perplexity are neither).
SCORE_METRICS = frozenset(
    {"accuracy", "macro_f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"}
)

# A word character that is not CJK: Chinese labels may sit inside a sentence with no spaces.
_LATIN_WORD = f"[^\\W{CJK_CLASS}]"
_LEADING_NON_WORD = re.compile(r"[\W_]*")


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf where exp overflows (loss above ~709.78)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def token_accuracy(correct: int, total: int) -> float:
    """Share of correctly predicted label tokens, in percent (0-100)."""
    if total <= 0:
        raise ValueError(f"token_accuracy: total must be positive, got {total}")
    if not 0 <= correct <= total:
        raise ValueError(f"token_accuracy: correct={correct} is outside 0..total={total}")
    return 100.0 * correct / total


def normalize_answer(text: str) -> str:
    """NFKC, casefold, drop punctuation, collapse whitespace (no article removal: zh and en)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def check_pairs(preds: Sequence[object], refs: Sequence[object]) -> None:
    """Raise a ValueError unless there are as many predictions as references, and some."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no predictions to score")


def exact_match(preds: Sequence[str], refs: Sequence[str], normalize: bool = True) -> float:
    """Percent (0-100) of predictions equal to their reference, after normalize_answer if asked."""
    check_pairs(preds, refs)
    if normalize:
        preds = [normalize_answer(p) for p in preds]
        refs = [normalize_answer(r) for r in refs]
    return 100.0 * sum(p == r for p, r in zip(preds, refs, strict=True)) / len(preds)


def classification_report(
    preds: Sequence[str | None], refs: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy and macro-F1 over ``labels``, in percent.

    A prediction outside the label set (or None) is wrong: a false negative for its reference
    label and a false positive for no label. Every label counts in the macro average, one with
    no true and no predicted example scores F1 = 0 (as sklearn with ``zero_division=0``).
    """
    check_pairs(preds, refs)
    labels = list(dict.fromkeys(labels))
    if not labels:
        raise ValueError("classification_report: empty label set")
    for i, ref in enumerate(refs):
        if ref not in labels:
            raise ValueError(f"reference {i} is {ref!r}, not one of the labels {labels}")
    f1s = [_f1(preds, refs, label) for label in labels]
    accuracy = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
    return {"accuracy": 100.0 * accuracy, "macro_f1": 100.0 * sum(f1s) / len(f1s)}


def _f1(preds: Sequence[str | None], refs: Sequence[str], label: str) -> float:
    tp = sum(p == label and r == label for p, r in zip(preds, refs, strict=True))
    fp = sum(p == label and r != label for p, r in zip(preds, refs, strict=True))
    fn = sum(p != label and r == label for p, r in zip(preds, refs, strict=True))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def _label_regex(label: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive pattern; no boundary is asked for at a CJK edge."""
    words = label.split()
    if not words:
        raise ValueError("match_label: labels must not be empty")
    body = r"\s+".join(re.escape(w) for w in words)
    left = "" if is_cjk(label.strip()[0]) else f"(?<!{_LATIN_WORD})"
    right = "" if is_cjk(label.strip()[-1]) else f"(?!{_LATIN_WORD})"
    return re.compile(left + body + right, re.IGNORECASE)


def _unique_longest(spans: dict[str, list[tuple[int, int]]]) -> str | None:
    """The one label left after dropping labels found only inside a longer label's match."""

    def inside_other(label: str, span: tuple[int, int]) -> bool:
        return any(
            o != label and s[0] <= span[0] and span[1] <= s[1] and s[1] - s[0] > span[1] - span[0]
            for o, other in spans.items()
            for s in other
        )

    kept = [lb for lb, found in spans.items() if not all(inside_other(lb, s) for s in found)]
    return kept[0] if len(kept) == 1 else None


def match_label(generated: str, labels: Sequence[str]) -> str | None:
    """Map a generated answer onto one of ``labels`` (returned as spelled in ``labels``).

    Case-insensitive whole-word match. A label at the start of the answer (after leading
    punctuation) wins; otherwise the one label found anywhere. None when no label is found or
    when two different labels tie (a label found only inside a longer one does not count).
    """
    text = unicodedata.normalize("NFKC", generated)
    regexes = {label: _label_regex(unicodedata.normalize("NFKC", label)) for label in labels}
    lead = _LEADING_NON_WORD.match(text).end()
    at_start = {}
    for label, regex in regexes.items():
        found = regex.match(text, lead)
        if found:
            at_start[label] = [found.span()]
    if at_start:
        return _unique_longest(at_start)
    anywhere = {}
    for label, regex in regexes.items():
        found = [m.span() for m in regex.finditer(text)]
        if found:
            anywhere[label] = found
    return _unique_longest(anywhere)


def parse_metric_list(text: str, allowed: Sequence[str], option: str = "--metrics") -> list[str]:
    """``"bleu, rouge"`` -> ``["bleu", "rouge"]`` (deduplicated, in order); UsageError naming
    the unknown names and the allowed ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise UsageError(
            f"{option}: unknown metric(s) {', '.join(unknown) or '(none given)'}; "
            f"allowed: {', '.join(allowed)}"
        )
    return list(dict.fromkeys(names))

"""Retrain's promotion gates: the candidate is promoted only if no gated metric got worse beyond its threshold.

Pure functions over the metric dicts evaluation returns (set -> metric -> value); computing the
metrics and acting on the decision is recipes/retrain.py's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tuneforge.errors import FeedbackError

#: Label metrics a run's `eval.metrics` can name; in percent, higher is better, gated on a drop.
LABEL_GATES = ("accuracy", "macro_f1")
#: Default largest allowed drop of a label metric, in percentage points (accuracy 80.0 -> 78.0).
DEFAULT_MAX_DROP = 2.0
#: How a gate judges (parent, candidate, threshold): loss may rise by a fraction of the parent's,
#: a label metric may drop by percentage points (1e-9: a drop of exactly the limit passes).
RULES: dict[str, Callable[[float, float, float], bool]] = {
    "relative rise": lambda p, c, limit: c <= p * (1 + limit),
    "absolute drop": lambda p, c, limit: c >= p - limit - 1e-9,
}


def parse_max_drop(items: Iterable[str]) -> dict[str, float]:
    """`--max-drop METRIC=X` values as {metric: X}: a label metric and percentage points in [0, 100]."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in LABEL_GATES:
            raise FeedbackError(
                f"--max-drop: {item!r} is not METRIC=X with METRIC one of "
                f"{', '.join(LABEL_GATES)} (e.g. accuracy=2 for 2 percentage points)"
            )
        try:
            drop = float(value)
        except ValueError:
            drop = float("nan")
        if not 0.0 <= drop <= 100.0:
            raise FeedbackError(f"--max-drop: {item!r}: X must be percentage points in [0, 100]")  # fmt: skip
        out[name] = drop
    return out


def gated_label_metrics(eval_metrics: Iterable[str], max_drop: Mapping[str, float]) -> list[str]:
    """The label metrics to gate on: those the parent run evaluated, and those given a --max-drop."""
    named = set(eval_metrics) | set(max_drop)
    return [m for m in LABEL_GATES if m in named]


def gate_checks(
    parent: Mapping[str, Mapping[str, Any]],
    candidate: Mapping[str, Mapping[str, Any]],
    max_regression: float,
    max_drop: Mapping[str, float] | None = None,
    label_metrics: Iterable[str] = LABEL_GATES,
) -> list[dict[str, Any]]:
    """One check per held-out set and gated metric, with both values, its threshold and verdict.

    loss: the candidate fails when its loss exceeds parent * (1 + max_regression) (relative).
    Each of `label_metrics` present in both results for that set: it fails when it is lower
    than parent - max_drop[metric] (percentage points; default DEFAULT_MAX_DROP).
    """
    wanted = set(label_metrics)
    drops = dict(max_drop or {})
    checks = []
    for name, before in parent.items():
        after = candidate[name]
        checks.append(_check(name, "loss", before, after, "relative rise", max_regression))
        for metric in LABEL_GATES:
            if metric in wanted and metric in before and metric in after:
                limit = drops.get(metric, DEFAULT_MAX_DROP)
                checks.append(_check(name, metric, before, after, "absolute drop", limit))
    return checks


def _check(
    name: str, metric: str, before: Mapping[str, Any], after: Mapping[str, Any], rule: str,
    threshold: float,
) -> dict[str, Any]:  # fmt: skip
    """One gate: `metric` of held-out set `name`, parent vs candidate, judged by RULES[rule].

    The check records the rule's name and threshold, so a decision can be read without the code.
    """
    p, c = float(before[metric]), float(after[metric])
    return {"set": name, "metric": metric, "parent": p, "candidate": c, "rule": rule,
            "threshold": threshold, "passed": RULES[rule](p, c, threshold)}  # fmt: skip


def decide(
    parent: Mapping[str, Mapping[str, Any]],
    candidate: Mapping[str, Mapping[str, Any]],
    max_regression: float,
    max_drop: Mapping[str, float] | None = None,
    label_metrics: Iterable[str] = LABEL_GATES,
) -> tuple[bool, str]:
    """(promote?, a one-line reason naming every gate's values) from `gate_checks`."""
    checks = gate_checks(parent, candidate, max_regression, max_drop, label_metrics)
    notes = [f"{c['set']} {c['metric']} {c['parent']:.4f} -> {c['candidate']:.4f}" for c in checks]
    failed = [c for c in checks if not c["passed"]]
    if not failed:
        return True, "; ".join(notes)
    names = ", ".join(
        f"{c['set']} {c['metric']} (allowed {c['rule']} {c['threshold']:g})" for c in failed
    )
    return False, f"worse on {names}: " + "; ".join(notes)

"""Aligned plain-text tables for the terminal: before/after comparisons and per-fold results.

Formatting only; the numbers come from evaluation and the recipes.
"""

from __future__ import annotations

import math
from typing import Any

from tuneforge.evaluation.metrics import SCORE_METRICS


def text_table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; a dashed rule under the first (header) row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_number(value: Any) -> str:
    """Four decimals for floats (4 significant digits when huge), '-' for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 1e5:
            return f"{value:.4g}"
        return f"{value:.4f}"
    return str(value)


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    """One column per model; with two models, a delta column (last minus first)."""
    names = list(rows)
    keys = [k for k in rows[names[0]] if isinstance(rows[names[0]][k], (int, float))]
    header = ["metric", *names] + (["delta"] if len(names) == 2 else [])
    table = [header]
    for key in keys:
        values = [rows[n].get(key) for n in names]
        cells = [key, *(fmt_number(v) for v in values)]
        if len(names) == 2:
            cells.append(_delta(key, values))
        table.append(cells)
    return text_table(table)


def _delta(key: str, values: list[Any]) -> str:
    if key == "examples" or not all(isinstance(v, (int, float)) for v in values):
        return ""
    delta = values[1] - values[0]
    if delta == 0:
        return f"{delta:+.4f}"
    better = (delta > 0) == (key in SCORE_METRICS)
    return f"{delta:+.4f}" + (" better" if better else " worse")


def cv_table(result: dict[str, Any]) -> str:
    """Metrics down, folds across, then mean ± std; the last row counts validation rows."""
    folds = result["per_fold"]
    table = [["metric", *(f"fold-{r['fold']}" for r in folds), "mean ± std"]]
    for name in result["mean"]:
        cells = [name, *(fmt_number(r["metrics"].get(name)) for r in folds)]
        cells.append(f"{fmt_number(result['mean'][name])} ± {fmt_number(result['std'][name])}")
        table.append(cells)
    table.append(["validation rows", *(str(r["validation_rows"]) for r in folds), ""])
    return text_table(table)

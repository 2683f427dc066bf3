"""Training curves as PNG files from a run's metrics.jsonl records (matplotlib, Agg, no pyplot).

Reading the run directory and putting the PNGs into report.html is htmlreport.py's job.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.evaluation.metrics import SCORE_METRICS
from tuneforge.paths import write_bytes_atomic

# Eval keys that are counts, not metrics worth a curve (eval_loss has its own chart).
_NOT_CURVES = {"eval_loss", "eval_tokens"}
_TRAIN = "#1f77b4"
_EVAL = "#d62728"
_WARN = "#ff7f0e"


def split_records(
    records: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training-step records, evaluation records), in file order."""
    train = [r for r in records if "loss" in r and "lr" in r]
    evals = [r for r in records if "eval_loss" in r]
    return train, evals


def metric_names(evals: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric eval_* keys that get a curve, in first-seen order."""
    names: dict[str, None] = {}
    for record in evals:
        for key, value in record.items():
            if key.startswith("eval_") and key not in _NOT_CURVES and _is_number(value):
                names[key] = None
    return list(names)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if _is_number(y) and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i))
    return out


def _figure(width: float = 7.5, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _save(fig, out: Path) -> Path:
    """Render `fig` as PNG in memory and write it to `out` atomically (temp file + rename).

    A crash or a full disk mid-report leaves the previous plot or none, never half a PNG.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(out, buffer.getvalue())
    return out


def _style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_loss(
    train: Sequence[dict[str, Any]],
    evals: Sequence[dict[str, Any]],
    out: Path,
    best_step: int | None = None,
) -> Path:
    """Train loss per step (raw and smoothed) and validation loss per evaluation, one chart."""
    fig = _figure()
    ax = fig.add_subplot()
    steps, losses = _finite([r["step"] for r in train], [r["loss"] for r in train])
    if len(losses) > 20:
        ax.plot(steps, losses, color=_TRAIN, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(losses, 0.8), color=_TRAIN, linewidth=1.8, label="train (smoothed)")
    elif losses:
        ax.plot(steps, losses, color=_TRAIN, linewidth=1.5, label="train")
    esteps, elosses = _finite([r["step"] for r in evals], [r["eval_loss"] for r in evals])
    if elosses:
        ax.plot(esteps, elosses, "o-", color=_EVAL, linewidth=1.8, label="validation")
    for i, record in enumerate(r for r in evals if r.get("warning")):
        ax.axvline(record["step"], color=_WARN, linestyle="--", linewidth=1.2,
                   label="overfitting warning" if i == 0 else None)  # fmt: skip
    if best_step is not None and best_step in esteps:
        value = elosses[esteps.index(best_step)]
        ax.plot([best_step], [value], "*", color="black", markersize=13, label="best (restored)")
    _style(ax, "Loss", "cross-entropy (nats/token)")
    ax.legend(loc="best", fontsize=9)
    return _save(fig, out)


def plot_lr(train: Sequence[dict[str, Any]], out: Path) -> Path:
    """Learning rate of each optimizer step."""
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    steps, lrs = _finite([r["step"] for r in train], [r["lr"] for r in train])
    ax.plot(steps, lrs, color="#2ca02c", linewidth=1.8)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _style(ax, "Learning rate", "lr")
    return _save(fig, out)


def plot_metrics(evals: Sequence[dict[str, Any]], names: Sequence[str], out: Path) -> Path:
    """One small panel per validation metric, against the step it was measured at."""
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(3.4 * cols + 0.6, 2.7 * rows + 0.3)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = _finite([r["step"] for r in evals], [r.get(name) for r in evals])
        ax.plot(steps, values, "o-", color=_EVAL, linewidth=1.6, markersize=4)
        short = name.removeprefix("eval_")
        if short in SCORE_METRICS:  # a 0-100 score: a flat zero line should look like zero
            top = min(100.0, max([5.0, *values]) * 1.1)
            ax.set_ylim(-0.03 * top, top)
        _style(ax, short, "0-100" if short in SCORE_METRICS else "")
    fig.suptitle("Validation metrics", fontsize=12)
    return _save(fig, out)


def make_plots(
    records: Sequence[dict[str, Any]], plots_dir: str | Path, best_step: int | None = None
) -> list[Path]:
    """Write loss.png, lr.png and (when there are any) metrics.png; returns the files written."""
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):  # a regenerated report must not show stale charts
        old.unlink()
    train, evals = split_records(records)
    written = []
    if train or evals:
        written.append(plot_loss(train, evals, plots_dir / "loss.png", best_step))
    if train:
        written.append(plot_lr(train, plots_dir / "lr.png"))
    names = metric_names(evals)
    if names:
        written.append(plot_metrics(evals, names, plots_dir / "metrics.png"))
    return written

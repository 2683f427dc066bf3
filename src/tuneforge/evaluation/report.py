"""Before/after tables: evaluate several model references on one file and print them side by side.

Rendering run reports (HTML, plots) belongs to a separate module; this one only compares numbers.
"""

from __future__ import annotations

from typing import Any

from tuneforge.evaluation.metrics import SCORE_METRICS


def evaluate_reference(
    ref: str,
    data: str,
    metrics: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    **generation: Any,
):
    """Load `ref` (run dir, HF dir, .gguf or built-in name) and evaluate it on `data`.

    Text metrics (bleu, chrf, rouge, exact_match) score greedy generations; `generation` holds
    max_new_tokens, lang and zh_mode for them.
    """
    from tuneforge.evaluation.runner import evaluate_file
    from tuneforge.evaluation.validation import TEXT_METRICS, score_file_generations
    from tuneforge.loading import load_reference

    loaded = load_reference(ref)
    rest = [m for m in metrics if m not in TEXT_METRICS]
    out = evaluate_file(loaded.model, loaded.tokenizer, data, rest, batch_size, limit)
    text = [m for m in metrics if m in TEXT_METRICS]
    if text:
        out.update(
            score_file_generations(
                loaded.model, loaded.tokenizer, data, text, batch_size, limit, **generation
            )
        )
    return out


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    """A text table, one column per model; with two models, a delta column (last minus first)."""
    names = list(rows)
    keys = [k for k in rows[names[0]] if isinstance(rows[names[0]][k], (int, float))]
    header = ["metric", *names] + (["delta"] if len(names) == 2 else [])
    lines = [header]
    for key in keys:
        values = [rows[n].get(key) for n in names]
        cells = [key, *(_fmt(v) for v in values)]
        if (
            len(names) == 2
            and key != "examples"
            and all(isinstance(v, (int, float)) for v in values)
        ):
            delta = values[1] - values[0]
            better = (delta > 0) == (key in SCORE_METRICS)
            cells.append(
                f"{delta:+.4f}" + ("" if delta == 0 else (" better" if better else " worse"))
            )
        elif len(names) == 2:
            cells.append("")
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)

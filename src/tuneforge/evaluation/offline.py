"""Offline evaluation: load a run, export or base model and score it on a data file.

Printing the numbers side by side is reporting/tables.py's job.
"""

from __future__ import annotations

from typing import Any


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
    out = evaluate_file(
        loaded.model,
        loaded.tokenizer,
        data,
        rest,
        batch_size,
        limit,
        positions_aligned=loaded.positions_aligned,
        progress=True,
    )
    text = [m for m in metrics if m in TEXT_METRICS]
    if text:
        out.update(
            score_file_generations(
                loaded.model, loaded.tokenizer, data, text, batch_size, limit, **generation
            )
        )
    return out

"""Offline evaluation: load a run, export or base model and score it on a data file.

Printing the numbers side by side is reporting/tables.py's job.
"""

from __future__ import annotations

from typing import Any

import torch


def evaluate_reference(
    ref: str,
    data: str,
    metrics: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    *,
    template: str | None = None,
    **generation: Any,
):
    """Load `ref` (run dir, HF dir, .gguf or built-in name) and evaluate it on `data`.

    Text metrics (bleu, chrf, rouge, exact_match) score greedy generations; `generation` holds
    max_new_tokens, lang and zh_mode for them. `template` is the chat template of a base model
    (a run keeps its own): a built-in name, a jinja template, or the template of the run it is
    compared with, so that both see the same prompts.
    """
    from tuneforge.data.formats import load_examples
    from tuneforge.evaluation.runner import evaluate_file
    from tuneforge.evaluation.validation import TEXT_METRICS, score_file_generations
    from tuneforge.loading import load_reference

    load_examples(
        data, "auto", on_bad_row="fail"
    )  # a broken data file fails before the model loads
    loaded = load_reference(ref, template=template)
    fold_adapters(loaded.model)
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
                loaded.model,
                loaded.tokenizer,
                data,
                text,
                batch_size,
                limit,
                progress=True,
                **generation,
            )
        )
    return out


def fold_adapters(model: torch.nn.Module) -> bool:
    """Merge a loaded adapter (LoRA, IA3, ...) into its fp32 base weights: one matmul per layer.

    Only for a model loaded to be evaluated (the adapter stops being separable) and only where
    the merge is exact to fp32 rounding: plain fp32 Linear base layers, no prompt learning.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or not hasattr(model, "merge_adapter"):
        return False
    for layer in layers:
        base = layer.get_base_layer()
        if type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32:
            return False
    model.merge_adapter()
    return True

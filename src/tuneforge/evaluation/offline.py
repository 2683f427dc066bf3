"""Offline evaluation: load a run, export or base model and score it on a data file.

Printing the numbers side by side is reporting/tables.py's job.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tuneforge.loading import Loaded

#: Base weight dtypes an adapter is merged into for evaluation (fold_adapters).
FOLDABLE = (torch.float32, torch.bfloat16)


def evaluate_reference(
    ref: str,
    data: str,
    metrics: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    *,
    template: str | None = None,
    **generation: Any,
) -> dict[str, Any]:
    """Load `ref` (run dir, HF dir, .gguf or built-in name) and evaluate it on `data`.

    Text metrics (bleu, chrf, rouge, exact_match) score greedy generations; `generation` holds
    max_new_tokens, lang and zh_mode for them. `template` is the chat template of a base model
    (a run keeps its own): a built-in name, a jinja template, or the template of the run it is
    compared with, so that both see the same prompts.
    """
    from tuneforge.loading import load_reference

    _check_data(data)
    loaded = load_reference(ref, template=template, fold=True)
    return evaluate_loaded(loaded, data, metrics, batch_size, limit, **generation)


def evaluate_run_and_base(
    run: str,
    base_ref: str,
    data: str,
    metrics: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    *,
    template: str | None = None,
    **generation: Any,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the base's results, the run's) with the base model loaded once, or None where `base_ref`
    is not the adapter run's own base (then each is `evaluate_reference`'s job).

    The base is scored first, before the adapter goes onto it; the same numbers as loading it
    twice. `template` is the base's chat template, as for `evaluate_reference`.
    """
    from tuneforge.loading import adapter_base_dir, load_reference, load_run
    from tuneforge.models import resolve_dtype, resolve_model_dir

    _check_data(data)
    base_dir = adapter_base_dir(run)
    if base_dir is None or resolve_model_dir(str(base_ref)).resolve() != base_dir.resolve():
        return None
    base = load_reference(base_ref, template=template)
    base_out = evaluate_loaded(base, data, metrics, batch_size, limit, **generation)
    loaded = load_run(run, resolve_dtype("auto"), base=base.model, fold=True)
    return base_out, evaluate_loaded(loaded, data, metrics, batch_size, limit, **generation)


def _check_data(data: str) -> None:
    """A broken data file fails before any model loads."""
    from tuneforge.data.formats import load_examples

    load_examples(data, "auto", on_bad_row="fail")


def evaluate_loaded(
    loaded: Loaded,
    data: str,
    metrics: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    **generation: Any,
) -> dict[str, Any]:
    """`evaluate_reference` on a model already loaded (its adapter folded in first)."""
    from tuneforge.evaluation.runner import evaluate_file
    from tuneforge.evaluation.validation import TEXT_METRICS, score_file_generations

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
    """Merge a loaded adapter (LoRA, IA3, ...) into its base weights: one matmul per layer.

    Only for a model loaded to be evaluated (the adapter stops being separable) and only into
    plain fp32 or bf16 Linear base layers, no prompt learning. In bf16 the merged weight is
    rounded to bf16 once (peft computes the delta in fp32 on CPU), as an exported merge is; the
    quickstart's loss moves by 0.0006 (bench/notes.md compares both ways with fp32).
    """
    if "peft" not in sys.modules:  # nothing built a peft model (and importing it costs 0.6 s)
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or not hasattr(model, "merge_adapter"):
        return False
    for layer in layers:
        base = layer.get_base_layer()
        if type(base) is not torch.nn.Linear or base.weight.dtype not in FOLDABLE:
            return False
    model.merge_adapter()
    return True

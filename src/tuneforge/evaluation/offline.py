"""Offline evaluation: load a run, export or base model and score it on a data file.

Printing the numbers side by side is reporting/tables.py's job.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from tuneforge.evaluation.progress import Progress

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
    side_by_side: bool | None = None,
    **generation: Any,
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the base's results, the run's) for an adapter run and its own base, or None where
    `base_ref` is not that base (then each is `evaluate_reference`'s job).

    `side_by_side` (default: on a CPU with at least two threads where a second copy of the
    model fits in memory) scores both at once, each on half the threads: a pass's Python and
    small ops leave cores idle that the other model's matrix products then use (the
    quickstart's two passes: 10.9 s against 13.2 s one after the other). The run then loads its
    base again, its weights mapped from the same file. Otherwise the base is loaded once, scored
    first, and the adapter goes onto it. The numbers are the same either way.
    `template` is the base's chat template, as for `evaluate_reference`.
    """
    from tuneforge.loading import adapter_base_dir, load_reference, load_run
    from tuneforge.models import resolve_dtype, resolve_model_dir

    _check_data(data)
    base_dir = adapter_base_dir(run)
    if base_dir is None or resolve_model_dir(str(base_ref)).resolve() != base_dir.resolve():
        return None
    base = load_reference(base_ref, template=template)
    score = functools.partial(
        evaluate_loaded,
        data=data,
        metrics=metrics,
        batch_size=batch_size,
        limit=limit,
        **generation,
    )
    if side_by_side is None:
        side_by_side = _fits_side_by_side(base.model)
    if not side_by_side:
        base_out = score(base, progress="base")
        loaded = load_run(run, resolve_dtype("auto"), base=base.model, fold=True)
        return base_out, score(loaded, progress=str(run))
    with _threads_each(2):
        return _at_once(
            lambda: score(base, progress="base"),
            lambda: score(load_run(run, resolve_dtype("auto"), fold=True), progress=str(run)),
        )


def _fits_side_by_side(model: torch.nn.Module) -> bool:
    """Two threads or more on a CPU, and memory for the run's own copy of the model twice over."""
    from tuneforge.train.calibrate import available_memory_bytes

    param = next(model.parameters())
    if param.device.type != "cpu" or torch.get_num_threads() < 2:
        return False
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * size < available_memory_bytes()


@contextmanager
def _threads_each(ways: int) -> Iterator[None]:
    """torch's thread count divided between `ways` concurrent passes, put back on leaving."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // ways))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _at_once(*jobs: Callable[[], Any]) -> tuple:
    """Each job's result, the jobs run in threads of their own (torch's ops let the GIL go);
    the first job's error is raised. Daemon threads: Ctrl-C does not wait for them."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def work(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except BaseException as err:  # re-raised in the caller's thread below
            errors[i] = err

    threads = [
        threading.Thread(target=work, args=(i,), name=f"tuneforge-eval-{i}", daemon=True)
        for i in range(len(jobs))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for err in errors:
        if err is not None:
            raise err
    return tuple(results)


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
    *,
    progress: Progress = True,
    **generation: Any,
) -> dict[str, Any]:
    """`evaluate_reference` on a model already loaded (its adapter folded in first); `progress`
    names the model on its bars where it is a string."""
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
        progress=progress,
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
                progress=progress,
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

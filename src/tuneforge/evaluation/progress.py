"""Progress bars of evaluation passes: hidden unless asked for, and naming their model where two
models are scored at once (`eval --compare` runs base and run side by side, one bar each).

What a pass computes is its own module's business; this only labels and shows the bar.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

#: A pass's `progress` argument: False (no bar), True (a bar), or a model's name (a bar naming it).
Progress = bool | str


def eval_bar(what: str, progress: Progress, **kwargs: Any) -> tqdm:
    """tqdm described `eval WHAT` (or `eval MODEL: WHAT`), shown only when `progress` is set,
    cleared when done; `kwargs` go to tqdm (iterable, total, unit)."""
    desc = f"eval {progress}: {what}" if isinstance(progress, str) else f"eval {what}"
    return tqdm(desc=desc, disable=not progress, leave=False, **kwargs)

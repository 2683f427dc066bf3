"""Cross-process agreement for the loop: summed counters, agreed stop signals, rows per step.

One process (no torch.distributed) takes the plain path; under DDP each is one collective.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

import torch


def row_sources(examples: Sequence[Any], rows: list[int], accelerator) -> list[str]:
    """The step's rows as `file:line`, from every process (rank order)."""
    mine = [getattr(examples[i], "source", "") or f"#{i}" for i in rows]
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return list(gather_object(mine))


def gathered(accelerator, value: Any) -> list[Any]:
    """`value` from every process, in rank order (one process: just it)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def agreed_signal(accelerator, stop_requested: Callable[[], int] | None) -> int:
    """A pending stop signal, agreed by all processes so that they stop at the same step."""
    local = stop_requested() if stop_requested is not None else 0
    if accelerator.num_processes == 1:
        return local
    anyone = all_reduce_sum(accelerator, 1 if local else 0)
    return local or (int(signal.SIGTERM) if anyone else 0)


def all_reduce_sums(accelerator, *values: float | int) -> list[float]:
    """Each value summed over all processes, in one collective."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=accelerator.device
    )
    return accelerator.reduce(tensor, reduction="sum").tolist()


def all_reduce_sum(accelerator, value: float | int) -> float:
    return all_reduce_sums(accelerator, value)[0]

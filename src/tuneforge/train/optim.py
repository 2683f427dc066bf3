"""The AdamW optimiser and learning-rate schedules over the methods' parameter groups.

Schedules are pure functions of the step (tested without a model); how parameters are grouped
(layer-wise, per-pattern, embedding/head rates) is methods/param_groups.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tuneforge.constants import SCHEDULES


def describe_param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """One record per optimizer group: name, peak rate, current rate, weight decay, sizes."""
    out = []
    for group in optimizer.param_groups:
        out.append(
            {
                "name": group.get("name", ""),
                "lr": group.get("initial_lr", group["lr"]),
                "last_lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "tensors": len(group["params"]),
                "params": sum(p.numel() for p in group["params"]),
            }
        )
    return out


def build_optimizer(
    groups: list[dict[str, Any]], betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    if not groups:
        raise ValueError("the method left no trainable parameters")
    # foreach=False keeps the update order-independent and bit-reproducible on CPU.
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
) -> float:
    """The multiplier on the peak rate at `step` (0-based): linear warmup, then the schedule.

    `min_lr_ratio` is the floor of cosine_with_min_lr and polynomial; `power` shapes polynomial.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine_with_min_lr":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "polynomial":
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** power
    raise ValueError(f"train.scheduler: {schedule!r} is not one of {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule shape for every group: each group's rate is its own peak times the factor."""
    factor: Callable[[int], float] = lambda step: lr_factor(  # noqa: E731
        step,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        power=power,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Explicit warmup steps win; otherwise a ratio of the run, rounded up."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)

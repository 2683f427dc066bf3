"""Parameter groups, the AdamW optimiser and learning-rate schedules.

Schedules are pure functions of the step (tested without a model); methods may supply their
own parameter groups (layer-wise or per-module rates) through `Method.param_groups`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

SCHEDULES = ("constant", "linear", "cosine")


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights, biases and other 1-D parameters take no weight decay."""
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def default_param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Two groups of trainable parameters: with and without weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: list[dict[str, Any]], betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    if not groups:
        raise ValueError("the method left no trainable parameters")
    # foreach=False keeps the update order-independent and bit-reproducible on CPU.
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier on the peak rate at `step` (0-based): linear warmup, then the schedule."""
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
    raise ValueError(f"train.scheduler: {schedule!r} is not one of {', '.join(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    factor: Callable[[int], float] = lambda step: lr_factor(  # noqa: E731
        step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Explicit warmup steps win; otherwise a ratio of the run, rounded up."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)

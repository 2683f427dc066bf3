"""Optimizer parameter groups: layer-wise decay, per-pattern rates, embedding/head rates, no-decay.

Methods build their groups here (a method scales its own parameters' rate through
`Method.lr_scale`, e.g. LoRA+); the optimizer and schedules are train/optim.py's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneforge.constants import LR_DIRECTIONS
from tuneforge.errors import ConfigError
from tuneforge.layout import EMBEDDING_RE, HEAD_RE, count_layers, layer_index

if TYPE_CHECKING:
    import torch


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights, biases and other 1-D parameters take no weight decay."""
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def default_param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Two groups of trainable parameters: with and without weight decay."""
    return build_param_groups(model, lr, weight_decay)


@dataclass
class LrRules:
    """How the peak rate varies across parameters (all optional; the default is one rate)."""

    layer_decay: float = 1.0  # rate of block i = lr * layer_decay ** distance from the chosen end
    direction: str = "shallow_smaller"  # which end gets the smaller rates
    groups: list[tuple[str, float, float | None]] = field(default_factory=list)  # pattern, lr, wd
    embedding_lr: float | None = None
    head_lr: float | None = None


def _depth(name: str, n_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, n_layers + 1 for the head, final norm and the rest."""
    if EMBEDDING_RE.search(name):
        return 0
    index = layer_index(name)
    return n_layers + 1 if index is None else index + 1


def param_rate(
    name: str, lr: float, rules: LrRules, n_layers: int, scale: float = 1.0
) -> tuple[str, float, float | None]:
    """(group label, peak rate, weight-decay override) of one parameter under `rules`.

    Order: the first matching `lr_groups` pattern, then embedding_lr / head_lr (all absolute
    rates), else the layer-wise rate times the method's own scale (e.g. LoRA+).
    """
    for k, (pattern, group_lr, wd) in enumerate(rules.groups):
        if re.search(pattern, name):
            return f"lr_groups.{k}", group_lr, wd
    if rules.embedding_lr is not None and EMBEDDING_RE.search(name):
        return "embedding", rules.embedding_lr, None
    if rules.head_lr is not None and HEAD_RE.search(name):
        return "head", rules.head_lr, None
    label, rate = "default", lr
    if rules.layer_decay != 1.0:
        depth = _depth(name, n_layers)
        top = n_layers + 1
        distance = top - depth if rules.direction == "shallow_smaller" else depth
        rate = lr * rules.layer_decay**distance
        label = "embedding" if depth == 0 else ("top" if depth == top else f"layer{depth - 1}")
    if scale != 1.0:
        label, rate = f"{label}*{scale:g}", rate * scale
    return label, rate, None


def build_param_groups(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    rules: LrRules | None = None,
    scale: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (rate, weight decay); each group is named `LABEL/decay`.

    Parameters at the plain rate form the groups `decay` and `no_decay`.
    """
    rules = rules or LrRules()
    if rules.direction not in LR_DIRECTIONS:
        raise ConfigError(
            f"train.layer_lr_direction: {rules.direction!r} is not one of {', '.join(LR_DIRECTIONS)}"
        )
    n_layers = count_layers(model)
    groups: dict[tuple[str, float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        label, rate, wd = param_rate(name, lr, rules, n_layers, scale(name) if scale else 1.0)
        exempt = no_decay(name, param)
        wd = 0.0 if exempt else (weight_decay if wd is None else wd)
        kind = "no_decay" if exempt else "decay"
        key = (kind if label == "default" else f"{label}/{kind}", rate, wd)
        group = groups.setdefault(
            key, {"params": [], "lr": rate, "weight_decay": wd, "name": key[0]}
        )
        group["params"].append(param)
    order = {"decay": 0, "no_decay": 1}
    return sorted(groups.values(), key=lambda g: order.get(g["name"], 2))

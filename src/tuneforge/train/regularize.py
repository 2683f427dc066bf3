"""Regularisers beside weight decay: an L1 penalty, NEFTune embedding noise, a dropout override.

Each takes plain arguments and touches only what it is given; the recipe decides when to use them
(train.l1, train.neftune_alpha, model.dropout). Weight decay (L2) lives in the optimizer groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

#: Config attributes that hold dropout rates, across architectures.
DROPOUT_CONFIG_KEYS = (
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "attn_pdrop",
    "resid_pdrop",
    "embd_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "summary_first_dropout",
)
#: Module attributes read as a float dropout rate inside attention (no nn.Dropout module).
_FLOAT_ATTRS = ("attention_dropout", "dropout", "attn_dropout", "dropout_p")


def l1_penalty(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], weight: float
) -> Callable[[torch.nn.Module], torch.Tensor]:
    """`weight * sum|w|` over the given trainable weights, skipping norms, biases and 1-D tensors."""
    from tuneforge.methods.param_groups import no_decay

    params = [p for n, p in named_params if p.requires_grad and not no_decay(n, p)]
    if not params:
        raise ValueError("train.l1: there are no trainable weight matrices to penalise")

    def penalty(model: torch.nn.Module) -> torch.Tensor:
        return weight * sum(p.float().abs().sum() for p in params)

    return penalty


def add_neftune(model: torch.nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune (Jain et al. 2023): add U(-1, 1) * alpha / sqrt(len * dim) to input embeddings
    while the embedding module is in training mode; evaluation and generation see none."""
    embeddings = model.get_input_embeddings()

    def hook(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training or output.dim() != 3:
            return output
        scale = alpha / (output.size(1) * output.size(2)) ** 0.5
        return output + torch.zeros_like(output).uniform_(-scale, scale)

    return embeddings.register_forward_hook(hook)


def override_dropout(model: torch.nn.Module, rate: float) -> list[str]:
    """Set every dropout rate the architecture has to `rate`: config keys, nn.Dropout modules and
    float attributes read by attention kernels. Returns what was changed (empty: nothing to set)."""
    changed = []
    config = getattr(model, "config", None)
    for key in DROPOUT_CONFIG_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(config, key, rate)
            changed.append(f"config.{key}")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = rate
            changed.append(name)
            continue
        for attr in _FLOAT_ATTRS:
            if isinstance(module.__dict__.get(attr), float):
                setattr(module, attr, rate)
                changed.append(f"{name}.{attr}")
    if not changed:
        log.warning("model.dropout: %s has no dropout to override", type(model).__name__)
    return changed

"""Where the transformer blocks are: block index of a parameter name, the block list of a model.

Works by naming convention across architectures (Llama `model.layers.N`, GPT-2 `transformer.h.N`,
others `blocks.N` / `layer.N`), also through peft wrappers. Choosing what to train is left to methods.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tuneforge.errors import ConfigError

if TYPE_CHECKING:  # torch stays out of config-time imports (methods register without it)
    import torch

BLOCK_CONTAINERS = ("layers", "h", "blocks", "block", "layer")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_CONTAINERS) + r")\.(\d+)(?:\.|$)")
EMBEDDING_RE = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|embed_positions|embed_in)\."
)
HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a parameter or module name belongs to, or None."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


def count_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks (the highest block index seen in parameter names, plus one)."""
    indices = [layer_index(n) for n, _ in model.named_parameters()]
    return max((i for i in indices if i is not None), default=-1) + 1


def block_list(model: torch.nn.Module) -> tuple[str, int]:
    """(qualified name, length) of the model's list of transformer blocks, e.g. ('model.layers', 30)."""
    import torch

    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS:
            if best is None or len(module) > best[1]:
                best = (name, len(module))
    if best is None:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: no ModuleList named "
            f"{', '.join(BLOCK_CONTAINERS)}"
        )
    return best


def resolve_indices(indices: list[int], n_layers: int, key: str) -> list[int]:
    """Layer indices with negatives counted from the end (-1 = last), checked against n_layers."""
    out = []
    for i in indices:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(
                f"{key}: layer {i} is out of range for a model with {n_layers} layers"
            )
        out.append(j)
    return sorted(set(out))

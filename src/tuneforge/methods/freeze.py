"""Freeze tuning: train only chosen transformer blocks (the last N by default) and named modules.

Everything else keeps requires_grad off and stays bit-identical. The result is saved as a full
HF model (run/model/), like full fine-tuning; selecting blocks by index works on any architecture.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from tuneforge.config import MethodSection
from tuneforge.errors import ConfigError
from tuneforge.methods import Method, register

log = logging.getLogger(__name__)


class FreezeOptions(MethodSection):
    name: Literal["freeze"] = Field("freeze", description="Fine-tuning method.")
    trainable_layers: int = Field(
        2, ge=0, description="Train the last N transformer blocks (ignored when layers is set)."
    )
    layers: list[int] | None = Field(
        None, description="Block indices to train (negative counts from the end: -1 is the last)."
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Regular expressions on parameter names trained as well, e.g. ['norm', 'lm_head'].",
    )

    @field_validator("trainable_modules")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
        return v


def chosen_layers(n_layers: int, last_n: int, layers: list[int] | None, key: str) -> list[int]:
    """Block indices to train: explicit `layers` (negatives from the end), else the last `last_n`."""
    from tuneforge.layout import resolve_indices

    if layers is not None:
        return resolve_indices(layers, n_layers, key)
    return list(range(max(0, n_layers - last_n), n_layers))


@register
class Freeze(Method):
    name = "freeze"
    compare_specs = ("trainable_layers=4:train.lr=1e-4",)
    Options = FreezeOptions
    artifact = "model"

    def apply(self, model):
        from tuneforge.layout import count_layers, layer_index

        o = self.options
        n_layers = count_layers(model)
        self.layers = chosen_layers(n_layers, o.trainable_layers, o.layers, "method.layers")
        patterns = [re.compile(p) for p in o.trainable_modules]
        wanted = set(self.layers)
        trained = 0
        for name, param in model.named_parameters():
            on = layer_index(name) in wanted or any(p.search(name) for p in patterns)
            param.requires_grad_(on)
            trained += on
        if trained == 0:
            raise ConfigError(
                "method.trainable_layers / method.layers / method.trainable_modules select no "
                f"parameters of this {n_layers}-layer model"
            )
        log.info(
            "freeze: training blocks %s of %d plus %s",
            self.layers,
            n_layers,
            o.trainable_modules or "nothing else",
        )
        return model

    def summary(self, model) -> dict[str, Any]:
        return {"trained_layers": self.layers}

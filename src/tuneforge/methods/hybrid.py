"""Hybrid: full training of chosen blocks or modules, LoRA on every other block (peft).

The fully trained parts are peft `modules_to_save`, so the result is one adapter directory that
loads with plain `PeftModel.from_pretrained` and merges into a standalone model. Engines that
reject `modules_to_save` adapters (vLLM) cannot serve it unmerged; merge it first.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, model_validator

from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.lora import Lora, LoraOptions, lora_config_kwargs

log = logging.getLogger(__name__)

VLLM_WARNING = (
    "method hybrid: the adapter carries fully trained modules (peft modules_to_save); vLLM and "
    "other engines that reject modules_to_save cannot serve it as an adapter: merge it first"
)


class HybridOptions(LoraOptions):
    name: Literal["hybrid"] = Field("hybrid", description="Fine-tuning method.")  # type: ignore[assignment]
    full_layers: list[int] = Field(
        default_factory=lambda: [-1],
        description="Blocks trained fully (negative counts from the end); LoRA goes on the rest.",
    )
    full_modules: list[str] = Field(
        default_factory=list,
        description="Other modules trained fully, by name suffix (e.g. lm_head, model.norm).",
    )

    @model_validator(mode="after")
    def _warn_about_serving(self) -> HybridOptions:
        log.warning(VLLM_WARNING)
        return self


def block_linear_names(model) -> list[str]:
    """Suffixes of the linear (and GPT-2 Conv1D) layers inside the transformer blocks."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from tuneforge.layout import layer_index

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and layer_index(name) is not None
        }
    )


@register
class Hybrid(Lora):
    name = "hybrid"
    compare_specs = ("train.lr=2e-4",)
    Options = HybridOptions

    def peft_config(self, model):
        from peft import LoraConfig

        from tuneforge.layout import block_list, resolve_indices

        o = self.options
        container, n_layers = block_list(model)
        full = resolve_indices(o.full_layers, n_layers, "method.full_layers")
        rest = [i for i in range(n_layers) if i not in full]
        if not rest:
            raise ConfigError(
                f"method.full_layers: {o.full_layers} covers all {n_layers} blocks; use method "
                "full, or leave some blocks to LoRA"
            )
        self.full_layers = full
        kwargs = lora_config_kwargs(o)
        if kwargs["target_modules"] == "all-linear":  # peft wants a list with layers_to_transform
            kwargs["target_modules"] = block_linear_names(model)
        kwargs.update(
            layers_to_transform=rest,
            layers_pattern=container.rsplit(".", 1)[-1],
            modules_to_save=[f"{container}.{i}" for i in full] + list(o.full_modules),
        )
        return LoraConfig(**kwargs)

    def summary(self, model) -> dict[str, Any]:
        return {"full_layers": self.full_layers, "full_modules": list(self.options.full_modules)}

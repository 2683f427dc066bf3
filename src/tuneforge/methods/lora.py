"""LoRA: a trainable low-rank update B·A beside each targeted weight, built with peft.

`target_modules: all-linear` adapts every linear (and GPT-2 Conv1D) layer except the output
head, for any architecture; a list names modules by suffix. Saved in plain PEFT format.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config import MethodSection
from tuneforge.methods import Method, register


class LoraOptions(MethodSection):
    name: Literal["lora"] = Field("lora", description="Fine-tuning method.")
    r: int = Field(16, gt=0, description="Rank of the update.")
    alpha: float = Field(
        32, gt=0, description="Scaling numerator: the update is scaled by alpha / r."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="all-linear, or module name suffixes to adapt."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


def lora_config_kwargs(options: LoraOptions) -> dict:
    """The peft.LoraConfig arguments shared by LoRA and its relatives."""
    return dict(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        bias=options.bias,
        task_type="CAUSAL_LM",
    )


@register
class Lora(Method):
    name = "lora"
    Options = LoraOptions

    def apply(self, model):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**lora_config_kwargs(self.options)))

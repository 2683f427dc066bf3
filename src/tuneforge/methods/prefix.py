"""Prefix tuning: trainable key/value vectors prepended at every layer's attention (peft).

The base model is untouched; only the prefix (or its projection MLP) trains. Loading wraps the
adapter so evaluation and generation see the prefix exactly as training did (methods/_prompt_runtime).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config import MethodSection
from tuneforge.methods import Method, register


class PrefixOptions(MethodSection):
    name: Literal["prefix"] = Field("prefix", description="Fine-tuning method.")
    num_virtual_tokens: int = Field(
        16, gt=0, description="Length of the trained prefix, in tokens."
    )
    projection: bool = Field(
        False,
        description="Reparameterise the prefix through a two-layer MLP while training (Li & Liang).",
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden size of that MLP; null: the model's hidden size."
    )


class PromptLearningMethod(Method):
    """Shared by prefix, prompt and P-tuning: peft builds it; not mergeable into the weights."""

    adds_virtual_tokens = True
    shardable = False  # the virtual-token tables live outside the decoder blocks (untested)

    def peft_config(self, model) -> Any:
        raise NotImplementedError

    def apply(self, model):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model))

    def for_inference(self, model):
        """peft's generate() and cached continuation misplace the virtual tokens: wrap them."""
        from tuneforge.methods._prompt_runtime import PromptLearningLM

        return PromptLearningLM(model)

    def summary(self, model) -> dict[str, Any]:
        return {"num_virtual_tokens": self.options.num_virtual_tokens}


def hidden_size(model) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return int(getattr(config, "hidden_size", None) or config.n_embd)


@register
class Prefix(PromptLearningMethod):
    name = "prefix"
    compare_specs = ("train.lr=1e-2",)
    Options = PrefixOptions

    def peft_config(self, model):
        from peft import PrefixTuningConfig

        o = self.options
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=o.num_virtual_tokens,
            prefix_projection=o.projection,
            encoder_hidden_size=o.encoder_hidden_size or hidden_size(model),
        )

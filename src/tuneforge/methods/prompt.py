"""Prompt tuning and P-tuning: trainable virtual token embeddings before the input (peft).

Prompt tuning learns the embeddings directly (init from sampled vocabulary, a text, or random);
P-tuning produces them with a small MLP/LSTM encoder. The base model is untouched.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.config import MethodSection
from tuneforge.methods import register
from tuneforge.methods.prefix import PromptLearningMethod, hidden_size


class PromptOptions(MethodSection):
    name: Literal["prompt"] = Field("prompt", description="Fine-tuning method.")
    num_virtual_tokens: int = Field(16, gt=0, description="Number of trained virtual tokens.")
    init: Literal["vocab", "text", "random"] = Field(
        "vocab",
        description="Start from embeddings of random vocabulary tokens (vocab), of init_text "
        "(text), or from N(0, 1) noise (random; usually much worse on real models).",
    )
    init_text: str = Field(
        "Answer the question correctly.",
        description="Text whose token embeddings start the prompt when init is text.",
    )

    @model_validator(mode="after")
    def _text_needs_text(self) -> PromptOptions:
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("method.init_text: must not be empty when method.init is text")
        return self


class PtuningOptions(MethodSection):
    name: Literal["ptuning"] = Field("ptuning", description="Fine-tuning method.")
    num_virtual_tokens: int = Field(16, gt=0, description="Number of virtual tokens.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="The prompt encoder network.")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden size of the encoder; null: the model's hidden size."
    )
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside the encoder.")


_INIT = {"vocab": "SAMPLE_VOCAB", "text": "TEXT", "random": "RANDOM"}


@register
class Prompt(PromptLearningMethod):
    name = "prompt"
    compare_specs = ("train.lr=3e-2",)
    Options = PromptOptions

    def peft_config(self, model):
        from peft import PromptTuningConfig

        o = self.options
        text = o.init == "text"
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=o.num_virtual_tokens,
            prompt_tuning_init=_INIT[o.init],
            prompt_tuning_init_text=o.init_text if text else None,
            tokenizer_name_or_path=model.name_or_path if text else None,
        )


@register
class Ptuning(PromptLearningMethod):
    name = "ptuning"
    compare_specs = ("train.lr=3e-3",)
    Options = PtuningOptions

    def peft_config(self, model):
        from peft import PromptEncoderConfig

        o = self.options
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=o.num_virtual_tokens,
            encoder_reparameterization_type=o.encoder.upper(),
            encoder_hidden_size=o.encoder_hidden_size or hidden_size(model),
            encoder_dropout=o.encoder_dropout,
        )

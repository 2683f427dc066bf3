"""Full fine-tuning (FFT): every weight of the base model is trained.

The result is a complete HF model directory (run/model/); nothing is wrapped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.config import MethodSection
from tuneforge.methods import Method, register


class FullOptions(MethodSection):
    name: Literal["full"] = Field("full", description="Fine-tuning method.")


@register
class Full(Method):
    name = "full"
    compare_specs = ("train.lr=5e-5",)
    Options = FullOptions
    artifact = "model"

    def apply(self, model):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

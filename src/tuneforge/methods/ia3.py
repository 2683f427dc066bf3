"""(IA)^3: learned per-channel scaling vectors on attention keys/values and the MLP input (peft).

Tiny (a few thousand parameters) and mergeable. Target modules default to peft's table for known
architectures, else every linear layer with the MLP output projections as feed-forward modules.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from tuneforge.config import MethodSection
from tuneforge.methods import Method, register

#: Module names that read the MLP's wide hidden state (their input is scaled, not their output).
_FEEDFORWARD_RE = re.compile(r"(down_proj|fc2|fc_out|w2|dense_4h_to_h|mlp\.c_proj)$")


class Ia3Options(MethodSection):
    name: Literal["ia3"] = Field("ia3", description="Fine-tuning method.")
    target_modules: str | list[str] | None = Field(
        None,
        description="Modules to scale (suffixes or all-linear); null: peft's table for the "
        "architecture, else all-linear.",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Targets whose input (not output) is scaled; null: the MLP down projections.",
    )


def default_targets(model) -> tuple[str, list[str]]:
    """(target_modules, feedforward_modules) for a model peft's IA3 table does not know."""
    import torch
    from transformers.pytorch_utils import Conv1D

    feedforward = set()
    for name, module in model.named_modules():
        match = _FEEDFORWARD_RE.search(name)
        if match and isinstance(module, (torch.nn.Linear, Conv1D)):
            feedforward.add(match.group(1))
    return "all-linear", sorted(feedforward)


@register
class Ia3(Method):
    name = "ia3"
    compare_specs = ("train.lr=3e-3",)
    Options = Ia3Options
    mergeable = True

    def apply(self, model):
        from peft import IA3Config, get_peft_model
        from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as KNOWN

        o = self.options
        targets, feedforward = o.target_modules, o.feedforward_modules
        if targets is None and model.config.model_type not in KNOWN:
            targets, found = default_targets(model)
            feedforward = feedforward if feedforward is not None else found
        config = IA3Config(
            task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward
        )
        return get_peft_model(model, config)

"""LoRA and its family: a trainable low-rank update B·A beside each targeted weight, built with peft.

Options cover DoRA, rsLoRA, PiSSA / OLoRA / Gaussian init and LoRA+ (a higher rate for B).
`target_modules: all-linear` adapts every linear (and GPT-2 Conv1D) layer except the output head,
for any architecture; a list names modules by suffix. Saved in plain PEFT format: PiSSA and OLoRA
adapters are converted at save time so that they apply to the unmodified base model.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Literal

from pydantic import Field

from tuneforge.config import MethodSection
from tuneforge.errors import ConfigError
from tuneforge.methods import Method, register

#: Inits that rewrite the base weights (W_res = W - B0·A0); the adapter is converted when saved.
MUTATING_INITS = ("pissa", "pissa_exact", "olora")
#: Our names -> peft's init_lora_weights (4 subspace iterations: seconds instead of minutes).
_PEFT_INIT = {"default": True, "pissa": "pissa_niter_4", "pissa_exact": "pissa"}


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
    dora: bool = Field(
        False, description="DoRA: train a magnitude vector beside the low-rank direction update."
    )
    rslora: bool = Field(
        False,
        description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r (stable at high r).",
    )
    init: Literal["default", "gaussian", "pissa", "pissa_exact", "olora"] = Field(
        "default",
        description="Adapter init: default (B = 0, A Kaiming), gaussian, pissa (principal singular "
        "vectors by fast randomized SVD; pissa_exact: full SVD, minutes on CPU) or olora (QR).",
    )
    lora_plus_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices train at lr * ratio (16 is the paper's default); null: off.",
    )


def lora_config_kwargs(options: LoraOptions) -> dict:
    """The peft.LoraConfig arguments shared by LoRA and its relatives."""
    return dict(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        bias=options.bias,
        use_dora=options.dora,
        use_rslora=options.rslora,
        init_lora_weights=_PEFT_INIT.get(options.init, options.init),
        task_type="CAUSAL_LM",
    )


def save_initial_adapter(peft_model) -> Path:
    """Save the freshly initialised adapter (needed to convert PiSSA/OLoRA at save time).

    Returns `DIR/initial` inside a temporary directory that is removed with the caller.
    """
    tmp = Path(tempfile.mkdtemp(prefix="tuneforge-lora-init-"))
    config = peft_model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # so loading it back does not decompose the weights again
    try:
        peft_model.save_pretrained(str(tmp / "initial"), safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return tmp / "initial"


def _has_conv1d(model) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


@register
class Lora(Method):
    name = "lora"
    compare_specs = (
        "train.lr=3e-4",
        "dora=true:train.lr=3e-4",
        "init=pissa:train.lr=1e-4",
        "lora_plus_ratio=16:train.lr=1e-4",
    )
    Options = LoraOptions
    mergeable = True

    def __init__(self, options: LoraOptions) -> None:
        super().__init__(options)
        self.initial_adapter: Path | None = None

    def peft_config(self, model):
        from peft import LoraConfig

        return LoraConfig(**lora_config_kwargs(self.options))

    def apply(self, model):
        from peft import get_peft_model

        if self.options.init == "olora" and _has_conv1d(model):
            raise ConfigError(
                "method.init: olora does not handle GPT-2 style Conv1D layers (peft computes "
                "its QR on the transposed weight); use pissa or default"
            )
        peft_model = get_peft_model(model, self.peft_config(model))
        if self.options.init in MUTATING_INITS:
            self.initial_adapter = save_initial_adapter(peft_model)
            weakref.finalize(self, shutil.rmtree, self.initial_adapter.parent, True)
        return peft_model

    def lr_scale(self, param_name: str) -> float:
        ratio = self.options.lora_plus_ratio
        return ratio if ratio is not None and "lora_B" in param_name else 1.0

    def fold_saved(self, base, adapter_dir: str) -> bool:
        from tuneforge.methods.lora_fold import fold_saved_lora

        return fold_saved_lora(base, adapter_dir)

    def save(self, model, path: str, state_dict=None) -> None:
        if self.initial_adapter is None:
            return super().save(model, path, state_dict)
        extra = {} if state_dict is None else {"state_dict": state_dict}
        # B·A - B0·A0 as a rank-2r LoRA on the original base weights.
        model.save_pretrained(
            path,
            safe_serialization=True,
            **extra,
            path_initial_model_for_weight_conversion=str(self.initial_adapter),
        )

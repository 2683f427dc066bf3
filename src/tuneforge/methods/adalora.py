"""AdaLoRA: SVD-shaped LoRA whose rank budget shrinks from init_r to target_r during the run (peft).

The schedule's length is the run's own (`total_step` is never asked of the user); the rank update
runs in `on_step`, after `optimizer.step()` and before `zero_grad()` as AdaLoRA requires. Final
ranks per module go to summary.json; the allocator's state is checkpointed, so a resume is exact.
Merging and saving are peft's.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tuneforge.config import MethodSection
from tuneforge.errors import ConfigError
from tuneforge.methods import Method, register


class AdaLoraOptions(MethodSection):
    name: Literal["adalora"] = Field("adalora", description="Fine-tuning method.")
    init_r: int = Field(12, gt=0, description="Starting rank of every adapted module.")
    target_r: int = Field(
        4, gt=0, description="Average rank per module at the end (the total budget / modules)."
    )
    alpha: float = Field(32, gt=0, description="Scaling numerator of the update.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="all-linear, or module name suffixes to adapt."
    )
    tinit: int | None = Field(
        None, ge=0, description="Warmup steps at full rank before pruning; null: 10 % of the run."
    )
    tfinal: int | None = Field(
        None,
        ge=0,
        description="Final steps at the target budget (ranks fixed); null: 20 % of the run.",
    )
    deltaT: int | None = Field(
        None, gt=0, description="Steps between rank re-allocations; null: about 10 per run."
    )
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance scores.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of their uncertainty.")
    orth_reg_weight: float = Field(
        0.5, ge=0.0, description="Weight of the orthogonality penalty on A and B."
    )


def adalora_schedule(
    total_steps: int, tinit: int | None, tfinal: int | None, delta_t: int | None
) -> tuple[int, int, int]:
    """(tinit, tfinal, deltaT) for a run of `total_steps`, defaults scaled to the run length."""
    tinit = round(0.1 * total_steps) if tinit is None else tinit
    tfinal = round(0.2 * total_steps) if tfinal is None else tfinal
    if tinit + tfinal >= total_steps:
        raise ConfigError(
            f"method.tinit + method.tfinal ({tinit} + {tfinal}) must be smaller than the run's "
            f"{total_steps} steps, leaving steps to prune the ranks in"
        )
    delta_t = delta_t or max(1, (total_steps - tinit - tfinal) // 10)
    return tinit, tfinal, delta_t


@register
class AdaLora(Method):
    name = "adalora"
    compare_specs = (
        "train.lr=3e-3",
    )  # measured: 5e-4 barely moves it in 30 steps (E starts at zero)
    Options = AdaLoraOptions
    mergeable = True
    shardable = False  # the rank allocator scores whole matrices every step
    _tuner: Any = None  # peft's AdaLoraModel, once `apply` has run: owns the rank allocator

    def apply(self, model):
        from peft import AdaLoraConfig, get_peft_model

        o = self.options
        if self.total_steps is None:
            raise ValueError("adalora: the run length must be known before apply (Method.plan)")
        if o.target_r > o.init_r:
            raise ConfigError(f"method.target_r ({o.target_r}) exceeds method.init_r ({o.init_r})")
        tinit, tfinal, delta_t = adalora_schedule(self.total_steps, o.tinit, o.tfinal, o.deltaT)
        config = AdaLoraConfig(
            init_r=o.init_r,
            target_r=o.target_r,
            lora_alpha=o.alpha,
            lora_dropout=o.dropout,
            target_modules=o.target_modules,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=delta_t,
            beta1=o.beta1,
            beta2=o.beta2,
            orth_reg_weight=o.orth_reg_weight,
            total_step=self.total_steps,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        _orthogonality_only_in_training(peft_model.base_model)
        self._tuner = peft_model.base_model
        return peft_model

    def state_dict(self) -> dict[str, Any]:
        """The rank allocator's running importance averages and the rank pattern so far: without
        them a resumed run re-allocates ranks from fresh scores (not the run it continues)."""
        tuner = self._tuner
        if tuner is None:
            return {}
        alloc = tuner.rankallocator
        return {
            "ipt": dict(alloc.ipt),
            "exp_avg_ipt": dict(alloc.exp_avg_ipt),
            "exp_avg_unc": dict(alloc.exp_avg_unc),
            "rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tuner = self._tuner
        if tuner is None or not state:
            return
        alloc = tuner.rankallocator
        params = dict(tuner.model.named_parameters())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {n: t.to(params[n].device) for n, t in state[key].items()})
        tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]

    def on_step(self, model, step: int) -> None:
        # Gradients are still there (importance scores use them); step + 1 steps are done.
        peft_model = getattr(model, "module", model)  # DDP wraps the model
        peft_model.base_model.update_and_allocate(step + 1)

    def save(self, model, path: str, state_dict=None) -> None:
        """peft's AdaLoRA save, except that a module pruned to rank 0 keeps one slot: its lora_E
        entry is zero (the allocator masked it), so the module still adds exactly nothing, and the
        adapter holds no zero-sized tensor (which loaders and peft's own check reject)."""
        config = model.peft_config["default"]
        pattern = config.rank_pattern
        if pattern:
            config.rank_pattern = {
                k: v if any(v) else [True] + [False] * (len(v) - 1) for k, v in pattern.items()
            }
        try:
            super().save(model, path, state_dict)
        finally:
            config.rank_pattern = pattern

    def summary(self, model) -> dict[str, Any]:
        config = model.peft_config["default"]
        ranks = final_ranks(model)
        return {
            "ranks": ranks,
            "total_rank": sum(ranks.values()),
            "target_total_rank": config.target_r * len(ranks),
            "initial_total_rank": config.init_r * len(ranks),
            "schedule": {
                "total_step": config.total_step,
                "tinit": config.tinit,
                "tfinal": config.tfinal,
                "deltaT": config.deltaT,
            },
        }


def _orthogonality_only_in_training(adalora_model) -> None:
    """peft adds the orthogonality penalty to every loss, evaluation included; keep eval_loss a
    plain language-model loss, comparable across methods."""
    train_forward = adalora_model.forward

    def forward(*args, **kwargs):
        if adalora_model.training:
            return train_forward(*args, **kwargs)
        return adalora_model.model.forward(*args, **kwargs)

    adalora_model.forward = forward


def final_ranks(model) -> dict[str, int]:
    """Rank of every adapted module: the non-zero singular values (lora_E) left by the budget."""
    ranks = {}
    for name, param in model.named_parameters():
        if ".lora_E." in name:
            module = name.split(".lora_E.")[0].removeprefix("base_model.model.")
            ranks[module] = int((param.detach() != 0).any(dim=-1).sum())
    return ranks

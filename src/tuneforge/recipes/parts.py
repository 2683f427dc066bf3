"""The pieces a training run is built from, each from the config: tokenizer, data, the model as
the method wraps it, optimizer and schedule, the evaluator, the loop's settings.

Recipes (train, cv, meta-train, retrain) and the benchmarks share these; none of them runs a loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.augment.rows import AugmentPlan, augment_examples
from tuneforge.config import AugmentSection, RunConfig
from tuneforge.data.pipeline import AugmentHook, PreparedData, prepare_data
from tuneforge.data.templates import apply_template
from tuneforge.errors import ConfigError
from tuneforge.evaluation.evaluator import Evaluator
from tuneforge.evaluation.validation import ValidationScorer
from tuneforge.methods import Method, build_method
from tuneforge.methods.init_from import (
    adapter_file,
    load_adapter_weights,
    recorded_base_fingerprint,
)
from tuneforge.methods.lora import MUTATING_INITS
from tuneforge.methods.param_groups import LrRules
from tuneforge.models import (
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
    weights_fingerprint,
)
from tuneforge.train.callbacks import EarlyStopping, OverfitMonitor
from tuneforge.train.fastpath import FastPath, prepare_fast_path, use_liger_kernel
from tuneforge.train.loop import LoopSettings
from tuneforge.train.optim import build_optimizer, build_scheduler, warmup_steps_for
from tuneforge.train.order import total_steps_for
from tuneforge.train.regularize import add_neftune, override_dropout


@dataclass
class TrainingModel:
    """The model as the method wrapped it, with what the rest of the run needs to know."""

    model: torch.nn.Module
    method: Method
    dtype: torch.dtype
    fast: FastPath
    total_steps: int
    params: tuple[int, int]  # (trainable, total)

    @property
    def autocast(self) -> torch.dtype | None:
        return torch.bfloat16 if self.dtype == torch.bfloat16 else None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_run_tokenizer(cfg: RunConfig, model_dir: Path | None = None):
    """The base model's tokenizer with the run's chat template (data.template) applied."""
    model_dir = model_dir or resolve_model_dir(cfg.model.name)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    return tokenizer


def prepare_run_data(cfg: RunConfig, tokenizer) -> PreparedData:
    """The run's train/validation data, tokenised under the config's data policies."""
    d = cfg.data
    return prepare_data(
        d.train,
        d.validation,
        tokenizer,
        fmt=d.format,
        max_length=d.max_length,
        truncation=d.truncation,
        on_bad_row=d.on_bad_row,
        train_on=d.train_on,
        seed=cfg.train.seed,
        augment=augment_hook(d.augment, cfg.train.seed) if d.augment else None,
    )


def augment_hook(section: AugmentSection, default_seed: int) -> AugmentHook:
    """data.augment as the pipeline's hook: copies of the training split, none of validation."""
    plan = AugmentPlan(
        ops=tuple(section.ops),
        n=section.n,
        alpha=section.alpha,
        seed=default_seed if section.seed is None else section.seed,
        lang=section.lang,
        targets=section.targets,
    )

    def hook(train, validation):
        copies, stats = augment_examples(train, plan, held_out=validation)
        return copies, {**stats.to_dict(), "plan": dataclasses.asdict(plan)}

    return hook


def build_training_model(cfg: RunConfig, model_dir: Path, data, accelerator) -> TrainingModel:
    """Load the base, let the method wrap it, upcast what trains, switch on the fast path."""
    dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    m, t = cfg.model, cfg.train
    check_init_from(cfg, model_dir)  # before the model loads
    method = build_method(cfg.method)
    if m.quantize and method.artifact != "adapter":
        raise ConfigError(
            f"model.quantize: nf4 trains an adapter on a frozen 4-bit base; method.name "
            f"{cfg.method.name} trains the base weights (use lora, or model.quantize: null)"
        )
    model = load_model(
        model_dir,
        dtype,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing,
        quantize=m.quantize,
        device=accelerator.device,
    )
    if m.dropout is not None:
        override_dropout(model, m.dropout)
    if t.liger_kernel:
        use_liger_kernel(model, accelerator.device)
    total_steps = t.max_steps or total_steps_for(
        len(data.train), t.batch_size, t.grad_accum, accelerator.num_processes, t.epochs
    )
    method.plan(total_steps)  # before apply: AdaLoRA's rank schedule spans the run
    model = method.apply(model)
    if cfg.method.init_from:
        load_adapter_weights(model, cfg.method.init_from)
    upcast_trainable(model)
    fast = prepare_fast_path(
        model,
        autocast=dtype == torch.bfloat16,
        # NEFTune scales its noise by the row width, which packing would change.
        packing=cfg.data.packing and t.neftune_alpha is None,
        compile=t.compile,
        num_threads=t.num_threads,
        positions_aligned=not method.adds_virtual_tokens,
    )
    params = count_params(model)
    if t.neftune_alpha is not None:
        add_neftune(model, t.neftune_alpha)
    return TrainingModel(model, method, dtype, fast, total_steps, params)


def check_init_from(cfg: RunConfig, model_dir: Path) -> None:
    """method.init_from names a finished adapter run of this base model (ConfigError if not)."""
    source = cfg.method.init_from
    if not source:
        return
    if build_method(cfg.method).artifact != "adapter":
        raise ConfigError(
            f"method.init_from: {cfg.method.name} trains the whole model; init_from loads an "
            "adapter (use model.name to start from a saved full model)"
        )
    if getattr(cfg.method, "init", None) in MUTATING_INITS:
        raise ConfigError(
            f"method.init_from: method.init {cfg.method.init} rewrites the base weights, so a "
            "saved adapter would not apply to them; use init: default with init_from"
        )
    adapter_file(source)
    recorded = recorded_base_fingerprint(source)
    if recorded is not None and recorded != weights_fingerprint(model_dir):
        raise ConfigError(
            f"method.init_from: {source} was trained on another base model than model.name "
            f"{cfg.model.name!r} (weights fingerprint {recorded} != {weights_fingerprint(model_dir)})"
        )


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable weights are kept in fp32 (master copies); frozen ones stay in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def build_optimizer_and_schedule(cfg: RunConfig, built: TrainingModel):
    """AdamW over the method's parameter groups, and the learning-rate schedule."""
    t = cfg.train
    rules = LrRules(
        layer_decay=t.layer_lr_decay,
        direction=t.layer_lr_direction,
        groups=[(g.pattern, g.lr, g.weight_decay) for g in t.lr_groups],
        embedding_lr=t.embedding_lr,
        head_lr=t.head_lr,
    )
    groups = built.method.param_groups(built.model, t.lr, t.weight_decay, rules)
    optimizer = build_optimizer(groups, t.adam_betas, t.adam_eps)
    scheduler = build_scheduler(
        optimizer,
        total_steps=built.total_steps,
        warmup_steps=warmup_steps_for(built.total_steps, t.warmup_steps, t.warmup_ratio),
        schedule=t.scheduler,
        min_lr_ratio=t.min_lr_ratio,
        power=t.poly_power,
    )
    return optimizer, scheduler


def build_evaluator(
    cfg: RunConfig, built, model, data, collate_fn, accelerator, tokenizer, *, emit, samples_dir
) -> Evaluator:
    """Validation loss plus the configured metrics, early stopping and the overfit monitor."""
    e = cfg.eval
    batch_size = e.batch_size or cfg.train.batch_size
    es = e.early_stopping
    scorer = None
    if data.validation:
        try:
            scorer = ValidationScorer(
                tokenizer,
                data.validation,
                e.metrics,
                generate=e.generate,
                max_new_tokens=e.max_new_tokens,
                batch_size=batch_size,
                max_examples=e.generate_max_examples,
                num_samples=e.num_samples,
                lang=e.lang,
                zh_mode=e.zh_rouge,
                autocast_dtype=built.autocast,
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return Evaluator(
        model,
        data.validation,
        collate_fn,
        accelerator,
        batch_size=batch_size,
        autocast=built.autocast,
        emit=emit,
        stopper=EarlyStopping(es.patience, es.metric, es.mode, es.min_delta) if es else None,
        monitor=OverfitMonitor(patience=e.overfit_patience),
        scorer=scorer if scorer is not None and scorer.active else None,
        for_inference=built.method.for_inference,  # the view generation / label scoring use
        samples_dir=samples_dir,
        positions_aligned=not built.method.adds_virtual_tokens,
    )


def loop_settings(cfg: RunConfig, built: TrainingModel, show_progress: bool) -> LoopSettings:
    t = cfg.train
    return LoopSettings(
        total_steps=built.total_steps,
        grad_accum=t.grad_accum,
        batch_size=t.batch_size,
        seed=t.seed,
        max_grad_norm=t.max_grad_norm,
        eval_every_steps=cfg.eval.every_steps,
        log_every_steps=t.log_every_steps,
        autocast_dtype=built.autocast,
        show_progress=show_progress,
        checkpoint_every_steps=cfg.checkpoint.every_steps,
        checkpoint_at_epoch_end=cfg.checkpoint.at_epoch_end,
        on_nonfinite=t.on_nonfinite,
        max_bad_steps=t.max_bad_steps,
        trace_rows=t.trace_rows,
        loss_chunk_tokens=t.loss_chunk_tokens,
        group_by_length=cfg.data.group_by_length and not built.fast.packing,
        positions_aligned=not built.method.adds_virtual_tokens,
    )

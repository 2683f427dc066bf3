"""The fine-tuning recipe: wires config -> data -> model -> method -> loop -> run directory.

This is the one function that reads the whole config; every component it calls takes plain
arguments. Evaluation beyond loss and perplexity, export and serving live elsewhere.
"""

from __future__ import annotations

import copy
import logging
import math
import resource
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import RunConfig
from tuneforge.data.pipeline import PreparedData, collate, prepare_data
from tuneforge.data.templates import apply_template
from tuneforge.evaluation.monitor import EarlyStopping, OverfitMonitor
from tuneforge.methods import build_method
from tuneforge.models import (
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
    weights_fingerprint,
)
from tuneforge.train.loop import LoopSettings, evaluate_loss, total_steps_for, train_loop
from tuneforge.train.optim import build_optimizer, build_scheduler, warmup_steps_for
from tuneforge.train.rundir import RunDir, file_sha256

log = logging.getLogger("tuneforge")


@dataclass
class TrainOutcome:
    run_dir: Path
    summary: dict[str, Any]


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _make_accelerator(seed: int):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(seed)
    return accelerator


def _prepare(cfg: RunConfig, tokenizer) -> PreparedData:
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
    )


def _upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable weights are kept in fp32 (master copies); frozen ones stay in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class _Evaluator:
    """Loss-based evaluation with early stopping, keep-best and the overfitting monitor."""

    def __init__(
        self, cfg: RunConfig, model, data, collate_fn, accelerator, autocast, run: RunDir | None
    ):
        self.model, self.data, self.collate_fn = model, data, collate_fn
        self.accelerator, self.autocast, self.run = accelerator, autocast, run
        self.batch_size = cfg.eval.batch_size or cfg.train.batch_size
        es = cfg.eval.early_stopping
        self.stopper = EarlyStopping(es.patience, es.metric, es.mode, es.min_delta) if es else None
        self.monitor = OverfitMonitor(patience=3)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last: dict[str, float] = {}
        self.train_losses: list[float] = []

    def note_train_loss(self, record: dict[str, Any]) -> None:
        self.train_losses.append(record["loss"])

    def __call__(self, step: int) -> bool:
        if not self.data.validation:
            return False
        metrics = evaluate_loss(
            self.model,
            self.data.validation,
            self.collate_fn,
            self.accelerator,
            self.batch_size,
            self.autocast,
        )
        self.last = metrics
        train_loss = (
            sum(self.train_losses) / len(self.train_losses) if self.train_losses else math.nan
        )
        self.train_losses = []
        warning = self.monitor.update(step, train_loss, metrics["eval_loss"])
        record = {"step": step, "train_loss": train_loss, **metrics}
        if warning:
            record["warning"] = warning
            if self.accelerator.is_main_process:
                log.warning(warning)
        if self.run is not None:
            self.run.log(record)
        if self.stopper is None:
            return False
        if self.stopper.update(metrics[self.stopper.metric], step):
            unwrapped = self.accelerator.unwrap_model(self.model)
            self.best_state = {
                n: p.detach().clone().cpu()
                for n, p in unwrapped.named_parameters()
                if p.requires_grad
            }
        return self.stopper.should_stop

    def restore_best(self) -> None:
        if self.best_state is None:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for name, param in unwrapped.named_parameters():
                if name in self.best_state:
                    param.copy_(self.best_state[name].to(param.device))


def run_training(cfg: RunConfig, *, show_progress: bool = True) -> TrainOutcome:
    """Train according to `cfg` and write the run directory. Returns its path and summary."""
    accelerator = _make_accelerator(cfg.train.seed)
    main = accelerator.is_main_process
    run = RunDir(cfg.output.dir, overwrite=cfg.output.overwrite) if main else None
    accelerator.wait_for_everyone()

    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    data = _prepare(cfg, tokenizer)
    if main:
        rep = data.report
        log.info(
            "data: format %s, %d rows read, %d used, dropped %s; %d train / %d validation",
            rep.format,
            rep.rows_read,
            rep.rows_used,
            rep.dropped or "none",
            rep.train_size,
            rep.validation_size,
        )

    dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    model = load_model(
        model_dir,
        dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    method = build_method(cfg.method)
    model = method.apply(model)
    _upcast_trainable(model)
    trainable, total = count_params(model)

    t = cfg.train
    total_steps = t.max_steps or total_steps_for(
        len(data.train), t.batch_size, t.grad_accum, accelerator.num_processes, t.epochs
    )
    optimizer = build_optimizer(
        method.param_groups(model, t.lr, t.weight_decay), t.adam_betas, t.adam_eps
    )
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    scheduler = build_scheduler(
        optimizer, total_steps=total_steps, warmup_steps=warmup, schedule=t.scheduler
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id)
    evaluator = _Evaluator(cfg, model, data, collate_fn, accelerator, autocast, run)

    if run is not None:
        run.write_config(cfg.to_dict())
        run.write_manifest(
            _manifest(cfg, model_dir, data, accelerator, dtype, trainable, total, total_steps)
        )

    def on_log(record: dict[str, Any]) -> None:
        evaluator.note_train_loss(record)
        if run is not None:
            run.log(record)

    settings = LoopSettings(
        total_steps=total_steps,
        grad_accum=t.grad_accum,
        batch_size=t.batch_size,
        seed=t.seed,
        max_grad_norm=t.max_grad_norm,
        eval_every_steps=cfg.eval.every_steps,
        log_every_steps=t.log_every_steps,
        autocast_dtype=autocast,
        show_progress=show_progress,
    )
    result = train_loop(
        model,
        optimizer,
        scheduler,
        data.train,
        collate_fn,
        accelerator,
        settings,
        on_step=method.on_step,
        on_log=on_log,
        on_eval=evaluator,
    )
    if evaluator.stopper is not None and evaluator.best_state is not None:
        evaluator.restore_best()
    accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(model)
    summary = {
        "steps": result.steps,
        "total_steps": total_steps,
        "stopped_early": result.stopped_early,
        "train_runtime_s": round(result.runtime_s, 3),
        "train_tokens": result.input_tokens,
        "loss_tokens": result.train_tokens,
        "tokens_per_s": round(result.input_tokens / max(result.runtime_s, 1e-9), 2),
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "train_loss": result.mean_loss,
        "final_train_loss": result.last_loss,
        "trainable_params": trainable,
        "total_params": total,
        "eval": evaluator.last,
        "best": (
            {
                "metric": evaluator.stopper.metric,
                "value": evaluator.stopper.best,
                "step": evaluator.stopper.best_step,
            }
            if evaluator.stopper is not None
            else None
        ),
        "method": {"name": cfg.method.name, **method.summary(unwrapped)},
        "artifact": method.artifact,
    }
    if run is not None:
        _save_artifacts(run, method, unwrapped, tokenizer, dtype)
        run.write_summary(summary)
    accelerator.wait_for_everyone()
    return TrainOutcome(Path(cfg.output.dir), summary)


def _save_artifacts(run: RunDir, method, model, tokenizer, dtype: torch.dtype) -> None:
    target = run.adapter_dir if method.artifact == "adapter" else run.model_dir
    if method.artifact == "model":
        # Save in the dtype the model was loaded in, not the fp32 master copies.
        model = copy.deepcopy(model).to(dtype)
    method.save(model, str(target))
    tokenizer.save_pretrained(str(run.tokenizer_dir))


def _manifest(
    cfg, model_dir, data, accelerator, dtype, trainable, total, total_steps
) -> dict[str, Any]:
    files = {"train": cfg.data.train}
    if isinstance(cfg.data.validation, str):
        files["validation"] = cfg.data.validation
    return {
        "config_digest": cfg.digest(),
        "base_model": {
            "name": cfg.model.name,
            "dir": str(model_dir),
            "fingerprint": weights_fingerprint(model_dir),
        },
        "data": {
            "files": {
                k: {"path": str(Path(v).resolve()), "sha256": file_sha256(v)}
                for k, v in files.items()
            },
            **data.report.to_dict(),
        },
        "method": cfg.method.name,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(accelerator.device),
        "world_size": accelerator.num_processes,
        "trainable_params": trainable,
        "total_params": total,
        "total_steps": total_steps,
    }

"""The fine-tuning recipe: wires config -> data -> model -> method -> loop -> run directory.

This is the one function that reads the whole config; every component it calls takes plain
arguments. Evaluation beyond loss and perplexity, export and serving live elsewhere.
"""

from __future__ import annotations

import copy
import logging
import math
import resource
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.config import ConfigError, RunConfig
from tuneforge.data.packing import pack_examples
from tuneforge.data.pipeline import PreparedData, collate, prepare_data
from tuneforge.data.templates import apply_template
from tuneforge.evaluation.monitor import EarlyStopping, OverfitMonitor
from tuneforge.evaluation.validation import ValidationScorer, append_samples, reset_samples
from tuneforge.methods import build_method
from tuneforge.models import (
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
    weights_fingerprint,
)
from tuneforge.train.checkpoint import Checkpoint, find_checkpoint, load_checkpoint
from tuneforge.train.fastpath import prepare_fast_path
from tuneforge.train.guards import StopSignals
from tuneforge.train.loop import LoopSettings, evaluate_loss, total_steps_for, train_loop
from tuneforge.train.optim import (
    LrRules,
    build_optimizer,
    build_scheduler,
    describe_param_groups,
    warmup_steps_for,
)
from tuneforge.train.regularize import add_neftune, l1_penalty, override_dropout
from tuneforge.train.resume import TrainingState, set_rng_state, start_checkpointing, tokens_digest
from tuneforge.train.rundir import RunDir, file_sha256

log = logging.getLogger("tuneforge")


@dataclass
class TrainOutcome:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: int = 0  # the signal that stopped training (no summary then), or 0
    checkpoint: Path | None = None  # the last checkpoint written


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
    )


def _lr_rules(t) -> LrRules:
    """train.layer_lr_decay / layer_lr_direction / lr_groups / embedding_lr / head_lr."""
    return LrRules(
        layer_decay=t.layer_lr_decay,
        direction=t.layer_lr_direction,
        groups=[(g.pattern, g.lr, g.weight_decay) for g in t.lr_groups],
        embedding_lr=t.embedding_lr,
        head_lr=t.head_lr,
    )


def _upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable weights are kept in fp32 (master copies); frozen ones stay in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _validation_scorer(cfg: RunConfig, tokenizer, data, autocast) -> ValidationScorer | None:
    """Generation / label metrics on the validation set, or None when only loss is asked for."""
    e = cfg.eval
    try:
        scorer = ValidationScorer(
            tokenizer,
            data.validation,
            e.metrics,
            generate=e.generate,
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size or cfg.train.batch_size,
            max_examples=e.generate_max_examples,
            num_samples=e.num_samples,
            lang=e.lang,
            zh_mode=e.zh_rouge,
            autocast_dtype=autocast,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return scorer if scorer.active else None


class _Evaluator:
    """Validation loss (plus generation / label metrics), early stopping, keep-best, overfit warning."""

    def __init__(
        self, cfg: RunConfig, model, data, collate_fn, accelerator, autocast, run, emit, tokenizer
    ):
        self.model, self.data, self.collate_fn = model, data, collate_fn
        self.accelerator, self.autocast, self.run, self.emit = accelerator, autocast, run, emit
        self.batch_size = cfg.eval.batch_size or cfg.train.batch_size
        es = cfg.eval.early_stopping
        self.stopper = EarlyStopping(es.patience, es.metric, es.mode, es.min_delta) if es else None
        self.monitor = OverfitMonitor(patience=cfg.eval.overfit_patience)
        self.scorer = (
            _validation_scorer(cfg, tokenizer, data, autocast) if data.validation else None
        )
        if run is not None and not run.resumed:
            reset_samples(run.path)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.for_inference: Any = lambda model: model  # the method's view for generation
        self.last: dict[str, float] = {}
        self.train_losses: list[float] = []

    def note_train_loss(self, record: dict[str, Any]) -> None:
        if "nonfinite" not in record:  # a skipped step has no loss to average
            self.train_losses.append(record["loss"])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run evaluates and stops exactly the same."""
        return {
            "stopper": self.stopper.state_dict() if self.stopper else None,
            "monitor": self.monitor.state_dict(),
            "best_state": self.best_state,
            "last": self.last,
            "train_losses": list(self.train_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stopper is not None and state["stopper"] is not None:
            self.stopper.load_state_dict(state["stopper"])
        self.monitor.load_state_dict(state["monitor"])
        self.best_state, self.last = state["best_state"], state["last"]
        self.train_losses = list(state["train_losses"])

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
        if self.scorer is not None:
            extra, samples = self.scorer(
                self.for_inference(self.accelerator.unwrap_model(self.model)), self.accelerator
            )
            metrics.update(extra)
            if self.run is not None:
                append_samples(self.run.path, step, samples)
        self.last = metrics
        train_loss = (
            sum(self.train_losses) / len(self.train_losses) if self.train_losses else math.nan
        )
        self.train_losses = []
        warning = self.monitor.update(step, train_loss, metrics["eval_loss"])
        record = {"step": step, "train_loss": train_loss, **metrics}
        if warning:
            record["warning"] = warning
            if self.accelerator.is_main_process:  # above the progress bar, not through it
                tqdm.write(f"warning: {warning}", file=sys.stderr)
        self.emit(record)
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


def run_training(
    cfg: RunConfig,
    *,
    show_progress: bool = True,
    resume: str | None = None,
    allow_config_change: bool = False,
) -> TrainOutcome:
    """Train according to `cfg` and write the run directory. Returns its path and summary.

    `resume` ("auto" or a checkpoint name/path under output.dir/checkpoints) continues a run
    exactly; a missing, corrupt or incompatible checkpoint raises CheckpointError.
    """
    accelerator = _make_accelerator(cfg.train.seed)
    main = accelerator.is_main_process
    ckpt = _resume_checkpoint(cfg, resume) if resume else None  # fails before anything loads
    run = (
        RunDir(cfg.output.dir, overwrite=cfg.output.overwrite, resume=ckpt is not None)
        if main
        else None
    )
    sinks = _record_sinks(cfg, run)
    accelerator.wait_for_everyone()

    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    apply_template(tokenizer, cfg.data.template)
    data = prepare_run_data(cfg, tokenizer)
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
    if cfg.model.dropout is not None:
        override_dropout(model, cfg.model.dropout)
    t = cfg.train
    total_steps = t.max_steps or total_steps_for(
        len(data.train), t.batch_size, t.grad_accum, accelerator.num_processes, t.epochs
    )
    method = build_method(cfg.method)
    method.plan(total_steps)  # before apply: AdaLoRA's rank schedule spans the run
    model = method.apply(model)
    _upcast_trainable(model)
    fast = prepare_fast_path(
        model,
        autocast=dtype == torch.bfloat16,
        # NEFTune scales its noise by the row width, which packing would change.
        packing=cfg.data.packing and t.neftune_alpha is None,
        compile=t.compile,
        num_threads=t.num_threads,
    )
    trainable, total = count_params(model)
    if t.neftune_alpha is not None:
        add_neftune(model, t.neftune_alpha)
    penalty = l1_penalty(model.named_parameters(), t.l1) if t.l1 > 0 else None
    optimizer = build_optimizer(
        method.param_groups(model, t.lr, t.weight_decay, _lr_rules(t)), t.adam_betas, t.adam_eps
    )
    warmup = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    scheduler = build_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=warmup,
        schedule=t.scheduler,
        min_lr_ratio=t.min_lr_ratio,
        power=t.poly_power,
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    padded = partial(collate, pad_id=tokenizer.pad_token_id)
    collate_fn = pack_examples if fast.packing else padded
    evaluator = _Evaluator(
        cfg, model, data, collate_fn, accelerator, autocast, run, sinks.emit, tokenizer
    )
    evaluator.for_inference = method.for_inference  # generation / label scoring view

    manifest = _manifest(cfg, model_dir, data, accelerator, dtype, trainable, total, total_steps)
    manifest["fast_path"] = fast.to_dict()
    stateful = {"evaluator": evaluator}  # a method with state_dict() is checkpointed too
    if hasattr(method, "state_dict"):
        stateful["method"] = method
    state, counters, rng = _checkpointing(
        cfg,
        ckpt,
        allow_config_change,
        accelerator,
        model,
        optimizer,
        scheduler,
        callbacks=stateful,
        identity=_identity(cfg, manifest, data, dtype),
    )
    if run is not None:
        run.write_config(cfg.to_dict())
        run.write_manifest(manifest)

    def on_log(record: dict[str, Any]) -> None:
        evaluator.note_train_loss(record)
        sinks.emit(record)

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
        checkpoint_every_steps=cfg.checkpoint.every_steps,
        checkpoint_at_epoch_end=cfg.checkpoint.at_epoch_end,
        on_nonfinite=t.on_nonfinite,
        max_bad_steps=t.max_bad_steps,
        trace_rows=t.trace_rows,
        loss_chunk_tokens=t.loss_chunk_tokens,
        group_by_length=cfg.data.group_by_length and not fast.packing,
    )
    with StopSignals() as stop_requested:
        if rng is not None:
            set_rng_state(rng)  # last, so that nothing between here and step 1 draws from it
        result = train_loop(
            model,
            optimizer,
            scheduler,
            data.train,
            collate_fn,
            accelerator,
            settings,
            on_step=method.on_step,
            penalty=penalty,
            on_log=on_log,
            on_eval=evaluator,
            resume=counters,
            on_checkpoint=state.save,
            stop_requested=stop_requested,
        )
    if result.interrupted:  # a checkpoint was saved; no artifact, no summary
        sinks.close()
        return TrainOutcome(Path(cfg.output.dir), {}, result.interrupted, state.last_saved)
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
        "skipped_steps": result.skipped_steps,  # non-finite steps (train.on_nonfinite: skip)
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
        "lr_groups": describe_param_groups(optimizer),
    }
    if run is not None:
        _save_artifacts(run, method, unwrapped, tokenizer, dtype)
        run.write_summary(summary)
        sinks.close()
        if cfg.log.report and data.validation:
            from tuneforge.evaluation.htmlreport import write_report_or_warn

            write_report_or_warn(run.path)
    accelerator.wait_for_everyone()
    return TrainOutcome(Path(cfg.output.dir), summary, checkpoint=state.last_saved)


def _resume_checkpoint(cfg: RunConfig, spec: str) -> Checkpoint:
    """The checkpoint `--resume SPEC` names, read back and verified (every rank reads it)."""
    return load_checkpoint(find_checkpoint(Path(cfg.output.dir) / "checkpoints", spec))


def _identity(cfg: RunConfig, manifest: dict[str, Any], data, dtype) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume (checked field by field)."""
    files = manifest["data"]["files"]
    validation = files["validation"]["sha256"] if "validation" in files else cfg.data.validation
    return {
        "model": {"fingerprint": manifest["base_model"]["fingerprint"], "dtype": str(dtype)},
        "data": {
            "train": {"sha256": files["train"]["sha256"]},
            "validation": validation,
            "tokens_sha256": tokens_digest(data.train),
            "max_length": cfg.data.max_length,
        },
        "train": {k: getattr(cfg.train, k) for k in ("batch_size", "grad_accum", "seed")},
        "world_size": manifest["world_size"],
        "total_steps": manifest["total_steps"],
        "method": cfg.method.model_dump(mode="json"),
    }


def _checkpointing(
    cfg, ckpt, allow_change, accelerator, model, optimizer, scheduler, *, callbacks, identity
) -> tuple[TrainingState, dict[str, Any] | None, dict[str, Any] | None]:
    """Set up checkpoint saving, and restore `ckpt` when resuming: (state, counters, rng)."""
    es = cfg.eval.early_stopping
    metric, mode = (es.metric, es.mode) if es else ("eval_loss", "min")
    every = cfg.eval.every_steps
    evaluator = callbacks["evaluator"]

    def score(step: int) -> dict[str, Any] | None:  # the evaluation at this step, if one ran
        if not (evaluator.data.validation and every and step % every == 0):
            return None
        return {"metric": metric, "mode": mode, "value": evaluator.last.get(metric)}

    return start_checkpointing(
        Path(cfg.output.dir),
        ckpt,
        allow_change=allow_change,
        keep_last=cfg.checkpoint.keep_last,
        rank=accelerator.process_index,
        barrier=accelerator.wait_for_everyone,
        model=accelerator.unwrap_model(model),
        optimizer=optimizer,
        scheduler=scheduler,
        callbacks=callbacks,
        meta={"identity": identity, "config": cfg.to_dict(), "config_digest": cfg.digest()},
        score=score,
    )


class _RecordSinks:
    """Where metrics records go: metrics.jsonl, and TensorBoard when log.tensorboard is on."""

    def __init__(self, run: RunDir | None, tensorboard) -> None:
        self.run, self.tensorboard = run, tensorboard

    def emit(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _record_sinks(cfg: RunConfig, run: RunDir | None) -> _RecordSinks:
    if not (cfg.log.tensorboard and run is not None):
        return _RecordSinks(run, None)
    from tuneforge.evaluation.tensorboard import TensorBoardMissing, TensorBoardSink

    try:
        return _RecordSinks(run, TensorBoardSink(run.path))
    except TensorBoardMissing as err:
        raise ConfigError(str(err)) from None


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

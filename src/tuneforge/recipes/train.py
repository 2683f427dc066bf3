"""The fine-tuning recipe: wires config -> data -> model -> method -> loop -> run directory.

Besides the CLI, recipes are the only code that reads the whole config; each step below hands
plain arguments to the components it calls. Export and serving are other recipes.
"""

from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import RunConfig
from tuneforge.data.packing import pack_examples
from tuneforge.data.pipeline import PreparedData, collate
from tuneforge.evaluation.evaluator import Evaluator
from tuneforge.heap import peak_rss_bytes, reset_peak_rss
from tuneforge.methods import Method
from tuneforge.models import check_license, resolve_model_dir
from tuneforge.paths import write_dir_atomic, writing
from tuneforge.recipes.distributed import (
    agree_on_config,
    check_method,
    run_accelerator,
    run_strategy,
)
from tuneforge.recipes.manifest import resume_identity, run_manifest
from tuneforge.recipes.parts import (
    TrainingModel,
    build_evaluator,
    build_optimizer_and_schedule,
    build_training_model,
    load_run_tokenizer,
    loop_settings,
    prepare_run_data,
)
from tuneforge.recipes.plan import Plan, check_memory
from tuneforge.reporting.sinks import open_sinks
from tuneforge.train.checkpoint import Checkpoint, find_checkpoint, load_checkpoint
from tuneforge.train.collective import gathered
from tuneforge.train.guards import StopSignals
from tuneforge.train.loop import LoopResult, train_loop
from tuneforge.train.optim import describe_param_groups
from tuneforge.train.regularize import l1_penalty
from tuneforge.train.resume import TrainingState, set_rng_state, start_checkpointing
from tuneforge.train.rundir import RunDir
from tuneforge.train.strategy import full_state_dict, prepare_training

log = logging.getLogger("tuneforge")


@dataclass
class TrainOutcome:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: int = 0  # the signal that stopped training (no summary then), or 0
    checkpoint: Path | None = None  # the last checkpoint written


def reset_peak_memory(device: torch.device) -> None:
    """Count peak memory from here: a run in a process that ran others before (tests, the web
    page) reports its own peak, which is what the plan predicts (from the memory held now)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory_mb(device: torch.device) -> float:
    """Peak resident memory of this process since reset_peak_memory (CPU), or peak allocated
    CUDA memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


@dataclass
class _Job:
    """Everything one training run has built, handed from step to step of the recipe."""

    accelerator: Any
    run: RunDir | None
    sinks: Any
    tokenizer: Any
    data: PreparedData
    built: TrainingModel
    model: torch.nn.Module  # as accelerate prepared it
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collate_fn: Any
    evaluator: Evaluator
    manifest: dict[str, Any]
    plan: Plan | None = None  # the predicted memory and time (recipes/plan.py), where sized
    step_ends: list[float] = field(default_factory=list)  # elapsed_s of each logged step


def run_training(
    cfg: RunConfig,
    *,
    show_progress: bool = True,
    resume: str | None = None,
    allow_config_change: bool = False,
    force: bool = False,
) -> TrainOutcome:
    """Train according to `cfg` and write the run directory. Returns its path and summary.

    `resume` ("auto" or a checkpoint name/path under output.dir/checkpoints) continues a run
    exactly; a missing, corrupt or incompatible checkpoint raises CheckpointError. A run
    predicted to exceed the memory available raises PlanError before the model loads, unless
    `force`.
    """
    strategy = run_strategy(cfg)  # a strategy that cannot run this config fails here
    accelerator = run_accelerator(cfg, strategy)
    agree_on_config(accelerator, cfg)
    ckpt = _resume_checkpoint(cfg, resume) if resume else None  # fails before anything loads
    run = None
    if accelerator.is_main_process:
        run = RunDir(cfg.output.dir, overwrite=cfg.output.overwrite, resume=ckpt is not None)
    sinks = open_sinks(run, cfg.log.tensorboard)
    accelerator.wait_for_everyone()
    job = _prepare(cfg, accelerator, run, sinks, force)
    state, counters, rng = _checkpointing(cfg, job, ckpt, allow_config_change)
    if run is not None:
        run.write_config(cfg.to_dict())
        run.write_manifest(job.manifest)
    result = _train(cfg, job, state, counters, rng, show_progress)
    if result.interrupted:  # a checkpoint was saved; no artifact, no summary
        sinks.close()
        return TrainOutcome(Path(cfg.output.dir), {}, result.interrupted, state.last_saved)
    summary = _finish(cfg, job, result)
    sinks.close()
    if run is not None and cfg.log.report and job.data.validation:
        from tuneforge.reporting.htmlreport import write_report_or_warn

        write_report_or_warn(run.path)
    accelerator.wait_for_everyone()
    return TrainOutcome(Path(cfg.output.dir), summary, checkpoint=state.last_saved)


def _prepare(cfg: RunConfig, accelerator, run: RunDir | None, sinks: Any, force: bool) -> _Job:
    """Data, the memory check, the wrapped model, optimizer and schedule, the evaluator and the
    manifest."""
    check_license(cfg.model.name, cfg.model.accept_license)
    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_run_tokenizer(cfg, model_dir)
    data = prepare_run_data(cfg, tokenizer)
    if accelerator.is_main_process:
        _log_data(data)
    plan = check_memory(cfg, data, force=force) if accelerator.device.type == "cpu" else None
    reset_peak_memory(accelerator.device)  # from about the plan's base (the free heap returned)
    built = build_training_model(cfg, model_dir, data, accelerator)
    check_method(accelerator.strategy, built.method)
    model, optimizer, scheduler = prepare_training(
        accelerator, built.model, lambda _: build_optimizer_and_schedule(cfg, built)
    )
    padded = partial(collate, pad_id=tokenizer.pad_token_id)
    collate_fn = pack_examples if built.fast.packing else padded
    evaluator = build_evaluator(
        cfg,
        built,
        model,
        data,
        collate_fn,
        accelerator,
        tokenizer,
        emit=sinks.emit,
        samples_dir=run.path if run is not None else None,
    )
    evaluator.start(resumed=run is not None and run.resumed)
    manifest = run_manifest(cfg, model_dir, data, built, accelerator)
    return _Job(
        accelerator,
        run,
        sinks,
        tokenizer,
        data,
        built,
        model,
        optimizer,
        scheduler,
        collate_fn,
        evaluator,
        manifest,
        plan,
    )


def _train(cfg: RunConfig, job: _Job, state, counters, rng, show_progress: bool) -> LoopResult:
    """The loop itself, with Ctrl-C / SIGTERM turned into a checkpoint and a clean exit."""

    def on_log(record: dict[str, Any]) -> None:
        if "elapsed_s" in record:
            job.step_ends.append(record["elapsed_s"])
        job.evaluator.note_train_loss(record)
        job.sinks.emit(record)

    with StopSignals() as stop_requested:
        if rng is not None:
            set_rng_state(rng)  # last, so that nothing between here and step 1 draws from it
        return train_loop(
            job.model,
            job.optimizer,
            job.scheduler,
            job.data.train,
            job.collate_fn,
            job.accelerator,
            loop_settings(cfg, job.built, show_progress),
            on_step=job.built.method.on_step,
            penalty=_penalty(cfg, job.model),
            on_log=on_log,
            on_eval=job.evaluator,
            resume=counters,
            on_checkpoint=state.save,
            stop_requested=stop_requested,
        )


def _log_data(data: PreparedData) -> None:
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


def _penalty(cfg: RunConfig, model: torch.nn.Module):
    """train.l1 as a per-step penalty term, or None."""
    return l1_penalty(model.named_parameters(), cfg.train.l1) if cfg.train.l1 > 0 else None


def _resume_checkpoint(cfg: RunConfig, spec: str) -> Checkpoint:
    """The checkpoint `--resume SPEC` names, read back and verified (every rank reads it)."""
    return load_checkpoint(find_checkpoint(Path(cfg.output.dir) / "checkpoints", spec))


def _checkpointing(
    cfg: RunConfig, job: _Job, ckpt: Checkpoint | None, allow_change: bool
) -> tuple[TrainingState, dict[str, Any] | None, dict[str, Any] | None]:
    """Set up checkpoint saving, and restore `ckpt` when resuming: (state, counters, rng)."""
    es = cfg.eval.early_stopping
    metric, mode = (es.metric, es.mode) if es else ("eval_loss", "min")
    every, evaluator = cfg.eval.every_steps, job.evaluator
    stateful: dict[str, Any] = {"evaluator": evaluator}
    if hasattr(job.built.method, "state_dict"):  # e.g. AdaLoRA's rank allocator
        stateful["method"] = job.built.method

    def score(step: int) -> dict[str, Any] | None:  # the evaluation at this step, if one ran
        if not (evaluator.active and every and step % every == 0):
            return None
        return {"metric": metric, "mode": mode, "value": evaluator.last.get(metric)}

    identity = resume_identity(cfg, job.manifest, job.data, job.built.dtype)
    return start_checkpointing(
        Path(cfg.output.dir),
        ckpt,
        allow_change=allow_change,
        keep_last=cfg.checkpoint.keep_last,
        rank=job.accelerator.process_index,
        barrier=job.accelerator.wait_for_everyone,
        model=job.accelerator.unwrap_model(job.model),
        optimizer=job.optimizer,
        scheduler=job.scheduler,
        callbacks=stateful,
        meta={"identity": identity, "config": cfg.to_dict(), "config_digest": cfg.digest()},
        score=score,
        sharded=job.accelerator.strategy == "fsdp2",
    )


def _finish(cfg: RunConfig, job: _Job, result: LoopResult) -> dict[str, Any]:
    """Restore the best weights if early stopping kept them, save the artifact, write the summary."""
    built, evaluator, run = job.built, job.evaluator, job.run
    evaluator.restore_best()  # a no-op unless early stopping kept a best state
    job.accelerator.wait_for_everyone()
    unwrapped = job.accelerator.unwrap_model(job.model)
    trainable, total = built.params
    summary_peak_mb = peak_memory_mb(job.accelerator.device)
    summary = {
        "steps": result.steps,
        "total_steps": built.total_steps,
        "stopped_early": result.stopped_early,
        "train_runtime_s": round(result.runtime_s, 3),
        "train_tokens": result.input_tokens,
        "loss_tokens": result.train_tokens,
        "tokens_per_s": round(result.input_tokens / max(result.runtime_s, 1e-9), 2),
        "peak_memory_mb": round(summary_peak_mb, 1),
        "peak_memory_mb_per_rank": [  # every process's own peak, rank order
            round(v, 1) for v in gathered(job.accelerator, peak_memory_mb(job.accelerator.device))
        ],
        "strategy": job.accelerator.strategy,
        "train_loss": result.mean_loss,
        "final_train_loss": result.last_loss,
        "skipped_steps": result.skipped_steps,  # non-finite steps (train.on_nonfinite: skip)
        "trainable_params": trainable,
        "total_params": total,
        "eval": evaluator.last,
        "best": evaluator.best(),
        "method": {"name": cfg.method.name, **built.method.summary(unwrapped)},
        "artifact": built.method.artifact,
        "lr_groups": describe_param_groups(job.optimizer),
        "plan": predicted_vs_measured(job.plan, summary_peak_mb, job.step_ends, cfg),
    }
    state = full_state_dict(job.accelerator, job.model)  # sharded weights, gathered to rank 0
    if run is not None:
        _save_artifacts(run, built.method, unwrapped, job.tokenizer, built.dtype, state)
        with writing(run.path / "summary.json", _FINAL_SAVE_NOTE):
            run.write_summary(summary)
    return summary


#: What a failed final save tells the user: the checkpoints are still there to finish from.
_FINAL_SAVE_NOTE = (
    " (the trained weights were not saved; the checkpoints are kept: free space and finish "
    "the run with --resume auto)"
)


def _save_artifacts(
    run: RunDir, method: Method, model, tokenizer, dtype: torch.dtype, state=None
) -> None:
    """adapter/ (or model/) and tokenizer/, each written beside its final name and renamed in;
    `state` holds the weights when they were sharded (FSDP2), gathered on rank 0."""
    target = run.adapter_dir if method.artifact == "adapter" else run.model_dir
    if method.artifact == "model":
        # Save in the dtype the model was loaded in, not the fp32 master copies.
        if state is None:
            model = copy.deepcopy(model).to(dtype)
        else:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write_dir_atomic(target, lambda tmp: method.save(model, str(tmp), state), _FINAL_SAVE_NOTE)
    write_dir_atomic(
        run.tokenizer_dir, lambda tmp: tokenizer.save_pretrained(str(tmp)), _FINAL_SAVE_NOTE
    )


def predicted_vs_measured(
    plan: Plan | None, peak_mb: float, step_ends: list[float], cfg: RunConfig
) -> dict[str, Any] | None:
    """The plan's peak memory and step time beside what the run measured (median step, so
    that steps carrying an evaluation or a checkpoint do not count; the first step, which
    also sets up kernels and the allocator, left out when at least three were logged)."""
    if plan is None:
        return None
    starts = [0.0, *step_ends[:-1]] if step_ends else []  # a resume may run no step here
    steps = [b - a for a, b in zip(starts, step_ends, strict=True)]
    steps = steps[1:] if len(steps) >= 3 else steps
    every = cfg.train.log_every_steps
    step_s = statistics.median(steps) / every if steps else None
    predicted_mb = plan.memory.peak_bytes / 2**20
    return {
        "predicted_peak_mb": round(predicted_mb, 1),
        "measured_peak_mb": round(peak_mb, 1),
        "peak_ratio": round(peak_mb / predicted_mb, 3),
        "predicted_step_s": round(plan.time.step_s, 3),
        "measured_step_s": round(step_s, 3) if step_s else None,
        "step_ratio": round(step_s / plan.time.step_s, 3) if step_s else None,
        "memory_items_mb": {k: round(v / 2**20, 1) for k, v in plan.memory.items.items()},
        "time_items_s": {k: round(v, 4) for k, v in plan.time.items.items()},
        "calibration": {
            "matmul_gflops": round(plan.machine.matmul_flops / 1e9, 1),
            "bandwidth_gb_s": round(plan.machine.bandwidth / 1e9, 2),
        },
    }

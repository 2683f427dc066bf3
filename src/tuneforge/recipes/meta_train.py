"""The meta-train recipe (`tuneforge meta-train`): Reptile or first-order MAML over the method's
trainable weights (LoRA by default) across tasks, saved as a normal run directory.

It wires config -> tasks -> model (recipes/parts) -> meta-steps (train/meta) -> checkpoints
(train/checkpoint) -> adapter; `tuneforge train` continues from it with `method.init_from`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.config import RunConfig
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.errors import ConfigError
from tuneforge.models import resolve_model_dir, weights_fingerprint
from tuneforge.recipes.meta_tasks import load_tasks
from tuneforge.recipes.parts import build_training_model, load_run_tokenizer
from tuneforge.train.checkpoint import (
    Checkpoint,
    Checkpointer,
    find_checkpoint,
    load_checkpoint,
    state_files,
    tensor_files,
)
from tuneforge.train.guards import StopSignals
from tuneforge.train.meta import (
    InnerLoop,
    adapted_query_loss,
    apply_meta_update,
    meta_step,
    sample_episode,
    snapshot,
    trainable,
)
from tuneforge.train.resume import (
    check_finite,
    check_identity,
    load_trainable,
    reopen_run_dir,
    rng_state,
    set_rng_state,
)
from tuneforge.train.rundir import RunDir

log = logging.getLogger("tuneforge")


@dataclass
class MetaOutcome:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: int = 0


@dataclass
class _Meta:
    """What the meta-training steps share."""

    cfg: RunConfig
    run: RunDir
    model: torch.nn.Module
    method: Any
    tokenizer: Any
    tasks: dict[str, list[TokenizedExample]]
    train_tasks: list[str]
    collate: Any
    inner: InnerLoop
    optimizer: torch.optim.Optimizer
    fresh: dict[str, torch.Tensor]  # the adapter as the method initialised it
    identity: dict[str, Any]
    checkpointer: Checkpointer


def run_meta_training(
    cfg: RunConfig, *, show_progress: bool = True, resume: str | None = None
) -> MetaOutcome:
    """Meta-train and write the run directory; `resume` ("auto" or a checkpoint) continues exactly."""
    if cfg.meta is None:
        raise ConfigError(
            "meta: tuneforge meta-train needs a meta: section (algorithm, tasks, ...)"
        )
    out = Path(cfg.output.dir)
    ckpt = load_checkpoint(find_checkpoint(out / "checkpoints", resume)) if resume else None
    job = _prepare(cfg, ckpt)
    start, rng = _restore(job, ckpt) if ckpt is not None else (0, None)
    job.run.write_config(cfg.to_dict())
    job.run.write_manifest(_manifest(job))
    interrupted = _loop(job, start, rng, show_progress)
    if interrupted:
        return MetaOutcome(out, {}, interrupted)
    summary = _finish(job)
    return MetaOutcome(out, summary)


def _prepare(cfg: RunConfig, ckpt: Checkpoint | None) -> _Meta:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run = RunDir(cfg.output.dir, overwrite=cfg.output.overwrite, resume=ckpt is not None)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    model_dir = resolve_model_dir(cfg.model.name)
    tokenizer = load_run_tokenizer(cfg, model_dir)
    tasks, files = load_tasks(cfg, tokenizer)
    train_tasks = [t for t in tasks if t not in cfg.meta.held_out]
    sized = cfg.model_copy(deep=True)
    sized.train.max_steps = cfg.meta.meta_steps  # the method's plan spans the meta-steps
    built = build_training_model(sized, model_dir, None, accelerator)
    model = built.model.to(accelerator.device)
    params = trainable(model)
    meta = cfg.meta
    opt_cls = torch.optim.Adam if meta.meta_optimizer == "adam" else torch.optim.SGD
    identity = {
        "model": {"fingerprint": weights_fingerprint(model_dir), "dtype": str(built.dtype)},
        "data": files,
        "method": cfg.method.model_dump(mode="json"),
        "meta": meta.model_dump(mode="json"),
        "seed": cfg.train.seed,
        "max_length": cfg.data.max_length,
    }
    return _Meta(
        cfg=cfg,
        run=run,
        model=model,
        method=built.method,
        tokenizer=tokenizer,
        tasks=tasks,
        train_tasks=train_tasks,
        collate=partial(collate, pad_id=tokenizer.pad_token_id),
        inner=InnerLoop(
            meta.inner_steps,
            meta.inner_lr,
            meta.inner_optimizer,
            cfg.train.max_grad_norm,
            built.autocast,
        ),
        optimizer=opt_cls(list(params.values()), lr=meta.meta_lr),
        fresh=snapshot(params),
        identity=identity,
        checkpointer=Checkpointer(run.checkpoints_dir, cfg.checkpoint.keep_last),
    )


def _restore(job: _Meta, ckpt: Checkpoint) -> tuple[int, dict[str, Any] | None]:
    """Meta-weights, optimizer state and episode counter from `ckpt`; returns (step, RNG state)."""
    if ckpt.meta.get("kind") != "meta-train":
        raise ConfigError(f"--resume: {ckpt.path} is not a meta-train checkpoint")
    check_identity(ckpt.meta["identity"], job.identity, False, ckpt.path)
    load_trainable(job.model, ckpt.tensors("model"), ckpt.path)
    job.optimizer.load_state_dict(ckpt.state("optimizer"))
    job.checkpointer.clean_stale()
    job.checkpointer.discard_all(after_step=ckpt.step)
    reopen_run_dir(job.run.path, ckpt.step)
    log.info("resuming meta-training from %s (step %d)", ckpt.path, ckpt.step)
    return ckpt.step, ckpt.state("rng-rank000")


def _episodes(job: _Meta, step: int):
    """The tasks and rows of one meta-step: a function of (seed, step) alone, so a resume
    draws exactly what an uninterrupted run would."""
    meta = job.cfg.meta
    rng = random.Random(f"{job.cfg.train.seed}:meta-step:{step}")
    names = rng.sample(job.train_tasks, min(meta.tasks_per_step, len(job.train_tasks)))
    return [
        sample_episode(t, job.tasks[t], meta.shots, meta.query_shots, rng) for t in sorted(names)
    ]


def _loop(job: _Meta, start: int, rng: dict[str, Any] | None, show_progress: bool) -> int:
    """Meta-steps start+1 .. meta_steps; returns the signal that stopped them, or 0."""
    meta, every = job.cfg.meta, job.cfg.checkpoint.every_steps
    if start == 0:
        job.checkpointer.clean_stale()
        job.checkpointer.discard_all()
    bar = tqdm(total=meta.meta_steps, initial=start, desc="meta-train", disable=not show_progress)
    with StopSignals() as stop_requested:
        if rng is not None:
            set_rng_state(rng)
        for step in range(start + 1, meta.meta_steps + 1):
            t0 = time.perf_counter()
            grads, losses = meta_step(
                job.model, _episodes(job, step), job.collate, job.inner, meta.algorithm
            )
            apply_meta_update(trainable(job.model), grads, job.optimizer)
            record = {"step": step, **losses, "step_s": round(time.perf_counter() - t0, 4)}
            job.run.log(record)
            bar.update(1)
            bar.set_postfix(support=f"{losses['support_loss']:.3f}")
            signal = stop_requested()
            if signal or (every and step % every == 0) or step == meta.meta_steps:
                _save(job, step)
            if signal:
                bar.close()
                return signal
    bar.close()
    return 0


def _save(job: _Meta, step: int) -> Path:
    weights = {n: p.detach() for n, p in trainable(job.model).items()}
    check_finite(weights)
    shared = {
        "model": tensor_files("model", weights),
        "optimizer": state_files("optimizer", job.optimizer.state_dict()),
    }
    meta = {"kind": "meta-train", "identity": job.identity, "config": job.cfg.to_dict()}
    per_rank = state_files("rng-rank000", rng_state())
    return job.checkpointer.save(step, shared, per_rank, meta)


def _held_out(job: _Meta) -> dict[str, Any]:
    """Query loss on each held-out task after adapting from the meta-adapter and from a fresh one."""
    meta = job.cfg.meta
    learned = snapshot(trainable(job.model))
    per_task: dict[str, Any] = {}
    for task in meta.held_out:
        sums = {"meta_before": 0.0, "meta": 0.0, "fresh_before": 0.0, "fresh": 0.0}
        for e in range(meta.eval_episodes):
            rng = random.Random(f"{job.cfg.train.seed}:held-out:{task}:{e}")
            ep = sample_episode(task, job.tasks[task], meta.shots, meta.query_shots, rng)
            for name, start in (("meta", learned), ("fresh", job.fresh)):
                got = adapted_query_loss(job.model, start, ep, job.collate, job.inner)
                sums[f"{name}_before"] += got["before"]
                sums[name] += got["after"]
        per_task[task] = {k: v / meta.eval_episodes for k, v in sums.items()}
    if not per_task:
        return {}
    mean = {k: sum(t[k] for t in per_task.values()) / len(per_task) for k in sums}
    return {"tasks": per_task, "mean": mean}


def _finish(job: _Meta) -> dict[str, Any]:
    held_out = _held_out(job)
    job.method.save(job.model, str(job.run.adapter_dir))
    job.tokenizer.save_pretrained(str(job.run.tokenizer_dir))
    meta = job.cfg.meta
    summary = {
        "kind": "meta-train",
        "algorithm": meta.algorithm,
        "meta_steps": meta.meta_steps,
        "train_tasks": job.train_tasks,
        "held_out": held_out,  # query loss after adaptation: meta-adapter vs fresh adapter
        "artifact": "adapter",
    }
    job.run.write_summary(summary)
    return summary


def _manifest(job: _Meta) -> dict[str, Any]:
    return {
        "kind": "meta-train",
        "config_digest": job.cfg.digest(),
        "base_model": {
            "name": job.cfg.model.name,
            "dir": str(resolve_model_dir(job.cfg.model.name)),
            "fingerprint": job.identity["model"]["fingerprint"],
        },
        "data": {"files": job.identity["data"]},
        "tasks": {name: len(rows) for name, rows in job.tasks.items()},
        "method": job.cfg.method.name,
        "trainable_params": sum(p.numel() for p in trainable(job.model).values()),
    }

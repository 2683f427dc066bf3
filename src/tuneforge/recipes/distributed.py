"""The run's distributed set-up from its config: which strategy, its accelerator, what the strategy
cannot run (refused before anything loads), and that every rank runs the same config.

The strategies themselves are train/strategy.py; sharded checkpoints train/sharded.py.
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.config import RunConfig
from tuneforge.constants import GENERATION_METRICS, LABEL_METRICS
from tuneforge.errors import ConfigError
from tuneforge.methods import Method
from tuneforge.train.collective import gathered
from tuneforge.train.strategy import (
    env_world_size,
    make_accelerator,
    refuse_unsupported,
    resolve_strategy,
)


def run_strategy(cfg: RunConfig) -> str:
    """train.strategy as this job runs it, after the checks that need no model."""
    strategy = resolve_strategy(cfg.train.strategy, env_world_size(), torch.cuda.is_available())
    t, e = cfg.train, cfg.eval
    scored = [m for m in e.metrics if m in LABEL_METRICS or m in GENERATION_METRICS]
    if strategy == "fsdp2":
        refuse_unsupported(
            strategy,
            checks={
                "eval.early_stopping: keep-best copies whole weights; not with sharded ones": bool(
                    e.early_stopping
                ),
                f"eval.metrics: {', '.join(scored)} and eval.generate score on each rank "
                "separately; score the finished run with `tuneforge eval`": bool(scored)
                or e.generate,
                "train.l1: the penalty sums whole weights; not with sharded ones": t.l1 > 0,
            },
        )
    if strategy == "deepspeed":
        c = cfg.checkpoint
        refuse_unsupported(
            strategy,
            checks={
                "checkpoint.every_steps / checkpoint.at_epoch_end: DeepSpeed's own checkpoints "
                "are pickles, which tuneforge does not write; set checkpoint.every_steps: null "
                "and checkpoint.at_epoch_end: false, or use fsdp2": bool(c.every_steps)
                or c.at_epoch_end,
                "train.on_nonfinite: skip needs the step held back, but DeepSpeed steps inside "
                "backward; use halt": t.on_nonfinite == "skip",
                "train.l1: not with DeepSpeed's partitioned gradients": t.l1 > 0,
            },
        )
    return strategy


def check_method(strategy: str, method: Method) -> None:
    """Methods whose state lives outside the sharded blocks (or whole-matrix hooks) need DDP."""
    if strategy in ("fsdp2", "deepspeed") and not method.shardable:
        raise ConfigError(
            f"method.name: {method.name} is not supported with train.strategy: {strategy} "
            "(its state or hooks need whole weight matrices); use ddp"
        )


def run_accelerator(cfg: RunConfig, strategy: str):
    t = cfg.train
    return make_accelerator(
        strategy,
        seed=t.seed,
        timeout_s=t.dist_timeout_s,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        zero_stage=t.zero_stage,
    )


def agree_on_config(accelerator: Any, cfg: RunConfig) -> None:
    """Every rank must run the same resolved config (multi-node: each node reads its own file)."""
    if accelerator.num_processes == 1:
        return
    digests = gathered(accelerator, cfg.digest())
    if len(set(digests)) > 1:
        listed = ", ".join(f"rank {i} {d}" for i, d in enumerate(digests))
        raise ConfigError(
            f"the ranks run different configs ({listed}: config digests); every node must run "
            "the same config file and key=value overrides"
        )

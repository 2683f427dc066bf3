"""How a run is spread over processes: one process, DDP, FSDP2 (torch `fully_shard`, one unit per
decoder block) or DeepSpeed ZeRO (accelerate's integration), behind the accelerator the loop uses.

The loop, the loss and the evaluator stay strategy-agnostic: they call `no_sync`, `backward` and
`clip_grad_norm_` and these classes do what the strategy needs. Sharded checkpoints are
train/sharded.py; launching processes is train/launch.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch

from tuneforge.errors import ConfigError
from tuneforge.layout import block_list

STRATEGIES = ("single", "ddp", "fsdp2", "deepspeed")


def env_world_size() -> int:
    """The number of processes torchrun (or another launcher) started, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(name: str, world_size: int, cuda: bool) -> str:
    """`train.strategy` as this job runs it (`auto`: ddp under a launcher, else single)."""
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    if name == "single" and world_size > 1:
        raise ConfigError(
            f"train.strategy: single runs one process, but this job has {world_size} "
            "(WORLD_SIZE); set train.strategy to ddp or fsdp2, or start one process"
        )
    if name == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "train.strategy: deepspeed needs the deepspeed package: "
                "pip install 'tuneforge[deepspeed]'"
            )
        if not cuda:
            raise ConfigError(
                "train.strategy: deepspeed runs through accelerate's integration, which needs a "
                "CUDA GPU (on CPU it gives every rank process index 0); use fsdp2 or ddp on CPU"
            )
    return name


class Fsdp2Accelerator:
    """accelerate's Accelerator for FSDP2 (a mixin applied in `make_accelerator`): the model is
    sharded by `prepare_model` (before the optimizer exists), gradient sync is switched off for
    accumulation micro-batches, and the clipped norm comes back as a plain tensor."""

    strategy = "fsdp2"

    def prepare_model(self, model: torch.nn.Module, device_placement=None, evaluation_mode=False):
        model = shard_model(model.to(self.device))
        self._models.append(model)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        norm = super().clip_grad_norm_(parameters, max_norm, norm_type)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class DeepSpeedAccelerator:
    """accelerate's Accelerator for DeepSpeed: accumulation micro-batches are marked as such, so
    that the engine (which steps inside `backward`) only steps at the last one."""

    strategy = "deepspeed"

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        # The loop's loss is already normalised over the step's micro-batches; DeepSpeed divides
        # by its gradient_accumulation_steps again, so that is undone here.
        steps = self.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
        super().backward(loss * steps, **kwargs)

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        self.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            self.gradient_state._set_sync_gradients(True)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 in place: every decoder block its own unit, the rest (embeddings, head) the root's.

    Mixed precision matches the single-process path: parameters are gathered in the dtype they
    are stored in (frozen weights in the compute dtype, trainable ones as fp32 master copies),
    the loop's autocast does the bf16 compute, and gradients are reduced in their own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None, cast_forward_inputs=False)
    name, _ = block_list(model)
    for block in model.get_submodule(name):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def make_accelerator(
    strategy: str,
    *,
    seed: int,
    timeout_s: int,
    batch_size: int = 1,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    zero_stage: int = 2,
):
    """The Accelerator for `strategy` (one already resolved by `resolve_strategy`), seeded."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
    cpu = not torch.cuda.is_available()
    if strategy == "fsdp2":
        accelerator = type("Fsdp2", (Fsdp2Accelerator, Accelerator), {})(
            cpu=cpu, kwargs_handlers=handlers
        )
    elif strategy == "deepspeed":
        plugin = _deepspeed_plugin(zero_stage, batch_size, grad_accum, max_grad_norm)
        accelerator = type("DeepSpeed", (DeepSpeedAccelerator, Accelerator), {})(
            deepspeed_plugin=plugin, kwargs_handlers=handlers
        )
    else:
        accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers)
        accelerator.strategy = strategy
    set_seed(seed)
    return accelerator


def _deepspeed_plugin(stage: int, batch_size: int, grad_accum: int, max_grad_norm: float | None):
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=max_grad_norm or 0.0,
        zero3_save_16bit_model=True,
    )
    cfg = plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg["train_batch_size"] = batch_size * grad_accum * env_world_size()
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        cfg["bf16"] = {"enabled": True}
    return plugin


def prepare_training(
    accelerator, model: torch.nn.Module, build: Callable[[torch.nn.Module], tuple[Any, Any]]
) -> tuple[torch.nn.Module, Any, Any]:
    """(model, optimizer, scheduler) as the strategy runs them; `build(model)` makes the optimizer
    and its schedule over the model's (unwrapped) parameters.

    FSDP2 shards first (the optimizer must hold the sharded parameters); DDP and DeepSpeed wrap
    the model and the optimizer together."""
    if getattr(accelerator, "strategy", "") == "fsdp2":
        model = accelerator.prepare_model(model)
        optimizer, scheduler = build(model)
        return model, accelerator.prepare_optimizer(optimizer), scheduler
    optimizer, scheduler = build(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights gathered to plain CPU tensors on rank 0 (a collective: every rank
    calls it), or None where the unwrapped model already holds them (single, DDP, ZeRO-2)."""
    strategy = getattr(accelerator, "strategy", "")
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    if strategy == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return accelerator.get_state_dict(model)
    return None


def refuse_unsupported(strategy: str, *, checks: dict[str, bool]) -> None:
    """Raise ConfigError naming the first key that this strategy cannot run (`checks` maps a
    `key: reason` message to whether it applies)."""
    for message, applies in checks.items():
        if applies:
            raise ConfigError(f"{message} (train.strategy: {strategy})")

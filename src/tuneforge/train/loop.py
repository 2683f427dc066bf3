"""The explicit training loop on accelerate: one loop for one CPU, one GPU, or DDP under torchrun.

It owns batching order, gradient accumulation with token-count normalisation, clipping, the
schedule, progress, and when to checkpoint, skip a non-finite step or stop on a signal; evaluation,
early stopping and what a checkpoint holds are callbacks from the recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.packing import input_token_count
from tuneforge.train.collective import agreed_signal, all_reduce_sum, all_reduce_sums, row_sources
from tuneforge.train.guards import NonFiniteGuard, nonfinite_parts
from tuneforge.train.loss import DEFAULT_CHUNK_TOKENS, CausalLMLoss
from tuneforge.train.order import (
    micro_batch_indices,
    micro_batches_per_epoch,
)


@dataclass
class LoopSettings:
    total_steps: int
    grad_accum: int
    batch_size: int
    seed: int
    max_grad_norm: float | None = 1.0
    eval_every_steps: int | None = None
    log_every_steps: int = 1
    autocast_dtype: torch.dtype | None = None  # bf16 autocast when set
    show_progress: bool = True
    checkpoint_every_steps: int | None = None
    checkpoint_at_epoch_end: bool = False
    on_nonfinite: str = "halt"  # halt | skip (see guards.NonFiniteGuard)
    max_bad_steps: int = 3
    trace_rows: bool = False  # log each step's row sources (file:line) in its record
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # labelled positions per logits chunk (loss.py)
    group_by_length: bool = False  # sort runs of micro-batches by length (less padding)
    positions_aligned: bool = True  # False for methods that add virtual tokens (loss.py)


@dataclass
class LoopResult:
    steps: int = 0
    train_tokens: int = 0  # tokens that carry loss (labelled), all processes
    input_tokens: int = 0  # real (non-padding) input tokens, all processes
    runtime_s: float = 0.0
    last_loss: float = float("nan")
    mean_loss: float = float("nan")
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_steps: int = 0
    bad_steps: int = 0  # non-finite steps in a row
    skipped_steps: int = 0
    interrupted: int = 0  # the signal number that stopped the run, or 0

    def counters(self, micro_batch: int, per_epoch: int) -> dict[str, Any]:
        """What a checkpoint saves to continue exactly: the data position and running totals."""
        epoch, batch_in_epoch = divmod(micro_batch, per_epoch)
        return {
            "step": self.steps,
            "micro_batch": micro_batch,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "micro_batches_per_epoch": per_epoch,
            "train_tokens": self.train_tokens,
            "input_tokens": self.input_tokens,
            "loss_sum": self.loss_sum,
            "loss_steps": self.loss_steps,
            "last_loss": self.last_loss,
            "runtime_s": self.runtime_s,
            "bad_steps": self.bad_steps,
            "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_counters(cls, counters: dict[str, Any]) -> LoopResult:
        c = counters
        return cls(
            steps=int(c["step"]),
            train_tokens=int(c["train_tokens"]),
            input_tokens=int(c["input_tokens"]),
            runtime_s=float(c["runtime_s"]),
            last_loss=float(c["last_loss"]),
            loss_sum=float(c["loss_sum"]),
            loss_steps=int(c["loss_steps"]),
            bad_steps=int(c["bad_steps"]),
            skipped_steps=int(c["skipped_steps"]),
        )


def _count_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _checkpoint_due(settings: LoopSettings, step: int, micro_batch: int, per_epoch: int) -> bool:
    """Every N steps, and after a step that finished an epoch (reached or crossed its end)."""
    every = settings.checkpoint_every_steps
    if every and step % every == 0:
        return True
    started = micro_batch - settings.grad_accum
    return settings.checkpoint_at_epoch_end and micro_batch // per_epoch > started // per_epoch


@dataclass
class _Step:
    """One optimizer step's inputs and outcome, passed between the loop's pieces."""

    index: int  # 0-based optimizer step
    epoch: int
    micro: list[dict[str, torch.Tensor]]
    rows: list[int]
    global_tokens: float = 0.0
    global_inputs: float = 0.0
    loss: float = math.nan
    grad_norm: float | None = None
    bad: dict[str, str] = field(default_factory=dict)
    lr: float = 0.0


def _gather(source: Iterator, examples: Sequence[Any], collate_fn, settings, index: int) -> _Step:
    """The step's micro-batches (grad_accum of them) and the example indices they hold."""
    epoch, micro, rows = 0, [], []
    for _ in range(settings.grad_accum):
        epoch, idx = next(source)
        rows.extend(idx)
        micro.append(collate_fn([examples[i] for i in idx]))
    return _Step(index, epoch, micro, rows)


def _forward_backward(model, step: _Step, loss_fn, accelerator, autocast, penalty) -> None:
    """Accumulate the step's gradients; sets the step's global token counts and its loss."""
    step.global_tokens, step.global_inputs = all_reduce_sums(
        accelerator,
        sum(_count_labels(b) for b in step.micro),
        sum(input_token_count(b) for b in step.micro),
    )
    # Each micro-batch's loss is its token-loss sum over the step's global token count, so
    # accumulation and DDP (which averages gradients over ranks) equal one big batch.
    scale = accelerator.num_processes
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(step.micro):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = i == len(step.micro) - 1
        with nullcontext() if sync else accelerator.no_sync(model), autocast:
            loss = loss_fn(model, batch, max(step.global_tokens, 1.0))
        objective = loss * scale
        if sync and penalty is not None:  # once per step, with the synced micro-batch
            objective = objective + penalty(model)
        accelerator.backward(objective)
        step_loss += loss.detach().double()  # stays on the device: one host sync, below
    step.loss = all_reduce_sum(accelerator, float(step_loss))


def _apply_update(step: _Step, optimizer, trainable, settings, accelerator) -> None:
    """Clip, then step the optimizer unless the loss or gradient is non-finite."""
    # With clipping off the norm is still measured (max_norm inf scales by exactly 1.0).
    norm = accelerator.clip_grad_norm_(trainable, settings.max_grad_norm or math.inf)
    step.grad_norm = float(norm) if norm is not None else None  # None: the engine clips itself
    step.bad = nonfinite_parts(step.loss, step.grad_norm)
    if not step.bad:  # else no optimizer.step: weights and optimizer state stay bitwise unchanged
        optimizer.step()


def _skip_bad_step(step: _Step, result: LoopResult, guard, examples, accelerator, on_log) -> None:
    """Count and log a non-finite step; the guard raises when the policy says halt."""
    result.bad_steps += 1
    result.skipped_steps += 1
    sources = row_sources(examples, step.rows, accelerator)
    if on_log is not None:
        on_log(guard.record(step.index + 1, step.epoch, step.bad, sources, result.bad_steps))
    guard.check(step.index + 1, step.bad, sources, result.bad_steps)


def _account(result: LoopResult, step: _Step) -> None:
    result.steps = step.index + 1
    result.train_tokens += int(step.global_tokens)
    result.input_tokens += int(step.global_inputs)
    if not step.bad:
        result.last_loss = step.loss
        result.loss_sum, result.loss_steps = result.loss_sum + step.loss, result.loss_steps + 1


def _log_record(step: _Step, result: LoopResult, tok_s: float, elapsed: float) -> dict[str, Any]:
    return {
        "step": step.index + 1,
        "epoch": step.epoch,
        "loss": step.loss,
        "lr": step.lr,
        "grad_norm": step.grad_norm,
        "tokens": result.input_tokens,
        "loss_tokens": result.train_tokens,
        "tokens_per_s": tok_s,
        "elapsed_s": elapsed,
    }


@dataclass
class LoopHooks:
    """What the recipe plugs into the loop (all optional); see `train_loop`."""

    on_step: Callable[[torch.nn.Module, int], None] | None = None
    on_log: Callable[[dict[str, Any]], None] | None = None
    on_eval: Callable[[int], bool] | None = None
    penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None
    on_checkpoint: Callable[[int, dict[str, Any]], Any] | None = None
    stop_requested: Callable[[], int] | None = None


class _Loop:
    """One training run's loop state; `run()` is the loop, each step in small named pieces."""

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        examples,
        collate_fn,
        accelerator,
        settings,
        hooks: LoopHooks,
        resume: dict[str, Any] | None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.examples, self.collate_fn, self.accelerator = examples, collate_fn, accelerator
        self.settings, self.hooks = settings, hooks
        self.result = LoopResult.from_counters(resume) if resume else LoopResult()
        world = accelerator.num_processes
        self.per_epoch = micro_batches_per_epoch(len(examples), settings.batch_size, world)
        self.position = int(resume["micro_batch"]) if resume else 0  # global micro-batches used
        lengths = [len(e.input_ids) for e in examples] if settings.group_by_length else None
        self.source = micro_batch_indices(
            len(examples),
            settings.batch_size,
            settings.seed,
            accelerator.process_index,
            world,
            start=self.position,
            lengths=lengths,
        )
        self.loss_fn = CausalLMLoss(
            model, settings.loss_chunk_tokens, positions_aligned=settings.positions_aligned
        )
        self.guard = NonFiniteGuard(settings.on_nonfinite, settings.max_bad_steps)
        self.autocast = _autocast(accelerator, settings.autocast_dtype)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.start = time.perf_counter() - self.result.runtime_s

    def run(self) -> LoopResult:
        first_step = self.result.steps
        self.bar = _progress_bar(self.settings, first_step, self.accelerator)
        self.model.train()
        for index in range(first_step, self.settings.total_steps):
            step = self._step(index)
            self._report(step)
            if self._after_step(index):
                break
        self.bar.close()
        self.result.runtime_s = time.perf_counter() - self.start
        self.result.mean_loss = self.result.loss_sum / max(self.result.loss_steps, 1)
        return self.result

    def _step(self, index: int) -> _Step:
        """Gather, forward/backward, then update (or skip a non-finite step) and schedule."""
        step = _gather(self.source, self.examples, self.collate_fn, self.settings, index)
        self.position += self.settings.grad_accum
        hooks = self.hooks
        _forward_backward(
            self.model, step, self.loss_fn, self.accelerator, self.autocast, hooks.penalty
        )
        _apply_update(step, self.optimizer, self.trainable, self.settings, self.accelerator)
        if step.bad:
            _skip_bad_step(
                step, self.result, self.guard, self.examples, self.accelerator, hooks.on_log
            )
        else:
            self.result.bad_steps = 0
            if hooks.on_step is not None:
                hooks.on_step(self.model, index)
        self.optimizer.zero_grad(set_to_none=True)
        step.lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        _account(self.result, step)
        return step

    def _report(self, step: _Step) -> None:
        """The progress bar, and the metrics record when one is due."""
        elapsed = time.perf_counter() - self.start
        tok_s = self.result.input_tokens / max(elapsed, 1e-9)  # real (non-padding) tokens
        self.bar.set_postfix(
            loss=f"{step.loss:.4f}", lr=f"{step.lr:.2e}", tok_s=f"{tok_s:.0f}", epoch=step.epoch
        )
        self.bar.update(1)
        s = self.settings
        due = (step.index + 1) % s.log_every_steps == 0 or s.trace_rows
        if self.hooks.on_log is None or not due or step.bad:
            return
        record = _log_record(step, self.result, tok_s, elapsed)
        if s.trace_rows:
            record["rows"] = row_sources(self.examples, step.rows, self.accelerator)
        self.hooks.on_log(record)

    def _after_step(self, index: int) -> bool:
        """Evaluate, checkpoint and honour a stop signal after a step; True ends the loop."""
        s, hooks, result = self.settings, self.hooks, self.result
        last = index + 1 == s.total_steps
        every = s.eval_every_steps
        if hooks.on_eval is not None and (last or (every and (index + 1) % every == 0)):
            if hooks.on_eval(index + 1) and not last:
                result.stopped_early = True
                return True
        signum = agreed_signal(self.accelerator, hooks.stop_requested)
        due = _checkpoint_due(s, index + 1, self.position, self.per_epoch)
        if hooks.on_checkpoint is not None and (signum or due):
            result.runtime_s = time.perf_counter() - self.start
            hooks.on_checkpoint(index + 1, result.counters(self.position, self.per_epoch))
            signum = signum or agreed_signal(self.accelerator, hooks.stop_requested)  # mid-save
        if signum:
            result.interrupted = signum
            return True
        return False


def _progress_bar(settings: LoopSettings, first_step: int, accelerator) -> tqdm:
    return tqdm(
        total=settings.total_steps,
        initial=first_step,
        desc="train",
        unit="step",
        disable=not (settings.show_progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )


def _autocast(accelerator, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(accelerator.device.type, dtype=dtype)


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    examples: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    accelerator: Any,
    settings: LoopSettings,
    *,
    resume: dict[str, Any] | None = None,
    **hooks: Any,
) -> LoopResult:
    """Run `settings.total_steps` optimizer steps. `on_eval(step)` returns True to stop early.

    `hooks` are LoopHooks' fields: `penalty(model)` (e.g. an L1 term) is added to the objective
    once per optimizer step and is not part of the logged loss; `on_step(model, step)` runs after
    each optimizer step (before zero_grad). `resume` (a checkpoint's counters) continues from its
    step and data position; `on_checkpoint(step, counters)` saves after each due step (after
    evaluation); when `stop_requested()` returns a signal number the loop checkpoints and returns
    with `result.interrupted` set. A non-finite loss or gradient follows `settings.on_nonfinite`.
    """
    loop = _Loop(
        model,
        optimizer,
        scheduler,
        examples,
        collate_fn,
        accelerator,
        settings,
        LoopHooks(**hooks),
        resume,
    )
    return loop.run()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    examples: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    accelerator: Any,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    positions_aligned: bool = True,
) -> dict[str, float]:
    """Token-weighted validation loss and perplexity, sharded over processes. No logits are kept."""
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(accelerator.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    world = accelerator.num_processes
    mine = list(range(accelerator.process_index, len(examples), world))
    loss_fn = CausalLMLoss(model, positions_aligned=positions_aligned)
    total, count = 0.0, 0
    # Every rank runs the same number of forward passes (sharded weights are gathered in each);
    # a rank out of examples repeats one and counts nothing.
    for i in range(0, math.ceil(len(examples) / world), batch_size):
        chunk = mine[i : i + batch_size]
        batch = collate_fn([examples[j] for j in chunk or mine[:1] or [0]])
        n = _count_labels(batch) if chunk else 0
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with autocast:
            loss = loss_fn(model, batch, float(max(n, 1)))
        if n:
            total += float(loss) * n
            count += n
    total, count = all_reduce_sums(accelerator, total, count)
    if was_training:
        model.train()
    loss = total / count if count else float("nan")
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "eval_tokens": int(count),
    }

"""The explicit training loop on accelerate: one loop for one CPU, one GPU, or DDP under torchrun.

It owns batching order, gradient accumulation with token-count normalisation, clipping, the
schedule, progress, and when to checkpoint, skip a non-finite step or stop on a signal; evaluation,
early stopping and what a checkpoint holds are callbacks from the recipe.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.packing import input_token_count, length_grouped
from tuneforge.train.guards import NonFiniteGuard, nonfinite_parts
from tuneforge.train.loss import DEFAULT_CHUNK_TOKENS, CausalLMLoss

LENGTH_GROUP_BATCHES = 64  # micro-batches per length-sorted group (train.group_by_length)


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


def micro_batches_per_epoch(n_examples: int, batch_size: int, world_size: int) -> int:
    return max(1, math.ceil(n_examples / (batch_size * world_size)))


def total_steps_for(
    n_examples: int, batch_size: int, grad_accum: int, world_size: int, epochs: float
) -> int:
    per_epoch = micro_batches_per_epoch(n_examples, batch_size, world_size)
    return max(1, math.ceil(epochs * per_epoch / grad_accum))


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The global example order of one epoch: a seeded permutation, the same on every rank."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=gen).tolist()


def micro_batch_indices(
    n_examples: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    start: int = 0,
    lengths: Sequence[int] | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, indices) for this rank, from global micro-batch number `start`.

    Each global micro-batch holds batch_size × world_size consecutive examples of the epoch
    order; rank r takes its slice. A short last batch is filled by wrapping around, so that
    every rank runs the same number of forward passes. With `lengths`, each run of
    LENGTH_GROUP_BATCHES global micro-batches is sorted by example length (data/packing.py).
    """
    per_epoch = micro_batches_per_epoch(n_examples, batch_size, world_size)
    span = batch_size * world_size
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        order = epoch_order(n_examples, seed, epoch)
        if lengths is not None:
            order = length_grouped(order, lengths, span * LENGTH_GROUP_BATCHES)
        chunk = order[pos * span : (pos + 1) * span]
        if len(chunk) < world_size:  # every rank needs at least one example
            chunk += order[: world_size - len(chunk)]
        yield epoch, chunk[rank::world_size]
        k += 1


def _count_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _checkpoint_due(settings: LoopSettings, step: int, micro_batch: int, per_epoch: int) -> bool:
    """Every N steps, and after a step that finished an epoch (reached or crossed its end)."""
    every = settings.checkpoint_every_steps
    if every and step % every == 0:
        return True
    started = micro_batch - settings.grad_accum
    return settings.checkpoint_at_epoch_end and micro_batch // per_epoch > started // per_epoch


def _row_sources(examples: Sequence[Any], rows: list[int], accelerator) -> list[str]:
    """The step's rows as `file:line`, from every process (rank order)."""
    mine = [getattr(examples[i], "source", "") or f"#{i}" for i in rows]
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    return list(gather_object(mine))


def _agreed_signal(accelerator, stop_requested: Callable[[], int] | None) -> int:
    """A pending stop signal, agreed by all processes so that they stop at the same step."""
    local = stop_requested() if stop_requested is not None else 0
    if accelerator.num_processes == 1:
        return local
    anyone = _all_reduce_sum(accelerator, 1 if local else 0)
    return local or (int(signal.SIGTERM) if anyone else 0)


def _all_reduce_sums(accelerator, *values: float | int) -> list[float]:
    """Each value summed over all processes, in one collective."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=accelerator.device
    )
    return accelerator.reduce(tensor, reduction="sum").tolist()


def _all_reduce_sum(accelerator, value: float | int) -> float:
    return _all_reduce_sums(accelerator, value)[0]


def train_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    examples: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    accelerator: Any,
    settings: LoopSettings,
    *,
    on_step: Callable[[torch.nn.Module, int], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_eval: Callable[[int], bool] | None = None,
    penalty: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[int, dict[str, Any]], Any] | None = None,
    stop_requested: Callable[[], int] | None = None,
) -> LoopResult:
    """Run `settings.total_steps` optimizer steps. `on_eval(step)` returns True to stop early.

    `penalty(model)` (e.g. an L1 term from the method or regulariser) is added to the objective
    once per optimizer step; it is not part of the logged loss.

    `resume` (a checkpoint's counters) continues from its step and data position;
    `on_checkpoint(step, counters)` saves after each due step (after evaluation); when
    `stop_requested()` returns a signal number the loop checkpoints and returns with
    `result.interrupted` set. A non-finite loss or gradient follows `settings.on_nonfinite`.
    """
    result = LoopResult.from_counters(resume) if resume else LoopResult()
    first_step = result.steps
    per_epoch = micro_batches_per_epoch(
        len(examples), settings.batch_size, accelerator.num_processes
    )
    position = int(resume["micro_batch"]) if resume else 0  # global micro-batches consumed
    source = micro_batch_indices(
        len(examples),
        settings.batch_size,
        settings.seed,
        accelerator.process_index,
        accelerator.num_processes,
        start=position,
        lengths=[len(e.input_ids) for e in examples] if settings.group_by_length else None,
    )
    loss_fn = CausalLMLoss(
        model, settings.loss_chunk_tokens, positions_aligned=settings.positions_aligned
    )
    guard = NonFiniteGuard(settings.on_nonfinite, settings.max_bad_steps)
    bar = tqdm(
        total=settings.total_steps,
        initial=first_step,
        desc="train",
        unit="step",
        disable=not (settings.show_progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    autocast = (
        torch.autocast(accelerator.device.type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else nullcontext()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    start = time.perf_counter() - result.runtime_s
    for step in range(first_step, settings.total_steps):
        epoch, micro, rows = 0, [], []
        for _ in range(settings.grad_accum):
            epoch, idx = next(source)
            rows.extend(idx)
            micro.append(collate_fn([examples[i] for i in idx]))
        position += settings.grad_accum
        global_tokens, global_inputs = _all_reduce_sums(
            accelerator,
            sum(_count_labels(b) for b in micro),
            sum(input_token_count(b) for b in micro),
        )
        # Each micro-batch's loss is its token-loss sum over the step's global token count, so
        # accumulation and DDP (which averages gradients over ranks) equal one big batch.
        scale = accelerator.num_processes
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = i == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model), autocast:
                loss = loss_fn(model, batch, max(global_tokens, 1.0))
            objective = loss * scale
            if sync and penalty is not None:  # once per step, with the synced micro-batch
                objective = objective + penalty(model)
            accelerator.backward(objective)
            step_loss += loss.detach().double()  # stays on the device: one host sync, below
        step_loss = _all_reduce_sum(accelerator, float(step_loss))
        # With clipping off the norm is still measured (max_norm inf scales by exactly 1.0).
        norm = accelerator.clip_grad_norm_(trainable, settings.max_grad_norm or math.inf)
        grad_norm = float(norm) if norm is not None else None  # None: the engine clips itself
        bad = nonfinite_parts(step_loss, grad_norm)
        if bad:  # no optimizer.step: weights and optimizer state stay bitwise unchanged
            result.bad_steps += 1
            result.skipped_steps += 1
            sources = _row_sources(examples, rows, accelerator)
            if on_log is not None:
                on_log(guard.record(step + 1, epoch, bad, sources, result.bad_steps))
            guard.check(step + 1, bad, sources, result.bad_steps)  # raises when halting
        else:
            result.bad_steps = 0
            optimizer.step()
            if on_step is not None:
                on_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        result.steps = step + 1
        result.train_tokens += int(global_tokens)
        result.input_tokens += int(global_inputs)
        if not bad:
            result.last_loss = step_loss
            result.loss_sum, result.loss_steps = result.loss_sum + step_loss, result.loss_steps + 1
        elapsed = time.perf_counter() - start
        tok_s = result.input_tokens / max(elapsed, 1e-9)  # real (non-padding) tokens processed
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", epoch=epoch)
        bar.update(1)
        due_log = (step + 1) % settings.log_every_steps == 0 or settings.trace_rows
        if on_log is not None and due_log and not bad:
            record = {
                "step": step + 1,
                "epoch": epoch,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": result.input_tokens,
                "loss_tokens": result.train_tokens,
                "tokens_per_s": tok_s,
                "elapsed_s": elapsed,
            }
            if settings.trace_rows:
                record["rows"] = _row_sources(examples, rows, accelerator)
            on_log(record)
        last = step + 1 == settings.total_steps
        every = settings.eval_every_steps
        if on_eval is not None and (last or (every and (step + 1) % every == 0)):
            if on_eval(step + 1) and not last:
                result.stopped_early = True
                break
        signum = _agreed_signal(accelerator, stop_requested)
        if on_checkpoint is not None and (
            signum or _checkpoint_due(settings, step + 1, position, per_epoch)
        ):
            result.runtime_s = time.perf_counter() - start
            on_checkpoint(step + 1, result.counters(position, per_epoch))
            signum = signum or _agreed_signal(accelerator, stop_requested)  # came during the save
        if signum:
            result.interrupted = signum
            break
    bar.close()
    result.runtime_s = time.perf_counter() - start
    result.mean_loss = result.loss_sum / max(result.loss_steps, 1)
    return result


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
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    loss_fn = CausalLMLoss(model, positions_aligned=positions_aligned)
    total, count = 0.0, 0
    for i in range(0, len(mine), batch_size):
        batch = collate_fn([examples[j] for j in mine[i : i + batch_size]])
        n = _count_labels(batch)
        if n == 0:
            continue
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with autocast:
            loss = loss_fn(model, batch, float(n))
        total += float(loss) * n
        count += n
    total, count = _all_reduce_sums(accelerator, total, count)
    if was_training:
        model.train()
    loss = total / count if count else float("nan")
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "eval_tokens": int(count),
    }

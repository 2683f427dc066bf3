"""The explicit training loop on accelerate: one loop for one CPU, one GPU, or DDP under torchrun.

It owns batching order, gradient accumulation with token-count normalisation, clipping, the
schedule and progress; evaluation, early stopping and saving are callbacks from the recipe.
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

IGNORE_INDEX = -100


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
    n_examples: int, batch_size: int, seed: int, rank: int, world_size: int, start: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, indices) for this rank, from global micro-batch number `start`.

    Each global micro-batch holds batch_size × world_size consecutive examples of the epoch
    order; rank r takes its slice. A short last batch is filled by wrapping around, so that
    every rank runs the same number of forward passes.
    """
    per_epoch = micro_batches_per_epoch(n_examples, batch_size, world_size)
    span = batch_size * world_size
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        order = epoch_order(n_examples, seed, epoch)
        chunk = order[pos * span : (pos + 1) * span]
        if len(chunk) < world_size:  # every rank needs at least one example
            chunk += order[: world_size - len(chunk)]
        yield epoch, chunk[rank::world_size]
        k += 1


def _count_labels(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _all_reduce_sum(accelerator, value: float | int) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum").item())


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
) -> LoopResult:
    """Run `settings.total_steps` optimizer steps. `on_eval(step)` returns True to stop early.

    `penalty(model)` (e.g. an L1 term from the method or regulariser) is added to the objective
    once per optimizer step; it is not part of the logged loss.
    """
    result = LoopResult()
    source = micro_batch_indices(
        len(examples),
        settings.batch_size,
        settings.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    bar = tqdm(
        total=settings.total_steps,
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
    loss_sum, loss_steps = 0.0, 0
    model.train()
    start = time.perf_counter()
    for step in range(settings.total_steps):
        epoch, micro = 0, []
        for _ in range(settings.grad_accum):
            epoch, idx = next(source)
            micro.append(collate_fn([examples[i] for i in idx]))
        local_tokens = sum(_count_labels(b) for b in micro)
        global_tokens = _all_reduce_sum(accelerator, local_tokens)
        # Each micro-batch's loss is its token-loss sum over the step's global token count, so
        # accumulation and DDP (which averages gradients over ranks) equal one big batch.
        scale = accelerator.num_processes
        step_loss = 0.0
        for i, batch in enumerate(micro):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = i == len(micro) - 1
            with nullcontext() if sync else accelerator.no_sync(model), autocast:
                out = model(**batch, num_items_in_batch=torch.tensor(max(global_tokens, 1.0)))
                loss = out.loss.float()
            accelerator.backward(loss * scale)
            step_loss += loss.detach().item()
        step_loss = _all_reduce_sum(accelerator, step_loss)
        grad_norm = None
        if settings.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(trainable, settings.max_grad_norm))
        optimizer.step()
        if on_step is not None:
            on_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        result.steps = step + 1
        result.train_tokens += int(global_tokens)
        result.input_tokens += int(
            _all_reduce_sum(accelerator, sum(int(b["attention_mask"].sum()) for b in micro))
        )
        result.last_loss = step_loss
        loss_sum, loss_steps = loss_sum + step_loss, loss_steps + 1
        elapsed = time.perf_counter() - start
        tok_s = result.input_tokens / max(elapsed, 1e-9)  # real (non-padding) tokens processed
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", epoch=epoch)
        bar.update(1)
        if on_log is not None and (step + 1) % settings.log_every_steps == 0:
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
            on_log(record)
        last = step + 1 == settings.total_steps
        every = settings.eval_every_steps
        if on_eval is not None and (last or (every and (step + 1) % every == 0)):
            if on_eval(step + 1) and not last:
                result.stopped_early = True
                break
    bar.close()
    result.runtime_s = time.perf_counter() - start
    result.mean_loss = loss_sum / max(loss_steps, 1)
    return result


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    examples: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    accelerator: Any,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
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
    total, count = 0.0, 0
    for i in range(0, len(mine), batch_size):
        batch = collate_fn([examples[j] for j in mine[i : i + batch_size]])
        n = _count_labels(batch)
        if n == 0:
            continue
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with autocast:
            out = model(**batch, num_items_in_batch=torch.tensor(float(n)))
        total += float(out.loss.float()) * n
        count += n
    total = _all_reduce_sum(accelerator, total)
    count = _all_reduce_sum(accelerator, count)
    if was_training:
        model.train()
    loss = total / count if count else float("nan")
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "eval_tokens": int(count),
    }

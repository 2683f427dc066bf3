"""First-order meta-learning over a model's trainable weights: Reptile and first-order MAML.

One meta-step adapts a copy of the trainable weights to each sampled task with a few SGD steps on
its support rows and turns the results into a gradient for the outer optimizer. Which tasks exist,
checkpoints and the run directory are the meta-train recipe's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX
from tuneforge.train.loss import CausalLMLoss

Batch = dict[str, torch.Tensor]
ALGORITHMS = ("reptile", "fomaml")


@dataclass(frozen=True)
class InnerLoop:
    """How one task is adapted: `steps` optimizer steps of rate `lr` on its whole support set.

    adam: a fresh Adam per task with beta1 = 0 (the Reptile paper's inner optimizer); sgd: plain.
    """

    steps: int
    lr: float
    optimizer: str = "adam"
    max_grad_norm: float | None = None
    autocast: torch.dtype | None = None

    def make(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(0.0, 0.999))
        return torch.optim.SGD(params, lr=self.lr)


@dataclass(frozen=True)
class Episode:
    task: str
    support: list[Any]
    query: list[Any]


def sample_episode(
    task: str, rows: Sequence[Any], shots: int, query_shots: int, rng: random.Random
) -> Episode:
    """k support rows and disjoint query rows of one task, drawn by `rng`."""
    picked = rng.sample(range(len(rows)), shots + query_shots)
    return Episode(task, [rows[i] for i in picked[:shots]], [rows[i] for i in picked[shots:]])


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def assign(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, param in params.items():
        param.copy_(values[name])


def _loss(model, loss_fn: CausalLMLoss, batch: Batch, autocast) -> torch.Tensor:
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
    with ctx:
        return loss_fn(model, batch, float(max(n, 1)))


def adapt(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    loss_fn: CausalLMLoss,
    support: Batch,
    inner: InnerLoop,
) -> float:
    """The inner optimizer on the support batch, in place; returns the mean support loss."""
    model.train()
    weights = list(params.values())
    optimizer = inner.make(weights)
    total = 0.0
    for _ in range(inner.steps):
        loss = _loss(model, loss_fn, support, inner.autocast)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for p, g in zip(weights, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        if inner.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(weights, inner.max_grad_norm)
        optimizer.step()
        for p in weights:
            p.grad = None
        total += float(loss.detach())
    return total / inner.steps


def query_gradient(
    model: torch.nn.Module, params: dict[str, torch.nn.Parameter], loss_fn, query: Batch, autocast
) -> tuple[dict[str, torch.Tensor], float]:
    """The query loss and its gradient at the current (adapted) weights: FOMAML's meta-gradient."""
    model.train()
    loss = _loss(model, loss_fn, query, autocast)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out = {
        n: torch.zeros_like(p) if g is None else g.detach()
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    return out, float(loss.detach())


@torch.no_grad()
def query_loss(model: torch.nn.Module, loss_fn, query: Batch, autocast=None) -> float:
    """Token-mean loss on the query rows, without dropout."""
    was = model.training
    model.eval()
    try:
        return float(_loss(model, loss_fn, query, autocast))
    finally:
        model.train(was)


def meta_step(
    model: torch.nn.Module,
    episodes: Sequence[Episode],
    collate: Callable[[list[Any]], Batch],
    inner: InnerLoop,
    algorithm: str,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The meta-gradient of one step (averaged over tasks) and its losses; weights end unchanged.

    Reptile: theta - phi (an outer SGD step of rate eps moves theta eps of the way to phi).
    FOMAML: the query gradient at phi.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"meta.algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    params = trainable(model)
    loss_fn = CausalLMLoss(model)
    theta = snapshot(params)
    total = {n: torch.zeros_like(t) for n, t in theta.items()}
    support_losses, query_losses = [], []
    for ep in episodes:
        assign(params, theta)
        support_losses.append(adapt(model, params, loss_fn, collate(ep.support), inner))
        if algorithm == "reptile":
            for n, p in params.items():
                total[n] += theta[n] - p.detach()
        else:
            grads, q = query_gradient(model, params, loss_fn, collate(ep.query), inner.autocast)
            query_losses.append(q)
            for n, g in grads.items():
                total[n] += g
    assign(params, theta)
    grads = {n: t / len(episodes) for n, t in total.items()}
    losses = {"support_loss": sum(support_losses) / len(support_losses)}
    if query_losses:
        losses["query_loss"] = sum(query_losses) / len(query_losses)
    return grads, losses


def apply_meta_update(
    params: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor], optimizer
) -> None:
    """Hand the meta-gradient to the outer optimizer as the parameters' .grad and step."""
    for name, param in params.items():
        param.grad = grads[name].to(param.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def adapted_query_loss(
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    episode: Episode,
    collate: Callable[[list[Any]], Batch],
    inner: InnerLoop,
) -> dict[str, float]:
    """Query loss before and after adapting from `start` on the support rows (weights restored)."""
    params = trainable(model)
    keep = snapshot(params)
    loss_fn = CausalLMLoss(model)
    try:
        assign(params, start)
        query = collate(episode.query)
        before = query_loss(model, loss_fn, query, inner.autocast)
        adapt(model, params, loss_fn, collate(episode.support), inner)
        after = query_loss(model, loss_fn, query, inner.autocast)
    finally:
        assign(params, keep)
    return {"before": before, "after": after}

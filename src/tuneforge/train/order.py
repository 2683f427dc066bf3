"""The data order: a pure function of (seed, epoch), cut into global micro-batches per rank.

Exact resume restarts this generator at a micro-batch counter; what a batch contains is
collation's business (data/pipeline.py, data/packing.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from tuneforge.data.packing import length_grouped

LENGTH_GROUP_BATCHES = 64  # micro-batches per length-sorted group (train.group_by_length)


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

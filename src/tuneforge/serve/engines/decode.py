"""The running batch of the transformers engine: rows of different lengths share one KV cache,
left-padded, each with its own attention-mask row and position ids; newcomers are prefilled and
joined to the cache between steps, finished rows leave it at once.

Who joins when is scheduler.py's decision; which weights answer a row (adapters) is hf.py's,
passed in as `forward`. The cache work reads transformers' DynamicLayer (keys/values tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.serve.engines.base import Failed, Finished, Job
from tuneforge.serve.engines.sampling import make_generator, pick_tokens
from tuneforge.serve.engines.textstream import TextStream


@dataclass(frozen=True)
class RowPlan:
    """How one job's row is generated: its weights, where its turn ends, how its text decodes."""

    adapter: str | None
    stop_ids: frozenset[int]
    decode: Callable[[list[int]], str]


@dataclass
class _Row:
    job: Job
    plan: RowPlan
    stream: TextStream
    generator: torch.Generator
    produced: int = 0
    next_token: int = 0  # sampled, not yet fed to the model


# forward(input_ids, attention_mask, position_ids, cache | None, adapters per row, prefill) -> out
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, list, bool], Any]


def cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for prompts of different lengths, padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def joinable(cache: Any) -> bool:
    """Whether rows can be added to this cache: plain (not sliding, not linear) dynamic layers."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _layers(cache: Any) -> list:
    return [layer for layer in cache.layers if layer.is_initialized and layer.keys.numel()]


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


def join_caches(cache: Any, mask: torch.Tensor, other: Any, other_mask: torch.Tensor):
    """`other`'s rows appended to `cache` (in place), the narrower side padded on the left."""
    width = max(mask.shape[1], other_mask.shape[1])
    pad, other_pad = width - mask.shape[1], width - other_mask.shape[1]
    for mine, theirs in zip(_layers(cache), _layers(other), strict=True):
        mine.keys = torch.cat([_pad_left(mine.keys, pad), _pad_left(theirs.keys, other_pad)])
        mine.values = torch.cat([_pad_left(mine.values, pad), _pad_left(theirs.values, other_pad)])
    mask = torch.cat(
        [_pad_left(mask[:, :, None], pad), _pad_left(other_mask[:, :, None], other_pad)]
    )
    return cache, mask[:, :, 0]


def keep_rows(cache: Any, mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep the rows `index` of the cache (in place) and of the mask; drop all-padding columns."""
    cache.batch_select_indices(index)
    mask = mask.index_select(0, index)
    first = int(mask.any(0).long().argmax()) if mask.numel() else 0
    if first:  # columns that no remaining row attends to
        for layer in _layers(cache):
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        mask = mask[:, first:]
    return mask


class RunningBatch:
    """The rows being generated, their cache and mask; the Stepper that scheduler.py drives."""

    def __init__(
        self,
        forward: Forward,
        plan: Callable[[Job], RowPlan],
        lane: Callable[[Job], Hashable],
        *,
        pad_id: int = 0,
        device: torch.device | str = "cpu",
        prefill_alone: bool = False,
    ) -> None:
        self.forward, self.plan, self._lane = forward, plan, lane
        self.pad_id, self.device, self.prefill_alone = pad_id, torch.device(device), prefill_alone
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None

    def lane(self, job: Job) -> Hashable:
        return self._lane(job)

    def joinable(self) -> bool:
        return not self.rows or joinable(self.cache)

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    @torch.no_grad()
    def join(self, jobs: list[Job]) -> None:
        rows = [row for row in map(self._new_row, jobs) if row is not None]
        groups = [[row] for row in rows] if self.prefill_alone else [rows] if rows else []
        for group in groups:
            self._prefill(group)

    @torch.no_grad()
    def step(self) -> None:
        self._keep([i for i, row in enumerate(self.rows) if not row.job.cancelled.is_set()])
        if not self.rows:
            return
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        ids = torch.tensor([[r.next_token] for r in self.rows], device=self.device)
        adapters = [r.plan.adapter for r in self.rows]
        out = self.forward(ids, mask, mask.sum(-1, keepdim=True) - 1, self.cache, adapters, False)
        self.cache, self.mask = cache_of(out), mask
        self._keep(self._sample(self.rows, out.logits[:, -1]))

    def _new_row(self, job: Job) -> _Row | None:
        try:
            plan = self.plan(job)
        except KeyError:  # its model was swapped out while it waited
            job.finish(Failed(f"the model {job.model} is no longer served"))
            return None
        stream = TextStream(plan.decode, job.params.stop)
        return _Row(job, plan, stream, make_generator(job.params.seed))

    def _prefill(self, rows: list[_Row]) -> None:
        ids, mask = left_pad([r.job.prompt_ids for r in rows], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.forward(ids, mask, positions, None, [r.plan.adapter for r in rows], True)
        cache = cache_of(out)
        extra = cache.get_seq_length() - mask.shape[1]  # virtual tokens (prompt learning)
        if extra > 0:
            mask = torch.cat([mask.new_ones(len(rows), extra), mask], dim=1)
        keep = self._sample(rows, out.logits[:, -1])
        if not keep:
            return
        index = torch.tensor(keep, device=mask.device)
        mask = keep_rows(cache, mask, index)
        rows = [rows[i] for i in keep]
        if self.rows:
            self.cache, self.mask = join_caches(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.rows += rows

    def _sample(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token and take it in; the indices of the rows that go on."""
        logits = logits.float().cpu()
        tokens = pick_tokens(logits, [r.job.params for r in rows], [r.generator for r in rows])
        return [i for i, (r, tok) in enumerate(zip(rows, tokens, strict=True)) if _advance(r, tok)]

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = keep_rows(self.cache, self.mask, index)
        self.rows = [self.rows[i] for i in keep]


def _advance(row: _Row, token: int) -> bool:
    """Take one sampled token into a row; False when the row is done (and finished)."""
    job = row.job
    if job.cancelled.is_set():
        return False
    row.produced += 1
    if token in row.plan.stop_ids:  # end of turn: counted, never shown
        job.delta(row.stream.flush())
        _finish(row, "stop")
        return False
    row.next_token = token
    job.delta(row.stream.push(token))
    if row.stream.stopped:
        _finish(row, "stop")
        return False
    if row.produced >= job.params.max_tokens:
        job.delta(row.stream.flush())
        _finish(row, "length")
        return False
    return True


def _finish(row: _Row, reason: str) -> None:
    row.job.finish(Finished(reason, row.stream.text, len(row.job.prompt_ids), row.produced))

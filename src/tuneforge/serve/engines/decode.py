"""The batched decode loop of the transformers engine: left-pad the prompts, prefill once, then one
token per row per step with the KV cache, streaming each row's text as it grows.

A row leaves the batch (and the cache) when it hits end-of-turn, a stop string, its max_tokens
or is cancelled; the loop ends when no row is left. Loading models is hf.py's job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.serve.engines.base import Finished, Job
from tuneforge.serve.engines.sampling import make_generator, pick_tokens
from tuneforge.serve.engines.textstream import TextStream


@dataclass
class _Row:
    job: Job
    stream: TextStream
    generator: torch.Generator
    produced: int = 0
    ids: list[int] = field(default_factory=list)


def _cache_of(out: Any) -> Any:
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


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    jobs: list[Job],
    *,
    pad_id: int,
    stop_ids: set[int],
    decode: Callable[[list[int]], str],
    device: torch.device | str = "cpu",
    last_logits_only: bool = True,
) -> None:
    """Generate every job to its end, emitting deltas and one Finished per job."""
    rows = [_Row(j, TextStream(decode, j.params.stop), make_generator(j.params.seed)) for j in jobs]
    ids, mask = left_pad([j.prompt_ids for j in jobs], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    extra = {"logits_to_keep": 1} if last_logits_only else {}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    while True:
        logits = out.logits[:, -1].float().cpu()
        tokens = pick_tokens(logits, [r.job.params for r in rows], [r.generator for r in rows])
        keep = [
            i
            for i, (row, tok) in enumerate(zip(rows, tokens, strict=True))
            if _advance(row, tok, stop_ids)
        ]
        if not keep:
            return
        cache = _cache_of(out)
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask.index_select(0, index)
            rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = torch.tensor(tokens, dtype=torch.long, device=mask.device)[:, None]
        out = model(
            input_ids=step,
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            cache=cache,
            use_cache=True,
        )


def _advance(row: _Row, token: int, stop_ids: set[int]) -> bool:
    """Take one sampled token into a row; False when the row is done (and finished)."""
    job = row.job
    if job.cancelled.is_set():
        return False
    row.produced += 1
    if token in stop_ids:  # end of turn: counted, never shown
        job.delta(row.stream.flush())
        _finish(row, "stop")
        return False
    row.ids.append(token)
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

"""Choose the next token for each row of a batch: greedy, or temperature + top-p sampling with the
row's own seeded generator (so a seeded request samples the same whatever else is batched).

Pure tensor code; the decode loop (decode.py) owns the model and the cache.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from tuneforge.serve.engines.base import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request; no seed draws a fresh random one."""
    g = torch.Generator()
    g.manual_seed((secrets.randbits(63) if seed is None else seed) % (2**63))
    return g


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[0] = True
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)


def pick_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> list[int]:
    """One token id per row of `logits` [rows, vocab] (float32)."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for row, p in enumerate(params):
        if p.temperature == 0.0:
            out.append(int(greedy[row]))
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        probs = top_p_filter(probs, p.top_p)
        out.append(int(torch.multinomial(probs, 1, generator=generators[row])))
    return out

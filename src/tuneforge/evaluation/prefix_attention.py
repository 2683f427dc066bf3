"""Training's packed attention plus a shared cached prefix: every packed example also sees it.

Evaluation forwards the prefix its rows share (a templated set's system prompt and instruction)
once and packs only what follows; with nothing cached this is train/attention.py's kernel, which
it calls. Switching a model to it and back is packed.py's business.
"""

from __future__ import annotations

import torch

from tuneforge.train.attention import (
    packed_sdpa_forward,
    register_attention,
    sdpa_mask,
    segment_lengths,
)

PREFIX_ATTENTION = "tuneforge_prefix_sdpa"


def prefix_packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One packed row after a cached prefix: each example attends to the whole prefix and,
    causally, to itself. Everything else goes to training's packed kernel unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = key.shape[2] - query.shape[2]
    if attention_mask is not None or query.shape[0] != 1 or prefix <= 0 or position_ids is None:
        return packed_sdpa_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout,
            scaling,
            is_causal,
            position_ids=position_ids,
            **kwargs,
        )
    outs, start = [], 0
    for n in segment_lengths(position_ids):
        end = prefix + start + n
        keys = torch.cat([key[:, :, :prefix], key[:, :, prefix + start : end]], dim=2)
        values = torch.cat([value[:, :, :prefix], value[:, :, prefix + start : end]], dim=2)
        # query i (absolute position prefix + i) sees keys 0 .. prefix + i
        mask = torch.ones(n, prefix + n, dtype=torch.bool, device=query.device).tril(prefix)
        q = query[:, :, start : start + n]
        out, _ = sdpa_attention_forward(module, q, keys, values, mask[None, None], dropout, scaling)
        outs.append(out)
        start += n
    return torch.cat(outs, dim=1), None


def _prefix_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs
):
    """No mask for one row without padding (the position ids and the cache say everything),
    else transformers' SDPA mask."""
    if batch_size == 1 and attention_mask is None:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, **kwargs)


def register_prefix_attention() -> str:
    """Make `PREFIX_ATTENTION` a valid `attn_implementation` (idempotent); returns the name."""
    return register_attention(PREFIX_ATTENTION, prefix_packed_sdpa_forward, _prefix_mask)

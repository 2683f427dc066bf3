"""SDPA attention that keeps packed examples apart and runs fast on CPU, as a transformers kernel.

Registered under `ATTENTION_NAME`; a model switched to it computes what "sdpa" computes. Packing
the rows (position ids restarting per example) is data/packing.py's business.
"""

from __future__ import annotations

import torch

from tuneforge.train.math_attention import applies, causal_attention

ATTENTION_NAME = "tuneforge_sdpa"


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the examples packed in one row: a new one starts wherever positions do not step by 1.

    The same rule as transformers' `find_packed_sequence_indices`, so both paths agree.
    """
    row = position_ids.reshape(-1)
    starts = torch.nonzero(row[1:] - row[:-1] != 1).flatten() + 1
    bounds = [0, *starts.tolist(), row.numel()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _sdpa(module, query, key, value, mask, dropout, scaling, is_causal, **kwargs):
    """transformers' SDPA; bf16 training on CPU runs it in fp32, whose flash backward is ~2x faster.

    (The fp32 forward alone is slower, so evaluation stays in bf16.)
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    upcast = dtype == torch.bfloat16 and query.device.type == "cpu" and query.requires_grad
    if not upcast:
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout, scaling, is_causal, **kwargs
        )
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA back to bf16
        out, weights = sdpa_attention_forward(
            module,
            query.float(),
            key.float(),
            value.float(),
            mask,
            dropout,
            scaling,
            is_causal,
            **kwargs,
        )
    return out.to(dtype), weights


def packed_sdpa_forward(
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
    """transformers attention interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out.

    One packed row (no padding mask, position ids restarting per example) is attended example
    by example: causal within each, nothing across, and no work on the masked pairs between them.
    Anything else (padded batches, caches, prefixes) is plain SDPA with transformers' mask.
    """
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    packed = (
        attention_mask is None  # see _mask: one row, no padding, no cache
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] > 1
        and causal
        and position_ids is not None
    )
    if not packed:
        return _sdpa(
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
    lengths = segment_lengths(position_ids)
    parts = zip(
        query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True
    )
    outs = [
        causal_attention(q, k, v, scaling)
        if applies(q, dropout, kwargs)
        else _sdpa(module, q, k, v, None, dropout, scaling, True)[0]
        for q, k, v in parts
    ]
    return torch.cat(outs, dim=1), None


def sdpa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kw):
    """transformers' own SDPA mask (the fallback of every mask function registered here)."""
    from transformers.masking_utils import sdpa_mask as transformers_sdpa_mask

    return transformers_sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kw,
    )


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """transformers' SDPA mask, except for one row without padding or cache: there the position
    ids say everything (packed examples, or one causal sequence) and no T x T mask is built."""
    one_row = batch_size == 1 and attention_mask is None and q_length == kv_length
    if one_row and not q_offset and not kv_offset:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, **kwargs)


def register_attention(name: str, forward, mask) -> str:
    """Make `name` a valid `attn_implementation` with this kernel and mask function
    (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask)
    return name


def register() -> str:
    """Make `ATTENTION_NAME` a valid `attn_implementation` (idempotent); returns the name."""
    return register_attention(ATTENTION_NAME, packed_sdpa_forward, _mask)


def use_packed_sdpa(model: torch.nn.Module) -> bool:
    """Switch a model that runs "sdpa" with full causal attention to this kernel; True if it did.

    Models with sliding-window or other non-causal layers keep their own attention.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    register()
    set_attention(model, ATTENTION_NAME)
    return True


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Switch the model's attention to `name`, also in layers that carry a copy of the config
    (peft's modules_to_save deep-copies a fully trained block, config and all; left on plain
    SDPA, such a block would attend across packed examples)."""
    model.set_attn_implementation(name)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not model.config and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name

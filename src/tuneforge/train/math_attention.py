"""Causal attention of one short example as plain matrix products, for training on a bf16 CPU.

PyTorch's CPU flash-attention kernel is slow on short rows; for an example of up to `MAX_LENGTH`
tokens, fp32 scores, an fp32 softmax and four bf16 `bmm`s do the same work in about two-thirds of
the time (bench/notes.md).
"""

from __future__ import annotations

import functools

import torch

#: Longest example attended this way: backward keeps its probabilities (heads x L x L bf16,
#: 4.7 MB per layer at 512 and 9 heads); longer examples keep the flash kernel's O(L) memory.
MAX_LENGTH = 512


@functools.cache
def _native_bf16() -> bool:
    from tuneforge.models import cpu_supports_bf16

    return cpu_supports_bf16()


def applies(query: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    """True where this kernel computes what SDPA would: bf16 training on a CPU with native bf16,
    no attention dropout, no sliding window, soft-capping or sink logits, a short example."""
    return (
        query.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and query.requires_grad
        and query.shape[0] == 1
        and query.shape[2] <= MAX_LENGTH
        and not dropout
        and not any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux"))
        and _native_bf16()
    )


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """One example: query (1, heads, L, dim), key/value (1, kv_heads, L, dim) -> (1, L, heads, dim),
    the layout transformers' attention functions return."""
    heads, length, dim = query.shape[1:]
    scale = dim**-0.5 if scaling is None else scaling
    out = _CausalAttention.apply(query[0], key[0], value[0], scale)
    return out.view(heads, length, dim).transpose(0, 1).unsqueeze(0)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(heads, L, dim) -> (kv_heads, group * L, dim): each key head's query heads stacked."""
    heads, length, dim = x.shape
    return x.reshape(kv_heads, heads // kv_heads * length, dim)


def _causal_mask(length: int, group: int) -> torch.Tensor:
    """True above the diagonal, for (kv_heads, group, L, L) scores."""
    return torch.ones(length, length, dtype=torch.bool).triu_(1).expand(group, length, length)


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T * scale, causal) v: scores in fp32 (rounded to bf16, a score of 60 would be
    off by 0.25 before `exp`), probabilities and the other products in bf16.

    Saves the bf16 probabilities; backward is the textbook one: dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(P * dP)) * scale, dQ = dS K, dK = dS^T Q.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float):  # q (heads, L, dim), k/v (kv_heads, L, dim)
        kv_heads, length = k.shape[0], k.shape[1]
        group = q.shape[0] // kv_heads
        with torch.autocast("cpu", enabled=False):
            qg = _grouped(q, kv_heads)
            scores = torch.bmm(qg.float(), k.float().transpose(1, 2)).mul_(scale)
            scores = scores.view(kv_heads, group, length, length)
            scores.masked_fill_(_causal_mask(length, group), float("-inf"))
            probs = torch.softmax(scores, dim=-1).view(kv_heads, group * length, length)
            probs = probs.to(q.dtype)
            out = torch.bmm(probs, v)
        ctx.save_for_backward(qg, k, v, probs)
        ctx.scale = scale
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, probs = ctx.saved_tensors
        kv_heads = k.shape[0]
        with torch.autocast("cpu", enabled=False):
            dout = _grouped(grad_out.to(v.dtype), kv_heads)
            dv = torch.bmm(probs.transpose(1, 2), dout)
            dprobs = torch.bmm(dout, v.transpose(1, 2)).float()
            p = probs.float()
            delta = (p * dprobs).sum(-1, keepdim=True)
            dscores = p.mul_(dprobs.sub_(delta)).mul_(ctx.scale).to(v.dtype)
            dq = torch.bmm(dscores, k)
            dk = torch.bmm(dscores.transpose(1, 2), qg)
        return dq.view(grad_out.shape), dk, dv, None

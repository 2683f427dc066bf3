"""Dropout for CPU training that draws 16 random bits per element and keeps a 1-byte mask.

Same distribution as torch.nn.Dropout (keep with probability 1 - p, scale by 1 / (1 - p); p is
rounded to 1/65536), from torch's own generator, so seeding and resume work as before. Which
modules to swap is fastpath.py's business; evaluation mode is the identity, as always.
"""

from __future__ import annotations

import torch


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool tensor, True with probability p (to 1/65536): four 16-bit draws per 64-bit word.

    torch's Bernoulli draws one 32-bit number per element through a serial generator (about
    7 ms per million elements on this CPU); this draws a quarter as many words.
    """
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # every bit uniform, not only the low 63
    threshold = round(p * 65536) - 32768
    return words.view(torch.int16)[:n].view(shape) < threshold


def zero_where(drop: torch.Tensor, x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """`x.masked_fill(drop, 0)` (`masked_fill_` when in place), through torch.where: the same
    values, about twice as fast on CPU, where masked_fill's bool-mask kernel is not vectorised."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if inplace:
        return torch.where(drop, zero, x, out=x)
    return torch.where(drop, zero, x)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)  # 1 byte per element, where torch keeps an x-sized tensor
        ctx.scale = scale
        return zero_where(drop, x.mul(scale), inplace=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return zero_where(drop, grad.mul(ctx.scale), inplace=True), None, None


class FastDropout(torch.nn.Module):
    """A drop-in for torch.nn.Dropout(p) (not in-place)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _Dropout.apply(x, drop_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap every plain nn.Dropout(p > 0) of `model` for FastDropout; returns how many."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and 0.0 < child.p < 1.0 and not child.inplace:
                setattr(parent, name, FastDropout(child.p))
                count += 1
    return count

"""A peft LoRA Linear's training forward as one autograd node: base matmul + dropout -> A -> B.

Keeps the dropped input (one copy per distinct layer input, shared by the adapters that read it),
a 1-byte mask and the rank-r activations; which layers get it is decided here, the rest is peft's.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tuneforge.train.dropout import FastDropout, drop_mask, zero_where


@dataclass(frozen=True)
class Levers:
    """The fused path's switches; all on in training (bench/lora_levers.py turns each off).

    fold: the frozen base matmul runs inside the node, the LoRA scale is folded into B and the
    branch is added into the base output by an in-place addmm (off: base, branch, scale and add
    as separate passes). share_masks: the adapters reading the same input tensor (q/k/v,
    gate/up) share one dropout mask and one dropped input, kept for backward instead of
    recomputed (off: one mask per adapter, as peft draws them).
    """

    fold: bool = True
    share_masks: bool = True


class SharedDrop:
    """The dropout mask and dropped input of the layer input seen last, for the next adapter that
    reads the very same tensor (same object, unmodified); forgotten when that input is freed."""

    def __init__(self) -> None:
        self._entry: tuple | None = None  # (weakref to input, key, mask, dropped input)

    def get(
        self, x: torch.Tensor, p: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, dropped input in `dtype`): drawn on first sight of `x`, the same ones after."""
        key = (x._version, p, dtype)
        entry = self._entry
        if entry is not None and entry[0]() is x and entry[1] == key:
            return entry[2], entry[3]
        drop = drop_mask(x.shape, p, x.device)
        dropped = zero_where(drop, x.to(dtype))
        self._entry = (weakref.ref(x, self._forget), key, drop, dropped)
        return drop, dropped

    def _forget(self, ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self._entry = None


@dataclass
class _State:
    """One per model: the levers and the mask cache its fused layers share."""

    levers: Levers
    shared: SharedDrop = field(default_factory=SharedDrop)


@dataclass(frozen=True)
class _Call:
    """The non-tensor arguments of one fused call."""

    scaling: float
    p: float
    dtype: torch.dtype
    shared: SharedDrop | None  # None: this adapter draws its own mask


def _dropped(x: torch.Tensor, call: _Call) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
    """(mask, dropped input in the compute dtype, whether the dropped input is shared and kept)."""
    if call.p == 0.0:
        return None, x.to(call.dtype), True
    if call.shared is not None:
        drop, dropped = call.shared.get(x, call.p, call.dtype)
        return drop, dropped, True
    drop = drop_mask(x.shape, call.p, x.device)
    return drop, zero_where(drop, x.to(call.dtype)), False


class _LoraLinear(torch.autograd.Function):
    """`base(x) + linear(linear(dropout(x), A), B) * scaling` with a frozen base (`weight` None:
    the branch alone). The dropout scale 1 / (1 - p) multiplies A and, with a base, the LoRA
    scale multiplies B: small matrices instead of activation-sized passes (equal in exact
    arithmetic; in bf16 the products round differently)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, call: _Call):
        keep = 1.0 / (1.0 - call.p)
        with torch.autocast(x.device.type, enabled=False):
            drop, xd, shared = _dropped(x, call)
            a = (weight_a * keep).to(call.dtype)
            h = torch.matmul(xd, a.T)
            if weight is None:
                b = weight_b.to(call.dtype)
                out = torch.matmul(h, b.T).mul_(call.scaling)
            else:
                b = (weight_b * call.scaling).to(call.dtype)
                base_bias = None if bias is None else bias.to(call.dtype)
                out = F.linear(x.to(call.dtype), weight.to(call.dtype), base_bias)
                out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.T)
        # Kept: the shared dropped input (no recompute in backward), else the input itself,
        # which its caller keeps anyway: one dropped copy per adapter would cost memory.
        ctx.save_for_backward(xd if shared else x.to(call.dtype), drop, h, a, b, weight)
        ctx.recompute, ctx.keep, ctx.scaling = not shared, keep, call.scaling
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        kept, drop, h, a, b, weight = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad_x = grad_a = grad_b = None
        with torch.autocast(kept.device.type, enabled=False):
            g, h = grad.to(h.dtype).reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
            if weight is None:
                g = g * ctx.scaling  # the branch's output scale (folded into b with a base)
            if need_b:
                grad_b = g.T @ h
                grad_b = (grad_b if weight is None else grad_b.mul_(ctx.scaling)).to(b_dtype)
            grad_h = g @ b
            if need_a:
                xd = zero_where(drop, kept) if ctx.recompute else kept
                grad_a = (grad_h.T @ xd.reshape(h.shape[0], -1)).to(a_dtype).mul_(ctx.keep)
            if need_x:
                gx = grad_h @ a
                if drop is not None:
                    zero_where(drop.view(gx.shape), gx, inplace=True)
                if weight is not None:
                    gx.addmm_(g, weight.to(g.dtype))  # the base's input gradient, in place
                grad_x = gx.view(kept.shape).to(x_dtype)
        return grad_x, None, None, grad_a, grad_b, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype peft's adapter matmuls run in: autocast's where it is on, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _foldable(base: torch.nn.Linear, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the base matmul can join the node: frozen, no hooks, computing in `dtype` (as
    autocast, or the weights' own dtype, would have it)."""
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    hooked = base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")
    if not frozen or hooked:
        return False
    return torch.is_autocast_enabled(x.device.type) or x.dtype == base.weight.dtype == dtype


def _plain_adapter(layer: torch.nn.Module) -> str | None:
    """The one active adapter of a peft LoRA Linear when its branch is plain LoRA, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None
    if lora_a.bias is not None or lora_b.bias is not None:
        return None
    if type(layer.lora_dropout[name]) not in (torch.nn.Identity, torch.nn.Dropout, FastDropout):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self) if self.training and not args and not kwargs else None
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    state: _State = self._tuneforge_fused
    dropout = self.lora_dropout[name]
    p = getattr(dropout, "p", 0.0) if dropout.training else 0.0
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    dtype = _compute_dtype(x, weight_a)
    shared = state.shared if state.levers.share_masks else None
    call = _Call(float(self.scaling[name]), p, dtype, shared)
    base = self.base_layer
    if state.levers.fold and _foldable(base, x, dtype):
        return _LoraLinear.apply(x, base.weight, base.bias, weight_a, weight_b, call)
    result = base(x)
    branch = _LoraLinear.apply(x, None, None, weight_a, weight_b, call)
    return (result + branch).to(result.dtype)


def use_fused_lora(model: torch.nn.Module, levers: Levers | None = None) -> int:
    """Give every peft LoRA Linear over an nn.Linear the fused training forward; returns how many.

    The module's own forward still runs whenever the layer is not plain single-adapter LoRA at
    that moment (evaluation, merged, DoRA, several adapters, bias). Calling it again replaces
    the levers (bench/lora_levers.py).
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    state = _State(levers or Levers())
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            if _plain_adapter(module) is not None:
                module._tuneforge_fused = state
                module.forward = types.MethodType(_fused_forward, module)
                count += 1
    return count

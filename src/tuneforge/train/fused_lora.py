"""LoRA's dropout -> A -> B -> scale as one autograd node for training, where peft runs three modules.

Keeps the layer's input (which the frozen base matmul keeps anyway), a 1-byte dropout mask and the
rank-r activations; peft's path also keeps a dropped copy of the input for each adapted layer.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from tuneforge.train.dropout import FastDropout, drop_mask


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype peft's adapter matmuls run in: autocast's where it is on, else the weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _LoraBranch(torch.autograd.Function):
    """`linear(linear(dropout(x), A), B) * scaling`: peft's branch, with the dropout scale moved
    onto A (equal in exact arithmetic; in bf16 the products round differently)."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling: float, p: float, dtype: torch.dtype):
        # The dropout scale 1 / (1 - p) multiplies the small A matrix, not the activations:
        # one pass over the input (the mask) instead of two.
        scale = 1.0 / (1.0 - p)
        with torch.autocast(x.device.type, enabled=False):
            xc, b = x.to(dtype), weight_b.to(dtype)
            a = (weight_a * scale).to(dtype)
            drop = drop_mask(x.shape, p, x.device) if p > 0.0 else None
            xd = xc if drop is None else xc.masked_fill(drop, 0)
            h = F.linear(xd, a)
            out = F.linear(h, b) * scaling
        ctx.save_for_backward(xc, drop, h, a, b)
        ctx.scaling, ctx.scale = scaling, scale
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, drop, h, a, b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        grad_x = grad_a = grad_b = None
        with torch.autocast(xc.device.type, enabled=False):
            g = (grad.to(h.dtype) * ctx.scaling).flatten(0, -2)
            if need_b:
                grad_b = (g.T @ h.flatten(0, -2)).to(b_dtype)
            grad_h = g @ b
            if need_a:
                xd = xc if drop is None else xc.masked_fill(drop, 0)
                grad_a = (grad_h.T @ xd.flatten(0, -2)).to(a_dtype).mul_(ctx.scale)
            if need_x:
                gx = (grad_h @ a).view(xc.shape)
                grad_x = (gx if drop is None else gx.masked_fill_(drop, 0)).to(x_dtype)
        return grad_x, grad_a, grad_b, None, None, None


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
    result = self.base_layer(x)
    dropout = self.lora_dropout[name]
    p = getattr(dropout, "p", 0.0) if dropout.training else 0.0
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    dtype = _compute_dtype(x, weight_a)
    branch = _LoraBranch.apply(x, weight_a, weight_b, float(self.scaling[name]), p, dtype)
    return (result + branch).to(result.dtype)


def use_fused_lora(model: torch.nn.Module) -> int:
    """Give every peft LoRA Linear over an nn.Linear the fused training branch; returns how many.

    The module's own forward still runs whenever the layer is not plain single-adapter LoRA at
    that moment (evaluation, merged, DoRA, several adapters, bias), so nothing else changes.
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            if _plain_adapter(module) is not None:
                module.forward = types.MethodType(_fused_forward, module)
                count += 1
    return count

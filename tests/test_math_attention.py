"""The bf16 matrix-product attention: SDPA's values and gradients, and used only where it applies."""

import pytest
import torch
import torch.nn.functional as F

import tuneforge.train.math_attention as math_attention
from tuneforge.data.packing import pack_examples
from tuneforge.train.attention import use_packed_sdpa
from tuneforge.train.loss import CausalLMLoss
from tuneforge.train.math_attention import MAX_LENGTH, applies, causal_attention

from conftest import build_tiny_llama
from helpers import random_examples


def _qkv(length, heads=6, kv_heads=2, dim=16, seed=0, sharp=1.0):
    gen = torch.Generator().manual_seed(seed)

    def one(h, scale=1.0):
        x = (scale * torch.randn(1, h, length, dim, generator=gen)).to(torch.bfloat16)
        return x.requires_grad_()

    return one(heads, sharp), one(kv_heads), one(kv_heads)


def _errors(fn, q, k, v, grad):
    """Largest |difference| from fp64 SDPA of fn's output and of its q/k/v gradients."""
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return [float((out.detach().double() - ref.detach()).abs().max())] + [
        float((g.double() - r).abs().max()) for g, r in zip(grads, ref_grads, strict=True)
    ]


def _flash_fp32(q, k, v):  # what training ran before: SDPA on fp32 copies, output back in bf16
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    return out.to(torch.bfloat16).transpose(1, 2)


@pytest.mark.parametrize("length,sharp", [(1, 1.0), (7, 1.0), (64, 1.0), (64, 8.0)])
def test_matches_sdpa_to_bf16_rounding(length, sharp):
    """Output and every gradient are as close to fp64 SDPA as the fp32 flash kernel's (bf16 in
    and out), within twice its error plus 0.01. `sharp` scales the scores up
    (logits of tens, as at attention sinks), where scores rounded to bf16 would be far off."""
    q, k, v = _qkv(length, sharp=sharp)
    grad = torch.randn(1, length, 6, 16, generator=torch.Generator().manual_seed(1))
    mine = _errors(lambda *x: causal_attention(*x, None), q, k, v, grad)
    flash = _errors(_flash_fp32, q, k, v, grad)
    for m, f in zip(mine, flash, strict=True):
        assert m <= 2 * f + 1e-2, (mine, flash)


def test_causal_and_scaled():
    """A query sees no later key: changing the last key/value changes only the last output;
    a custom scale is used."""
    q, k, v = _qkv(5)
    out = causal_attention(q, k, v, 0.3)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, -1] += 1
    v2[:, :, -1] += 1
    out2 = causal_attention(q, k2, v2, 0.3)
    torch.testing.assert_close(out[:, :-1], out2[:, :-1])
    assert not torch.allclose(out[:, -1], out2[:, -1])
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True, scale=0.3
    )
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), atol=3e-2, rtol=0)


def test_applies_only_where_it_computes_sdpa(monkeypatch):
    monkeypatch.setattr(math_attention, "_native_bf16", lambda: True)
    q = _qkv(8)[0]
    assert applies(q, 0.0, {})
    assert not applies(q.detach(), 0.0, {})  # inference keeps SDPA's bf16 forward
    assert not applies(q.float(), 0.0, {})
    assert not applies(q, 0.1, {})
    assert not applies(q, 0.0, {"sliding_window": 4})
    assert not applies(_qkv(MAX_LENGTH + 1)[0], 0.0, {})
    monkeypatch.setattr(math_attention, "_native_bf16", lambda: False)
    assert not applies(q, 0.0, {})


def _bf16_loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    n = float((batch["labels"][:, 1:] != -100).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CausalLMLoss(model)(model, batch, n)
    loss.backward()
    return float(loss), {k: p.grad.float() for k, p in model.named_parameters()}


def test_bf16_training_step_matches_the_flash_kernel(monkeypatch):
    """A packed bf16 step of a tiny Llama: the loss and every gradient as with the flash kernel,
    to bf16 rounding; and the packed examples are attended with the new kernel."""
    model = build_tiny_llama(300, seed=0).to(torch.bfloat16)
    assert use_packed_sdpa(model)
    batch = pack_examples(random_examples([9, 23, 4, 17, 2]))
    calls = []

    def counted(*args):
        calls.append(args[0].shape[2])
        return causal_attention(*args)

    monkeypatch.setattr("tuneforge.train.attention.causal_attention", counted)
    monkeypatch.setattr(math_attention, "_native_bf16", lambda: False)
    ref_loss, ref_grads = _bf16_loss_grads(model, batch)
    assert calls == []
    monkeypatch.setattr(math_attention, "_native_bf16", lambda: True)
    loss, grads = _bf16_loss_grads(model, batch)
    assert calls == [9, 23, 4, 17, 2] * 2  # every example in both layers
    assert abs(loss - ref_loss) < 2e-2 * abs(ref_loss)
    for name, g in ref_grads.items():
        scale = float(g.abs().max())
        assert float((grads[name] - g).abs().max()) <= 0.06 * scale + 1e-3, name

"""Precision: bf16 weights + fp32 adapters under autocast track the fp32 path; never fp16 on CPU;
the CPU attention and adapter-cast shortcuts change nothing but speed."""

import os
from contextlib import nullcontext

import pytest
import torch

from tuneforge.data.packing import pack_examples
from tuneforge.data.pipeline import TokenizedExample
from tuneforge.models import resolve_dtype
from tuneforge.train.attention import ATTENTION_NAME, packed_sdpa_forward, use_packed_sdpa
from tuneforge.train.dropout import FastDropout, drop_mask, use_fast_dropout, zero_where
from tuneforge.train.fastpath import (
    auto_num_threads,
    prepare_fast_path,
    set_threads,
    skip_adapter_input_casts,
)
from tuneforge.train.loss import CausalLMLoss

from conftest import build_tiny_llama


@pytest.mark.parametrize("name", ["auto", "bf16", "fp32"])
def test_cpu_dtype_is_never_fp16(name):
    assert resolve_dtype(name, "cpu") in (torch.bfloat16, torch.float32)
    assert resolve_dtype(name, "cpu") != torch.float16


def _examples(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 30, (1,), generator=gen))
        ids = torch.randint(3, 300, (length,), generator=gen).tolist()
        out.append(TokenizedExample(ids, [-100] * 3 + ids[3:], f"f:{i + 1}"))
    return out


def _lora(dtype):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(300, seed=0).to(dtype)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters: the master copies the optimizer updates
    return model


def _train(dtype, steps=6):
    """The recipe's precision for `dtype`: bf16 frozen weights + fp32 adapters + autocast."""
    model = _lora(dtype)
    bf16 = dtype == torch.bfloat16
    prepare_fast_path(model, autocast=bf16, packing=True, compile=False, num_threads=None)
    params = [p for p in model.parameters() if p.requires_grad]
    start = torch.cat([p.detach().flatten() for p in params])
    opt = torch.optim.AdamW(params, lr=3e-2)
    loss_fn, exs, losses = CausalLMLoss(model), _examples(4), []
    batch = pack_examples(exs)  # the same rows every step: the loss must fall
    for _ in range(steps):
        n = float((batch["labels"][:, 1:] != -100).sum())
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = loss_fn(model, batch, n)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 for p in params)  # the masters stay fp32
    return losses, torch.cat([p.detach().flatten() for p in params]) - start


def test_bf16_path_tracks_fp32_path():
    """Six steps: the bf16 path's losses and weight updates stay close to the fp32 path's."""
    ref_losses, ref_update = _train(torch.float32)
    losses, update = _train(torch.bfloat16)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # it learns
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(update, ref_update, dim=0)
    assert float(cosine) > 0.95  # the same training, up to bf16 rounding


def _qkv(dtype, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 4, length, 8), (1, 2, length, 8), (1, 2, length, 8)]
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2
    training = True


def test_cpu_bf16_attention_runs_in_fp32_and_matches_sdpa():
    """The fp32 upcast (faster backward on CPU) returns bf16 and agrees with bf16 SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(torch.bfloat16)
    positions = torch.arange(24)[None]
    ours, _ = packed_sdpa_forward(_Attn(), q, k, v, None, position_ids=positions)
    assert ours.dtype == torch.bfloat16 and ours.shape == (1, 24, 4, 8)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, None)
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_packed_attention_is_exact_in_fp32():
    """Segments attended one by one equal one masked SDPA call (block-diagonal causal mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(torch.float32, length=15)
    lengths = [4, 6, 5]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(15, 15, dtype=torch.bool).tril()
    ours, _ = packed_sdpa_forward(_Attn(), q, k, v, None, position_ids=positions)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask[None, None])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_skipping_adapter_casts_changes_no_value_under_autocast():
    """Bit-identical logits: autocast casts the adapter's input to bf16 for the matmul either way
    (bf16 -> fp32 -> bf16 is lossless). lora_B gets non-zero values, else the adapter branch
    would add exactly zero and the test would check nothing."""
    model = _lora(torch.bfloat16)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    batch = pack_examples(_examples(4))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.disable_adapter_layers()
        plain = model(**inputs).logits
        model.enable_adapter_layers()
        before = model(**inputs).logits
        assert skip_adapter_input_casts(model) == 14  # 7 adapted linears x 2 layers
        after = model(**inputs).logits
    assert (before - plain).abs().max() > 0.1  # the adapters really contribute
    assert torch.equal(after, before)


def test_sdpa_models_switch_to_the_packed_kernel_and_others_do_not():
    model = build_tiny_llama(300)
    model.set_attn_implementation("sdpa")
    assert use_packed_sdpa(model) and model.config._attn_implementation == ATTENTION_NAME
    eager = build_tiny_llama(300)
    eager.set_attn_implementation("eager")
    assert not use_packed_sdpa(eager)
    windowed = build_tiny_llama(300)
    windowed.set_attn_implementation("sdpa")
    windowed.config.sliding_window = 8
    assert not use_packed_sdpa(windowed)


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        cores = len(os.sched_getaffinity(0))
        assert auto_num_threads() == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
        assert auto_num_threads() == 1  # torchrun: processes share the cores, never below one
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == torch.get_num_threads()  # the user's setting wins
    finally:
        torch.set_num_threads(before)


def test_fast_dropout_is_dropout():
    """Drop probability p, survivors scaled by 1/(1-p), gradient through the same mask,
    identity in eval mode, reproducible from torch's seed."""
    drop = drop_mask(torch.Size([2000, 500]), 0.1, torch.device("cpu"))
    assert drop.dtype == torch.bool and abs(float(drop.float().mean()) - 0.1) < 0.003
    layer = FastDropout(0.25)
    x = torch.ones(400, 300, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(4 / 3)]
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.01
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, 2.0 * y.detach())  # same mask, same scale
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)
    layer.eval()
    assert layer(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_where_is_masked_fill(dtype):
    """Bit for bit masked_fill's result (NaN, inf and -0.0 included), in place when asked."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, -1.0])
    drop = torch.rand(64, 48, generator=gen) < 0.3
    drop[0, :2] = True
    ref = x.masked_fill(drop, 0)
    out = zero_where(drop, x)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    assert torch.equal(
        out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    same = zero_where(drop, x, inplace=True)
    assert same.data_ptr() == x.data_ptr() and torch.equal(x.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(x), torch.nan_to_num(ref))


def test_fast_dropout_replaces_every_plain_dropout():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_llama(300), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear")
    )
    assert use_fast_dropout(model) == 14  # 7 adapted linears x 2 layers
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == 14

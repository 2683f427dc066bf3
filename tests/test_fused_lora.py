"""The fused LoRA branch gives peft's outputs and gradients (same dropout draws), keeps less for
backward, and steps aside wherever the layer is not plain single-adapter LoRA."""

from contextlib import nullcontext

import torch

from tuneforge.train.dropout import use_fast_dropout
from tuneforge.train.fused_lora import _LoraBranch, use_fused_lora

from conftest import build_tiny_llama


def _lora(dtype, dropout=0.1, **extra):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(300, seed=0).to(dtype)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", **extra
    )
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            p.data.normal_(0, 0.1)  # B starts at zero: give it values so every gradient is live
    use_fast_dropout(model)
    return model


def _step(model, autocast: bool):
    """Logits and adapter gradients of one seeded forward + backward."""
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout draws
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _rel_err(grads, ref):
    return max(float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref)


def test_fused_branch_equals_peft_in_fp32(one_thread):
    model = _lora(torch.float32)
    model.train()
    ref_logits, ref_grads = _step(model, autocast=False)
    assert use_fused_lora(model) == 14  # 7 adapted linears x 2 layers
    logits, grads = _step(model, autocast=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    assert _rel_err(grads, ref_grads) < 1e-5


def test_fused_branch_is_as_accurate_as_peft_in_bf16(one_thread):
    """Under autocast the dropout scale multiplies A instead of the activations (one pass less),
    so products round differently: against the fp32 gradients (same dropout draws), the fused
    bf16 step is as close as peft's own bf16 step."""
    exact = _lora(torch.float32)
    exact.train()
    _, fp32_grads = _step(exact, autocast=False)
    model = _lora(torch.bfloat16)
    model.train()
    ref_logits, peft_grads = _step(model, autocast=True)
    use_fused_lora(model)
    logits, grads = _step(model, autocast=True)
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=1e-2)
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 masters, fp32 grads
    peft_err, fused_err = _rel_err(peft_grads, fp32_grads), _rel_err(grads, fp32_grads)
    assert peft_err < 0.1  # bf16 rounding, not a different computation
    assert fused_err < 1.25 * peft_err, (fused_err, peft_err)


def test_fused_branch_draws_the_dropout_of_peft(one_thread):
    """Same seed, same masks: in fp32 the fused and unfused steps agree although dropout is on,
    and a different seed does not (so the masks really matter)."""
    model = _lora(torch.float32, dropout=0.5)
    model.train()
    ref, _ = _step(model, autocast=False)
    use_fused_lora(model)
    same, _ = _step(model, autocast=False)
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(model(input_ids=ids).logits, ref, atol=1e-3)


def test_fused_branch_keeps_no_dropped_copy_of_the_input():
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(4, 48, requires_grad=True)
    b = torch.randn(16, 4, requires_grad=True)
    out = _LoraBranch.apply(x, a, b, 2.0, 0.1, torch.bfloat16)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 2 and {t.dtype for t in big} == {torch.bfloat16, torch.bool}
    assert any(t.data_ptr() == x.data_ptr() for t in big)  # the input itself, not a copy


def test_fused_branch_steps_aside_when_not_plain_lora():
    model = _lora(torch.float32)
    assert use_fused_lora(model) == 14
    model.eval()  # evaluation: peft's own forward (no dropout); equal to the unfused model
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    plain = _lora(torch.float32)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert not torch.allclose(fused, base)  # the adapters are really on
    dora = _lora(torch.float32, use_dora=True)
    assert use_fused_lora(dora) == 0  # DoRA is a peft variant: its own forward


def test_fused_branch_merges_like_peft():
    model = _lora(torch.float32, dropout=0.0)
    use_fused_lora(model)
    model.eval()
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)

"""The fused LoRA layer gives peft's outputs and gradients (same dropout draws; with shared masks,
peft's when its adapters on one input draw from the same generator state), keeps less for
backward, and steps aside wherever the layer is not plain single-adapter LoRA."""

import gc
from contextlib import nullcontext

import pytest
import torch

import tuneforge.train.fused_lora as fused_lora
from tuneforge.train.dropout import use_fast_dropout
from tuneforge.train.fastpath import skip_adapter_input_casts
from tuneforge.train.fused_lora import Levers, SharedDrop, _Call, _LoraLinear, use_fused_lora

from conftest import build_tiny_llama, build_tiny_qwen2

LEVERS = [Levers(), Levers(fold=False), Levers(share_masks=False), Levers(False, False)]


class _SameStreamDropout(torch.nn.Module):
    """peft's dropout, except that an adapter reading the tensor the previous adapter read draws
    from the generator state that one drew from: the masks one shared draw gives."""

    def __init__(self, inner: torch.nn.Module, memo: dict) -> None:
        super().__init__()
        self.inner, self.memo = inner, memo

    def forward(self, x):
        if self.memo.get("x") is x:
            torch.set_rng_state(self.memo["state"])
        else:
            self.memo.update(x=x, state=torch.get_rng_state())
        return self.inner(x)


def _lora(dtype, dropout=0.1, build=build_tiny_llama, same_stream=False, **extra):
    from peft import LoraConfig, get_peft_model

    model = build(300).to(dtype)
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
    skip_adapter_input_casts(model)  # the same input object reaches q/k/v (no value changes)
    memo: dict = {}
    for module in list(model.modules()) if same_stream else []:
        if hasattr(module, "lora_dropout"):
            for name, inner in list(module.lora_dropout.items()):
                module.lora_dropout[name] = _SameStreamDropout(inner, memo)
    return model.train()


def _step(model, autocast: bool, seed: int = 7):
    """Logits and adapter gradients of one seeded forward + backward."""
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout draws
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _rel_err(grads, ref):
    return max(float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref)


@pytest.mark.parametrize("levers", LEVERS, ids=repr)
@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_qwen2], ids=["llama", "qwen2"])
def test_fused_equals_peft_in_fp32(one_thread, levers, build):
    """Forward and every gradient, dropout on; Qwen2's q/k/v carry a bias into the fold."""
    ref_logits, ref_grads = _step(
        _lora(torch.float32, build=build, same_stream=levers.share_masks), False
    )
    model = _lora(torch.float32, build=build)
    assert use_fused_lora(model, levers) == 14  # 7 adapted linears x 2 layers
    logits, grads = _step(model, autocast=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    assert _rel_err(grads, ref_grads) < 1e-5


@pytest.mark.parametrize("levers", [Levers(), Levers(False, False)], ids=repr)
def test_fused_is_as_accurate_as_peft_in_bf16(one_thread, levers):
    """Under autocast the scales multiply A and B instead of the activations, and the branch is
    added inside the base's matmul, so products round differently: against the fp32 gradients
    (same dropout draws), the fused bf16 step is as close as peft's own bf16 step."""
    same = levers.share_masks
    _, fp32_grads = _step(_lora(torch.float32, same_stream=same), autocast=False)
    ref_logits, peft_grads = _step(_lora(torch.bfloat16, same_stream=same), autocast=True)
    model = _lora(torch.bfloat16)
    use_fused_lora(model, levers)
    logits, grads = _step(model, autocast=True)
    torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=1e-2)
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 masters, fp32 grads
    peft_err, fused_err = _rel_err(peft_grads, fp32_grads), _rel_err(grads, fp32_grads)
    assert peft_err < 0.1  # bf16 rounding, not a different computation
    assert fused_err < 1.25 * peft_err, (fused_err, peft_err)


def test_masks_are_drawn_once_per_distinct_input(one_thread, monkeypatch):
    """Shared: q/k/v, o, gate/up, down: 4 draws a layer; per adapter (peft's draws): 7. The
    shared masks are not peft's independent ones, and another seed gives other masks."""
    calls = []
    real = fused_lora.drop_mask
    monkeypatch.setattr(fused_lora, "drop_mask", lambda *a: calls.append(a[0]) or real(*a))
    model = _lora(torch.float32, dropout=0.5)
    use_fused_lora(model)
    shared, _ = _step(model, autocast=False)
    assert len(calls) == 8 and [s[-1] for s in calls[:4]] == [32, 32, 32, 64]
    use_fused_lora(model, Levers(share_masks=False))
    calls.clear()
    own, _ = _step(model, autocast=False)
    assert len(calls) == 14
    peft, _ = _step(_lora(torch.float32, dropout=0.5), autocast=False)
    torch.testing.assert_close(own, peft, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shared, peft, atol=1e-3)
    use_fused_lora(model)
    assert not torch.allclose(_step(model, autocast=False, seed=8)[0], shared, atol=1e-3)


def test_adapters_on_one_input_keep_one_dropped_copy():
    """Three adapters on one input (q/k/v): one dropped input and one mask kept between them,
    not the input itself; per-adapter masks keep the input (no copy) and one mask each."""
    x = torch.randn(2, 32, 48, requires_grad=True)
    weight = torch.randn(16, 48)
    a, b = torch.randn(4, 48, requires_grad=True), torch.randn(16, 4, requires_grad=True)

    def kept(shared):
        call = _Call(2.0, 0.1, torch.float32, shared)
        outs = [_LoraLinear.apply(x, weight, None, a, b, call) for _ in range(3)]
        saved = [t for o in outs for t in o.grad_fn.saved_tensors if t is not None]
        return [t for t in saved if t.numel() == x.numel()]

    big = kept(SharedDrop())
    assert len({t.data_ptr() for t in big}) == 2 and {t.dtype for t in big} == {
        torch.float32,
        torch.bool,
    }
    assert all(t.data_ptr() != x.data_ptr() for t in big)  # the dropped copy, not the input
    big = kept(None)
    assert len({t.data_ptr() for t in big}) == 4  # the input itself + three masks
    assert any(t.data_ptr() == x.data_ptr() for t in big)


def test_shared_drop_forgets_an_input_once_it_is_freed():
    """The cache holds no activation past its input's life, and a modified input draws anew."""
    shared = SharedDrop()
    x = torch.randn(8, 16)
    drop, dropped = shared.get(x, 0.5, torch.float32)
    assert shared.get(x, 0.5, torch.float32)[0] is drop
    x.add_(1.0)  # modified in place: not the input the mask was drawn for
    assert shared.get(x, 0.5, torch.float32)[0] is not drop
    del x, drop, dropped
    gc.collect()
    assert shared._entry is None


def test_gradient_checkpointing_recomputes_the_same_shared_masks(one_thread):
    """Recomputing a block in backward (non-reentrant checkpointing, the generator state
    restored) draws the masks the forward drew: the gradients of the plain fused step."""
    ref_logits, ref_grads = _step(_fused(_lora(torch.float32, dropout=0.5)), autocast=False)
    model = _lora(torch.float32, dropout=0.5)
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    logits, grads = _step(_fused(model), autocast=False)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and _rel_err(grads, ref_grads) < 1e-6


def _fused(model):
    assert use_fused_lora(model) == 14
    return model


def test_hooked_or_trainable_base_is_left_out_of_the_fold(one_thread):
    """A forward hook on a base layer still fires, and a base weight that trains gets peft's
    gradient: those layers keep the base matmul outside the node."""
    ref = _lora(torch.float32, dropout=0.0)
    model = _lora(torch.float32, dropout=0.0)
    use_fused_lora(model)
    seen = []
    for m in (ref, model):
        attn = m.base_model.model.model.layers[1].self_attn
        attn.q_proj.base_layer.weight.requires_grad_(True)
    hooked = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    hooked.register_forward_hook(lambda *_: seen.append(1))
    ref_logits, ref_grads = _step(ref, autocast=False)
    logits, grads = _step(model, autocast=False)
    assert seen == [1]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert any("q_proj.base_layer" in n for n in grads) and grads.keys() == ref_grads.keys()
    assert _rel_err(grads, ref_grads) < 1e-5


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

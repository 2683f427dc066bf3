"""The chunked, labelled-only loss equals plain cross-entropy, and the fast path equals the model's own loss."""

import pytest
import torch
import torch.nn.functional as F

from tuneforge.train.loss import CausalLMLoss, label_positions, linear_cross_entropy

from conftest import build_tiny_llama


def _head_problem(n=37, hidden=16, vocab=53, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=gen, dtype=dtype, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, b, t


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_ce_equals_plain_ce_values_and_grads(chunk):
    h, w, b, t = _head_problem()
    ref = F.cross_entropy(h @ w.T + b, t, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.7, (h, w, b))
    got = linear_cross_entropy(h, w, t, b, chunk_tokens=chunk)
    grads = torch.autograd.grad(got * 0.7, (h, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_chunked_ce_without_bias_and_frozen_weight():
    h, w, _, t = _head_problem(dtype=torch.float32)
    w = w.detach()
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, h)
    got = linear_cross_entropy(h, w, t, chunk_tokens=8)
    (grad,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_chunked_ce_under_autocast_matches_bf16_head():
    """Under bf16 autocast it computes what lm_head + .float() + cross_entropy would."""
    h, w, _, t = _head_problem(n=64, hidden=32, vocab=97, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
        got = linear_cross_entropy(h, w, t, chunk_tokens=16)
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(got, (h, w))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_no_labelled_position_gives_zero_and_zero_grads():
    h, w, _, t = _head_problem(n=0)
    loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert float(loss.detach()) == 0.0 and w.grad is not None and float(w.grad.abs().sum()) == 0.0


def test_label_positions_shift():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    mask, targets = label_positions(labels)
    assert mask.tolist() == [
        [False, True, True, False, False],
        [True, False, False, True, False],
    ]
    assert targets.tolist() == [5, 6, 7, 8]


def _batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():  # make B non-zero so that A gets gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def _loss_and_grads(model, loss_fn, batch, n):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, n)
    loss.backward()
    return loss.detach(), {
        k: p.grad.clone()
        for k, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize("kind", ["lora", "full", "full-tied"])
def test_fast_path_equals_model_loss(kind):
    """The hidden-state path gives the model's own `labels=` loss and the same gradients."""
    model = build_tiny_llama(300, seed=0, tie_word_embeddings=kind == "full-tied")
    model = _lora(model) if kind == "lora" else model
    batch = _batch(300)
    n = float((batch["labels"][:, 1:] != -100).sum())
    fast = CausalLMLoss(model, chunk_tokens=4)
    assert fast.fast
    slow = CausalLMLoss(model)
    slow.fast = False
    loss_fast, grads_fast = _loss_and_grads(model, fast, batch, n)
    loss_slow, grads_slow = _loss_and_grads(model, slow, batch, n)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-6, atol=1e-6)
    assert grads_fast.keys() == grads_slow.keys() and len(grads_fast) > 0
    for name, g in grads_slow.items():
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-5, atol=1e-7)


def test_fast_path_never_computes_full_logits():
    model = _lora(build_tiny_llama(300, seed=0))
    seen = []
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda m, args, out: seen.append(out.shape[:-1].numel()))
    batch = _batch(300)
    CausalLMLoss(model)(model, batch, 10.0).backward()
    assert seen == [0]  # the head runs on no position; the loss applies it to labelled ones


def test_prompt_learning_takes_the_generic_path():
    """Virtual tokens shift positions: the loss must come from peft's own forward."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(
        build_tiny_llama(300, seed=0),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    loss_fn = CausalLMLoss(model, positions_aligned=False)
    assert not loss_fn.fast
    batch = _batch(300)
    n = float((batch["labels"][:, 1:] != -100).sum())
    expected = model(**batch).loss  # peft's mean over labelled tokens
    torch.testing.assert_close(loss_fn(model, batch, n), expected.float(), rtol=1e-5, atol=1e-6)


def test_adapted_head_takes_the_generic_path():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_llama(300, seed=0), LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    )
    assert not CausalLMLoss(model).fast


def test_chunk_size_is_validated():
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        CausalLMLoss(build_tiny_llama(300), chunk_tokens=0)

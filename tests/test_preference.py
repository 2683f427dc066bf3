"""DPO and KTO: the losses against hand-computed values, and one DPO step on a tiny model whose
reference policy is a frozen second adapter on the same base.
"""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.data.pipeline import collate
from tuneforge.train.preference import (
    PreferenceSettings,
    answer_logps,
    dpo_loss,
    kto_loss,
    preference_loss,
    tokenize_answer,
    train_preference,
)

from conftest import build_tiny_llama


def test_dpo_loss_by_hand():
    # margin = 0.5 * ((-1 - -2) - (-3 - -2)) = 1; loss = -log(sigmoid(1)) = log(1 + e^-1)
    loss, margin = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert margin.item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)
    equal, _ = dpo_loss(*(torch.zeros(3),) * 4)
    assert equal.item() == pytest.approx(math.log(2))


def test_kto_loss_by_hand():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    policy, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    desirable = torch.tensor([True, False])
    # r = [0.5, -1]; z0 = 0.2; good: 1 - sig(0.5 - 0.2); bad: 1 - sig(0.2 - -1)
    want = ((1 - sig(0.3)) + (1 - sig(1.2))) / 2
    assert kto_loss(policy, ref, desirable, torch.tensor(0.2), 1.0).item() == pytest.approx(
        want, abs=1e-7
    )
    # a negative KL estimate is clamped to 0: good 1 - sig(0.5), bad 1 - sig(1)
    want0 = ((1 - sig(0.5)) + (1 - sig(1.0))) / 2
    assert kto_loss(policy, ref, desirable, torch.tensor(-3.0), 1.0).item() == pytest.approx(
        want0, abs=1e-7
    )
    weighted = kto_loss(policy, ref, desirable, torch.tensor(0.2), 1.0, undesirable_weight=2.0)
    assert weighted.item() == pytest.approx(((1 - sig(0.3)) + 2 * (1 - sig(1.2))) / 2, abs=1e-7)


@pytest.fixture
def two_adapters(tmp_path, tiny_tokenizer, one_thread):
    """A tiny Llama with the 'served' adapter twice: trainable (default) and frozen (reference)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = build_tiny_llama(len(tiny_tokenizer))
    served = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(1)
    for name, p in served.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a served adapter that is not the identity
    served.save_pretrained(tmp_path / "served")
    base = build_tiny_llama(len(tiny_tokenizer))
    n_base = sum(p.numel() for p in base.parameters())
    model = PeftModel.from_pretrained(base, tmp_path / "served", is_trainable=True)
    model.load_adapter(tmp_path / "served", adapter_name="reference", is_trainable=False)
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) // 2
    assert sum(p.numel() for p in model.parameters()) == n_base + 2 * n_adapter  # one base
    return model


def _margin(model, tok, rows):
    with torch.no_grad():
        c = collate(
            [tokenize_answer(tok, r["prompt"], r["chosen"]) for r in rows], tok.pad_token_id
        )
        r_ = collate(
            [tokenize_answer(tok, r["prompt"], r["rejected"]) for r in rows], tok.pad_token_id
        )
        return (answer_logps(model, c) - answer_logps(model, r_)).mean().item()


ROWS = [
    {
        "prompt": [{"role": "user", "content": "Color of sky?"}],
        "chosen": "blue",
        "rejected": "green",
    },
    {
        "prompt": [{"role": "user", "content": "Color of snow?"}],
        "chosen": "white",
        "rejected": "black",
    },
]


def test_one_dpo_step_raises_the_margin_and_keeps_the_reference(two_adapters, tiny_tokenizer):
    model, tok = two_adapters, tiny_tokenizer
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".reference" in n}
    settings = PreferenceSettings(objective="dpo", beta=0.1, lr=1e-2, steps=1, batch_size=2)
    model.eval()
    first = preference_loss(model, tok, ROWS, settings)
    assert first.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at start
    before = _margin(model, tok, ROWS)
    losses = train_preference(model, tok, ROWS, settings, show_progress=False)
    after = _margin(model, tok, ROWS)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert after > before + 1e-4
    for n, p in model.named_parameters():
        if ".reference" in n:
            assert torch.equal(p, ref_before[n]) and not p.requires_grad
    assert model.active_adapter == "default"
    assert preference_loss(model, tok, ROWS, settings).item() < math.log(2)


def test_kto_steps_lower_the_loss(two_adapters, tiny_tokenizer):
    rows = [
        {"prompt": r["prompt"], "completion": a, "label": good}
        for r in ROWS
        for a, good in ((r["chosen"], True), (r["rejected"], False))
    ]
    settings = PreferenceSettings(objective="kto", beta=0.5, lr=1e-2, steps=4, batch_size=4)
    losses = train_preference(two_adapters, tiny_tokenizer, rows, settings, show_progress=False)
    assert losses[0] == pytest.approx(0.5, abs=1e-5)  # r = z0 = 0: 1 - sigmoid(0) for every row
    assert losses[-1] < losses[0]

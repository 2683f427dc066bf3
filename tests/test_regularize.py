"""Regularisers: the L1 penalty (value, gradient, and its effect through a run), NEFTune noise
(training only, bounded), and the model dropout override on architectures with and without one."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main
from tuneforge.train.regularize import add_neftune, l1_penalty, override_dropout

from conftest import build_tiny_gpt2, build_tiny_llama
from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_l1_value_and_gradient_skip_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    penalty = l1_penalty(model.named_parameters(), 0.1)(model)
    assert penalty.item() == pytest.approx(0.1 * 7.5)
    penalty.backward()
    assert torch.equal(model[0].weight.grad, 0.1 * torch.sign(model[0].weight.detach()))
    assert model[0].bias.grad is None and model[1].weight.grad is None


def _train(tmp_path, model_dir, name, data_keys=None, **train):
    data = write_toy_messages(tmp_path / "train.jsonl", n=32)
    cfg = write_run_config(
        tmp_path / f"{name}.yaml",
        model_dir,
        data,
        tmp_path / name,
        data=data_keys or {},
        train={"max_steps": 6, **train},
        log={"report": False},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    weights = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    return summary, weights


def test_l1_through_the_loop_shrinks_the_adapter(tmp_path, tiny_model_dir):
    _, plain = _train(tmp_path, tiny_model_dir, "plain")
    summary, sparse = _train(tmp_path, tiny_model_dir, "l1", l1=1e-3)
    l1_norm = lambda w: sum(t.abs().sum().item() for t in w.values())  # noqa: E731
    assert l1_norm(sparse) < 0.9 * l1_norm(plain)
    # the logged loss is the task loss alone: same first step with and without the penalty
    assert math.isfinite(summary["train_loss"])
    first = lambda name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first("l1")["loss"] == first("plain")["loss"]


def test_neftune_noise_only_in_training_and_bounded():
    model = build_tiny_llama(300)
    ids = torch.randint(0, 300, (2, 10))
    clean = model.get_input_embeddings()(ids)
    handle = add_neftune(model, alpha=5.0)
    model.train()
    noisy = model.get_input_embeddings()(ids)
    bound = 5.0 / (10 * 32) ** 0.5
    diff = (noisy - clean).abs()
    assert diff.max() <= bound and diff.max() > 0.5 * bound
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), clean)
    handle.remove()
    model.train()
    assert torch.equal(model.get_input_embeddings()(ids), clean)


def test_neftune_in_a_run_changes_training(tmp_path, tiny_model_dir):
    # NEFTune turns packing off (its noise scales with the row width), so the plain run is
    # padded too: the only difference between the two runs is the noise.
    padded = {"packing": False}
    plain, _ = _train(tmp_path, tiny_model_dir, "plain", data_keys=padded)
    noisy, _ = _train(tmp_path, tiny_model_dir, "neft", data_keys=padded, neftune_alpha=5.0)
    again, _ = _train(tmp_path, tiny_model_dir, "plain2", data_keys=padded)
    assert again["train_loss"] == plain["train_loss"]  # padded runs are deterministic
    assert noisy["train_loss"] != plain["train_loss"]
    assert abs(noisy["train_loss"] - plain["train_loss"]) < 0.5


def _gpt2(dropout: float):
    return build_tiny_gpt2(300, resid_pdrop=dropout, attn_pdrop=dropout)


def _two_train_forwards(model):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


def test_dropout_override_turns_gpt2_dropout_off_and_on():
    model = _gpt2(0.3)
    a, b = _two_train_forwards(model)
    assert not torch.equal(a, b)
    changed = override_dropout(model, 0.0)
    assert "config.resid_pdrop" in changed and model.config.attn_pdrop == 0.0
    a, b = _two_train_forwards(model)
    assert torch.equal(a, b)


def test_dropout_override_reaches_llama_attention():
    model = build_tiny_llama(300)
    a, b = _two_train_forwards(model)
    assert torch.equal(a, b)  # the checkpoint has no dropout
    changed = override_dropout(model, 0.5)
    assert "model.layers.0.self_attn.attention_dropout" in changed
    assert model.config.attention_dropout == 0.5
    a, b = _two_train_forwards(model)
    assert not torch.equal(a, b)


def test_dropout_override_without_any_dropout_says_so(caplog):
    assert override_dropout(torch.nn.Linear(2, 2), 0.1) == []
    assert "no dropout to override" in caplog.text

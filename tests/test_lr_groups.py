"""Learning-rate strategies: layer-wise decay both ways, per-pattern groups, embedding/head rates,
LoRA+, the new schedules, and a run whose optimizer groups carry exactly the configured rates."""

import json
import math

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import build_config
from tuneforge.errors import ConfigError
from tuneforge.methods.param_groups import LrRules, build_param_groups
from tuneforge.train.optim import lr_factor

from conftest import build_tiny_gpt2, build_tiny_llama
from helpers import write_run_config, write_toy_messages

LR = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def rate_of(groups) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def rates_by_name(model, rules, scale=None) -> dict[str, float]:
    by_id = rate_of(build_param_groups(model, LR, 0.1, rules, scale))
    return {n: by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "direction,expected",
    [
        # depth: embeddings 0, block i -> i + 1, final norm and head 3 (= n_layers + 1)
        ("shallow_smaller", {"embed": 0.5**3, "layers.0": 0.5**2, "layers.1": 0.5, "top": 1.0}),
        ("deep_smaller", {"embed": 1.0, "layers.0": 0.5, "layers.1": 0.5**2, "top": 0.5**3}),
    ],
)
def test_layer_decay_both_directions(direction, expected):
    model = build_tiny_llama(300)
    rates = rates_by_name(model, LrRules(layer_decay=0.5, direction=direction))
    for name, rate in rates.items():
        part = next((k for k in ("embed", "layers.0", "layers.1") if k in name), "top")
        assert rate == pytest.approx(LR * expected[part], rel=1e-12), name
    assert rates["lm_head.weight"] == rates["model.norm.weight"]


def test_gpt2_blocks_are_found_too():
    model = build_tiny_gpt2(300, n_layer=3)
    rates = rates_by_name(model, LrRules(layer_decay=0.5))
    assert rates["transformer.h.2.attn.c_attn.weight"] == pytest.approx(LR * 0.5)
    assert rates["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(LR * 0.5**3)
    assert rates["transformer.wte.weight"] == pytest.approx(LR * 0.5**4)
    assert rates["transformer.ln_f.weight"] == pytest.approx(LR)


def test_patterns_win_then_embedding_and_head_rates():
    model = build_tiny_llama(300)
    rules = LrRules(
        layer_decay=0.5,
        groups=[(r"layers\.1\.mlp", 7e-5, 0.0)],
        embedding_lr=1e-5,
        head_lr=3e-4,
    )
    groups = build_param_groups(model, LR, 0.1, rules)
    rates = rate_of(groups)
    named = dict(model.named_parameters())
    assert rates[id(named["model.layers.1.mlp.up_proj.weight"])] == 7e-5
    assert rates[id(named["model.embed_tokens.weight"])] == 1e-5
    assert rates[id(named["lm_head.weight"])] == 3e-4
    assert rates[id(named["model.layers.1.self_attn.q_proj.weight"])] == pytest.approx(LR * 0.5)
    pattern_group = next(g for g in groups if g["name"] == "lr_groups.0/decay")
    assert pattern_group["weight_decay"] == 0.0  # the group's own weight decay
    norm_group = next(
        g for g in groups if any(p is named["model.norm.weight"] for p in g["params"])
    )
    assert norm_group["weight_decay"] == 0.0 and norm_group["name"].endswith("no_decay")
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_lora_plus_raises_only_the_b_matrices():
    from tuneforge.methods import build_method

    method = build_method(build_config({"method": {"name": "lora", "lora_plus_ratio": 16}}).method)
    model = method.apply(build_tiny_llama(300))
    rates = {}
    by_id = rate_of(method.param_groups(model, LR, 0.0))
    for name, param in model.named_parameters():
        if param.requires_grad:
            rates[name] = by_id[id(param)]
    b = [r for n, r in rates.items() if "lora_B" in n]
    a = [r for n, r in rates.items() if "lora_A" in n]
    assert b and a and set(b) == {LR * 16} and set(a) == {LR}


def test_new_schedules_are_pure_and_reach_their_floor():
    kw = dict(total_steps=11, warmup_steps=1)
    cos = [lr_factor(s, schedule="cosine_with_min_lr", min_lr_ratio=0.1, **kw) for s in range(11)]
    assert (
        cos[0] == 1.0
        and cos[1] == 1.0
        and cos[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    )
    assert lr_factor(11, schedule="cosine_with_min_lr", min_lr_ratio=0.1, **kw) == pytest.approx(
        0.1
    )
    poly = [
        lr_factor(s, schedule="polynomial", power=2.0, min_lr_ratio=0.0, **kw) for s in range(12)
    ]
    assert poly[6] == pytest.approx((1 - 0.5) ** 2) and poly[11] == 0.0
    assert all(a >= b for a, b in zip(poly[1:], poly[2:], strict=False))


def test_config_names_the_key_of_a_bad_rate_rule():
    with pytest.raises(ConfigError, match="train.layer_lr_direction"):
        build_config({"train": {"layer_lr_direction": "up"}})
    with pytest.raises(ConfigError, match=r"train.lr_groups.0.pattern: not a valid regular"):
        build_config({"train": {"lr_groups": [{"pattern": "(", "lr": 1e-4}]}})
    with pytest.raises(ConfigError, match="train.layer_lr_decay"):
        build_config({"train": {"layer_lr_decay": 1.5}})


def test_a_run_records_exactly_the_configured_rates(tmp_path, tiny_model_dir, tiny_tokenizer):
    data = write_toy_messages(tmp_path / "train.jsonl", n=24)
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        method={"name": "full"},
        train={
            "max_steps": 2,
            "lr": LR,
            "scheduler": "constant",
            "layer_lr_decay": 0.5,
            "lr_groups": [{"pattern": "embed_tokens", "lr": 2e-5}],
            "head_lr": 4e-4,
        },
        log={"report": False},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    groups = {
        g["name"]: g
        for g in json.loads((tmp_path / "run" / "summary.json").read_text())["lr_groups"]
    }
    expected = {
        "lr_groups.0/decay": 2e-5,
        "head/decay": 4e-4,
        "layer0/decay": LR * 0.25,
        "layer1/decay": LR * 0.5,
        "layer0/no_decay": LR * 0.25,
        "layer1/no_decay": LR * 0.5,
        "top/no_decay": LR,  # the final norm
    }
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(expected, rel=1e-12)
    assert all(g["last_lr"] == g["lr"] for g in groups.values())  # constant schedule
    model = build_tiny_llama(len(tiny_tokenizer))
    assert sum(g["params"] for g in groups.values()) == sum(p.numel() for p in model.parameters())
    assert torch.tensor([g["tensors"] for g in groups.values()]).sum() == len(
        list(model.parameters())
    )

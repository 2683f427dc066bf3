"""Method options: every method is registered and valid with defaults alone; wrong choices fail
naming the key; hybrid warns about adapter serving at config time; freeze selects the right blocks."""

import logging

import pytest
import torch

from tuneforge.config import build_config, describe
from tuneforge.errors import ConfigError
from tuneforge.methods import build_method, method_names

from conftest import build_tiny_llama

# The methods the docs promise; a registered method beyond these needs no edit here.
DOCUMENTED = {"adalora", "freeze", "full", "hybrid", "ia3", "lora", "prefix", "prompt", "ptuning"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _method(section: dict):
    return build_method(build_config({"method": section}).method)


def test_every_method_registers_itself_and_documents_its_keys():
    assert DOCUMENTED <= set(method_names())
    keys = {path for path, _, doc in describe() if path.startswith("method.")}
    for name in method_names():
        assert f"method.name [{name}]" in keys
    for key in ["dora", "rslora", "init", "lora_plus_ratio"]:
        assert f"method.{key} [lora]" in keys and f"method.{key} [hybrid]" in keys
    for key in ["init_r", "target_r", "tinit", "tfinal", "deltaT"]:
        assert f"method.{key} [adalora]" in keys


def test_hybrid_warns_about_vllm_when_the_config_is_read(caplog):
    with caplog.at_level(logging.WARNING):
        build_config({"method": {"name": "hybrid"}})
    assert "vLLM" in caplog.text and "merge it first" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_config({"method": {"name": "lora"}})
    assert "vLLM" not in caplog.text


@pytest.mark.parametrize(
    "section,message",
    [
        ({"name": "lora", "init": "loftq"}, "method.init: 'loftq' is not one of"),
        ({"name": "prompt", "init": "text", "init_text": " "}, "method.init_text"),
        ({"name": "freeze", "trainable_modules": ["("]}, "method.trainable_modules"),
        ({"name": "adalora", "tinit": -1}, "method.tinit"),
        ({"name": "prefix", "num_virtual_tokens": 0}, "method.num_virtual_tokens"),
    ],
)
def test_bad_options_name_their_key(section, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"method": section})


@pytest.mark.parametrize(
    "section,message",
    [
        ({"name": "freeze", "layers": [5]}, "method.layers: layer 5 is out of range"),
        ({"name": "freeze", "trainable_layers": 0}, "select no parameters"),
        ({"name": "hybrid", "full_layers": [0, 1]}, "method.full_layers"),
        ({"name": "adalora", "init_r": 2, "target_r": 4}, "method.target_r"),
    ],
)
def test_choices_that_need_the_model_fail_naming_the_key(section, message):
    method = _method(section)
    method.plan(10)
    with pytest.raises(ConfigError, match=message):
        method.apply(build_tiny_llama(300))


def test_freeze_trains_chosen_blocks_and_modules_only():
    model = _method({"name": "freeze", "layers": [-1], "trainable_modules": [r"^model\.norm"]})
    trained = {
        n
        for n, p in model.apply(build_tiny_llama(300, num_hidden_layers=3)).named_parameters()
        if p.requires_grad
    }
    assert trained and all(n.startswith(("model.layers.2.", "model.norm.")) for n in trained)
    assert "model.norm.weight" in trained and "model.layers.2.mlp.down_proj.weight" in trained


def test_hybrid_puts_lora_on_the_rest_and_trains_the_last_block_fully():
    model = _method({"name": "hybrid", "r": 2}).apply(build_tiny_llama(300, num_hidden_layers=3))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    lora_blocks = {n.split("layers.")[1][0] for n in trained if "lora_" in n}
    full = [n for n in trained if "modules_to_save" in n]
    assert lora_blocks == {"0", "1"}
    assert full and all("layers.2." in n for n in full)
    assert len(full) == len(
        list(build_tiny_llama(300, num_hidden_layers=3).model.layers[2].parameters())
    )


def test_ia3_falls_back_for_an_architecture_peft_does_not_know():
    base = build_tiny_llama(300)
    base.config.model_type = "somethingnew"
    model = _method({"name": "ia3"}).apply(base)
    config = model.peft_config["default"]
    assert set(config.feedforward_modules) == {"down_proj"}
    scaled = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad}
    assert scaled == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_the_methods_example_config_loads():
    from pathlib import Path

    from tuneforge.config import load_config

    path = Path(__file__).parent.parent / "examples" / "adalora_layerwise.yaml"
    cfg = load_config(path)
    assert cfg.method.name == "adalora" and cfg.train.layer_lr_decay == 0.95
    assert cfg.train.scheduler == "cosine_with_min_lr" and cfg.train.neftune_alpha == 5.0

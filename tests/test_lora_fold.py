"""Folding a saved LoRA adapter without peft (methods/lora_fold.py): the weights equal peft's own
merge to the last bit, anything but a plain LoRA is refused with the base untouched, and
evaluating a LoRA run no longer imports peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tuneforge.cli import main
from tuneforge.evaluation.offline import fold_adapters
from tuneforge.evaluation.runner import evaluate_file
from tuneforge.loading import load_run
from tuneforge.methods.lora_fold import fold_saved_lora, plain_lora_scale
from tuneforge.models import resolve_dtype

from conftest import build_tiny_llama
from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300


def _save_adapter(path, dtype=torch.float32, **config):
    """A random LoRA (B != 0, so every weight moves) saved by peft in its own format."""
    base = build_tiny_llama(VOCAB).to(dtype)
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **config}
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **options))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _peft_merged(path, dtype):
    model = PeftModel.from_pretrained(build_tiny_llama(VOCAB).to(dtype), str(path))
    return model.merge_and_unload().state_dict()  # peft's merge, then its wrappers dropped


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rslora", [False, True])
def test_fold_equals_peft_merge_bit_for_bit(tmp_path, dtype, rslora):
    path = _save_adapter(tmp_path / "adapter", dtype, use_rslora=rslora)
    want = _peft_merged(path, dtype)
    base = build_tiny_llama(VOCAB).to(dtype)
    before = _weights(base)
    assert fold_saved_lora(base, path)
    got = base.state_dict()
    assert got.keys() == want.keys()
    moved = [k for k in got if not torch.equal(got[k], before[k])]
    assert len(moved) == 2 * 7  # every linear of both blocks, nothing else
    for key in got:
        assert got[key].dtype == dtype
        assert torch.equal(got[key], want[key]), key


def test_scale_follows_the_config():
    assert plain_lora_scale({"peft_type": "LORA", "r": 16, "lora_alpha": 32}) == 2.0
    rs = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": True}
    assert plain_lora_scale(rs) == 8.0


@pytest.mark.parametrize(
    "change",
    [
        {"use_dora": True},
        {"peft_type": "IA3"},
        {"rank_pattern": {"q_proj": 8}},
        {"alpha_pattern": {"q_proj": 4}},
        {"modules_to_save": ["lm_head"]},
        {"bias": "all"},
        {"fan_in_fan_out": True},
        {"some_future_variant": {"on": True}},  # a key this code does not know, switched on
    ],
)
def test_anything_but_a_plain_lora_is_left_to_peft(tmp_path, change):
    path = _save_adapter(tmp_path / "adapter")
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, **change}))
    base = build_tiny_llama(VOCAB)
    before = _weights(base)
    assert not fold_saved_lora(base, path)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_tensors_that_do_not_fit_the_model_are_left_to_peft(tmp_path):
    """peft says what is wrong with such an adapter (loading.load_run turns it into ModelError)."""
    from safetensors.torch import load_file, save_file

    path = _save_adapter(tmp_path / "adapter")
    file = path / "adapter_model.safetensors"
    good = load_file(str(file))
    cases = {
        "wider model": build_tiny_llama(VOCAB, hidden_size=48, intermediate_size=96),
        "missing partner": {
            k: v for k, v in good.items() if "layers.0.mlp.up_proj.lora_B" not in k
        },
        "embedding factor": {
            **good,
            "base_model.model.model.embed_tokens.lora_A.weight": good[next(iter(good))].clone(),
        },
        "not finite": {
            k: v.clone().fill_(float("nan")) if "lora_B" in k else v for k, v in good.items()
        },
    }
    for what, case in cases.items():
        if isinstance(case, dict):
            save_file(case, str(file))
            base = build_tiny_llama(VOCAB)
        else:
            save_file(good, str(file))
            base = case
        before = _weights(base)
        assert not fold_saved_lora(base, path), what
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), what


def test_evaluating_a_lora_run_folds_it_without_peft(tiny_model_dir, tmp_path):
    """The quickstart's `tuneforge eval` path: loading the run folds its adapter into the base,
    a plain transformers model comes back, and peft is never imported (0.6 s of start-up)."""
    train = write_toy_messages(tmp_path / "train.jsonl", n=16)
    config = write_run_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        train,
        tmp_path / "run",
        data={"validation": None},
        train={"max_steps": 1},
        eval={"every_steps": None},
        log={"report": False},
    )
    assert main(["train", str(config), "--quiet"]) == 0
    code = (
        "import sys, json\n"
        "from tuneforge.evaluation.offline import evaluate_reference\n"
        f"out = evaluate_reference({str(tmp_path / 'run')!r}, {str(train)!r}, ['loss'])\n"
        "print(json.dumps({'peft': 'peft' in sys.modules, 'loss': out['loss']}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # this module's thread count, same sums
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["peft"] is False
    loaded = load_run(tmp_path / "run", resolve_dtype("auto"))  # through peft, then its merge
    assert fold_adapters(loaded.model)
    want = evaluate_file(loaded.model, loaded.tokenizer, str(train), ["loss"])["loss"]
    assert result["loss"] == want  # the same weights, so the same sums

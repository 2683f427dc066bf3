"""QLoRA (model.quantize: nf4): LoRA trained on a bitsandbytes 4-bit base on this CPU; the saved
adapter is plain PEFT and loads on the unquantised base.

Stated quality gap: the adapter's validation loss on the fp32 base is within 1 % of its loss on the
nf4 base it was trained on (measured: 5.5346 vs 5.5346, from 5.7298 for the base alone), and both are below the base's own.
"""

from functools import partial

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.data.pipeline import collate
from tuneforge.loading import load_run
from tuneforge.models import load_model
from tuneforge.recipes.parts import load_run_tokenizer, prepare_run_data
from tuneforge.recipes.train import run_training
from tuneforge.train.loop import evaluate_loss

from helpers import CpuAccelerator, write_run_config, write_toy_messages

GAP = 0.01  # relative: adapter on the fp32 base vs. on the nf4 base it was trained on


def _eval_loss(model, cfg) -> float:
    tokenizer = load_run_tokenizer(cfg)
    data = prepare_run_data(cfg, tokenizer)
    fn = partial(collate, pad_id=tokenizer.pad_token_id)
    return evaluate_loss(model.eval(), data.validation, fn, CpuAccelerator(), 8)["eval_loss"]


def test_qlora_trains_on_cpu_and_its_adapter_loads_on_the_unquantised_base(
    tmp_path, tiny_model_dir, one_thread
):
    data = write_toy_messages(tmp_path / "train.jsonl", n=48)
    path = write_run_config(
        tmp_path / "q.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        model={"name": str(tiny_model_dir), "dtype": "fp32", "quantize": "nf4"},
        train={"max_steps": 24, "batch_size": 8, "lr": 5e-2, "scheduler": "constant"},
        eval={"every_steps": None},
    )
    cfg = load_config(path)
    summary = run_training(cfg, show_progress=False).summary
    quantized_loss = summary["eval"]["eval_loss"]  # the adapter on the nf4 base, as trained
    import json

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["quantize"] == "nf4"
    loaded = load_run(tmp_path / "run", torch.float32)  # plain PEFT adapter, fp32 base
    assert not any("4bit" in type(m).__name__ for m in loaded.model.modules())
    plain_loss = _eval_loss(loaded.model, cfg)
    base_loss = _eval_loss(load_model(tiny_model_dir, torch.float32), cfg)
    nf4 = load_model(tiny_model_dir, torch.float32, quantize="nf4")
    assert sum("Linear4bit" in type(m).__name__ for m in nf4.modules()) == 14  # 7 per block
    assert _eval_loss(nf4, cfg) != base_loss  # the 4-bit base really is another model
    assert plain_loss < base_loss - 0.1  # it learned, and the learning carries over
    assert quantized_loss < base_loss - 0.1
    assert abs(plain_loss - quantized_loss) / quantized_loss < GAP, (plain_loss, quantized_loss)


def test_qlora_refuses_full_finetuning(tmp_path, tiny_model_dir):
    from tuneforge.errors import ConfigError

    data = write_toy_messages(tmp_path / "train.jsonl", n=8)
    path = write_run_config(
        tmp_path / "q.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        model={"name": str(tiny_model_dir), "dtype": "fp32", "quantize": "nf4"},
        method={"name": "full"},
    )
    with pytest.raises(ConfigError, match="model.quantize: nf4 trains an adapter"):
        run_training(load_config(path), show_progress=False)


def test_untileable_layers_keep_the_generic_cpu_4bit_path(tmp_path, tiny_model_dir, tiny_tokenizer):
    """bitsandbytes' AVX512-BF16 kernel crashes repacking shapes it cannot tile (the tiny model's
    32 in-features, under one 64-value block); those layers are kept off it, tileable ones not.
    The kernel's flag is forced on first, so this holds on a CPU without AVX512-BF16 too."""
    from tuneforge.models import _untileable_off_the_cpu_4bit_kernel

    from conftest import build_tiny_llama

    wide = tmp_path / "wide"
    build_tiny_llama(len(tiny_tokenizer), hidden_size=64, intermediate_size=128).save_pretrained(
        wide
    )
    # hidden 32: all but down_proj (64 in, 32 out) per block; hidden 64: none
    for model_dir, untileable in ((tiny_model_dir, 12), (wide, 0)):
        model = load_model(model_dir, torch.float32, quantize="nf4")
        layers = [m for m in model.modules() if "Linear4bit" in type(m).__name__]
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
        assert _untileable_off_the_cpu_4bit_kernel(model) == untileable
        assert sum(not m.support_avx512bf16_for_cpu for m in layers) == untileable

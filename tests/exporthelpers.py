"""Tiny exportable models and hand-built run directories for the export tests.

A run directory here is what `tuneforge train` leaves (config, manifest, adapter or model,
tokenizer) built directly, without training: a random non-zero adapter is enough to export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from conftest import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2
from helpers import write_toy_messages

BUILDERS = {"llama": build_tiny_llama, "qwen2": build_tiny_qwen2, "gpt2": build_tiny_gpt2}


def tiny_base(path: Path, tokenizer, arch: str = "llama", **overrides) -> Path:
    """A saved tiny model of `arch` with the tiny tokenizer (GPT-2 with 1024 positions: the
    transformers GGUF reader sizes GPT-2's position table from its default, not the file)."""
    extra = {"n_positions": 1024, **overrides} if arch == "gpt2" else overrides
    model = BUILDERS[arch](len(tokenizer), **extra).eval()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_adapter(base_dir: Path, out: Path, method: str = "lora", seed: int = 0) -> Path:
    """A peft adapter on `base_dir` with random (non-zero) weights everywhere, saved to `out`."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if method == "ia3":
        config = IA3Config(task_type="CAUSAL_LM")
    else:
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def make_run(root: Path, tokenizer, *, arch: str = "llama", method: str = "lora") -> Path:
    """A finished-looking run dir under `root` (base model, toy data, adapter, tokenizer)."""
    base = tiny_base(root / "base", tokenizer, arch)
    data = write_toy_messages(root / "train.jsonl", n=48)
    run = root / "run"
    run.mkdir()
    config = {
        "model": {"name": str(base), "dtype": "fp32"},
        "method": {"name": method, **({"r": 4, "alpha": 8} if method == "lora" else {})},
        "data": {"train": str(data), "validation": 0.25, "max_length": 64},
        "output": {"dir": str(run)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = {"base_model": {"name": str(base), "dir": str(base)}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    random_adapter(base, run / "adapter", method)
    tokenizer.save_pretrained(run / "tokenizer")
    return run

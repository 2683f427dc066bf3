"""Fold a run's adapter into its base model and save a plain Hugging Face directory.

Loading the run, choosing what to export and writing atomically are the recipe's job; the result
loads with `AutoModelForCausalLM.from_pretrained` alone (safetensors, config, tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import ExportError
from tuneforge.models import load_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_files(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config, after checking that its weights file opens and is complete."""
    from safetensors import safe_open

    config_file, weights = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{config_file}: unreadable adapter config ({err})") from None
    if not weights.is_file():
        raise ExportError(
            f"{weights}: missing; pickled adapters (.bin) are refused, re-save it as safetensors"
        )
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():  # reading each tensor finds a truncated file
                fh.get_slice(key)[:]
    except Exception as err:  # safetensors raises its own error types and OSError
        raise ExportError(
            f"{weights}: corrupt or truncated ({err}); re-run training or restore the file"
        ) from None
    return config


def merge_adapter(
    base_dir: Path, adapter_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False
) -> torch.nn.Module:
    """base + adapter with the adapter folded into the weights (peft `merge_and_unload`)."""
    from peft import PeftModel

    check_adapter_files(adapter_dir)
    base = load_model(base_dir, dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    if model.active_peft_config.is_prompt_learning:
        kind = model.active_peft_config.peft_type.value
        raise ExportError(
            f"{adapter_dir}: a {kind} adapter adds virtual tokens, it has no weights to fold in; "
            "serve the run directory as it is, or retrain with method lora / ia3"
        )
    try:
        merged = model.merge_and_unload(safe_merge=True)  # safe_merge refuses NaN results
    except ValueError as err:
        raise ExportError(f"{adapter_dir}: merging failed: {err}") from None
    return merged.eval()


def save_hf_dir(model: torch.nn.Module, tokenizer: Any, out_dir: Path, stop_ids: list[int]) -> None:
    """Weights (safetensors), config, tokenizer with its chat template, generation config.

    `stop_ids` (eos and the template's end-of-turn token) become the generation config's
    eos_token_id, so plain `generate()` stops where the run's template ends a turn.
    """
    gen = model.generation_config
    gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def weights_bytes(path: Path) -> int:
    """Size on disk of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

"""Load what a run produced (base + adapter, or the full model) for evaluation and generation.

A reference is a run directory, a local HF model directory, a .gguf file or a built-in name;
the tokenizer saved with a run (and so its chat template) is the one used for prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.errors import ModelError, RunDirError
from tuneforge.models import (
    check_safetensors,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
)
from tuneforge.train.rundir import read_run


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "base", "adapter" or "model"
    base_dir: Path


def is_run_dir(ref: str | Path) -> bool:
    path = Path(ref)
    return (path / "manifest.json").is_file() and (path / "config.yaml").is_file()


def load_reference(ref: str | Path, dtype: str = "auto", device: str = "cpu") -> Loaded:
    """Load a run directory or a base model reference, in eval mode."""
    torch_dtype = resolve_dtype(dtype, device)
    if not is_run_dir(ref):
        base_dir = resolve_model_dir(str(ref))
        model = load_model(base_dir, torch_dtype).to(device).eval()
        return Loaded(model, load_tokenizer(base_dir), "base", base_dir)
    return load_run(ref, torch_dtype, device)


def load_run(run_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> Loaded:
    run_dir = Path(run_dir)
    config, manifest = read_run(run_dir)
    model_section = config.get("model")
    trust = isinstance(model_section, dict) and model_section.get("trust_remote_code") is True
    tokenizer = load_tokenizer(run_dir / "tokenizer", trust)
    if (run_dir / "model" / "config.json").is_file():
        model = load_model(run_dir / "model", dtype, trust_remote_code=trust)
        return Loaded(model.to(device).eval(), tokenizer, "model", _base_dir(run_dir, manifest))
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunDirError(
            f"{run_dir}: neither adapter/ nor model/ found; did the run finish? "
            "(continue it with tuneforge train CONFIG --resume auto)"
        )
    if not (adapter / "adapter_model.safetensors").is_file():  # R8: no pickle
        raise RunDirError(
            f"{adapter}: no adapter_model.safetensors; pickled adapters (.bin) are refused"
        )
    check_safetensors(adapter / "adapter_model.safetensors")
    from peft import PeftModel

    base_dir = _base_dir(run_dir, manifest)
    base = load_model(base_dir, dtype, trust_remote_code=trust)
    try:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        first = next((line for line in lines if "mismatch" in line), lines[0])
        raise ModelError(
            f"{adapter}: does not fit the base model {base_dir} ({first}); was it trained on "
            "another model? Point manifest.json's base_model at the model it was trained on"
        ) from err
    if model.active_peft_config.is_prompt_learning:
        # prefix / prompt / P-tuning: peft's generate() misplaces the virtual tokens (#2131)
        from tuneforge.methods._prompt_runtime import PromptLearningLM

        model = PromptLearningLM(model)
    return Loaded(model.to(device).eval(), tokenizer, "adapter", base_dir)


def _base_dir(run_dir: Path, manifest: dict) -> Path:
    """The base model a run was trained on, from its manifest (resolved again if the cache moved)."""
    base = manifest.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("dir"), str):
        raise RunDirError(f"{run_dir}/manifest.json: no base_model.dir; the manifest is damaged")
    base_dir = Path(base["dir"])
    if not (base_dir / "config.json").is_file():  # cache moved: resolve the name again
        base_dir = resolve_model_dir(str(base.get("name", base_dir)))
    return base_dir


@torch.no_grad()
def generate(
    loaded: Loaded, prompt: str, *, max_new_tokens: int = 128, system: str | None = None
) -> str:
    """Greedy generation with the run's chat template, stopping at EOS."""
    from tuneforge.data.templates import render_prompt

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = torch.tensor([render_prompt(loaded.tokenizer, messages)])
    tok = loaded.tokenizer
    out = loaded.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

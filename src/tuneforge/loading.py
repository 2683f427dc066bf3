"""Load what a run produced (base + adapter, or the full model) for evaluation and generation.

A reference is a run directory, a local HF model directory, a .gguf file or a built-in name;
the tokenizer saved with a run (and so its chat template) is the one used for prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config import options_model
from tuneforge.errors import RunDirError
from tuneforge.methods import Method, build_method
from tuneforge.models import load_model, load_tokenizer, resolve_dtype, resolve_model_dir
from tuneforge.train.rundir import read_run


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "base", "adapter" or "model"
    base_dir: Path
    positions_aligned: bool = True  # False for methods that add virtual tokens (prefix, prompt)


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
    trust = bool(config.get("model", {}).get("trust_remote_code", False))
    tokenizer = load_tokenizer(run_dir / "tokenizer", trust)
    base_dir = Path(manifest["base_model"]["dir"])
    if not (base_dir / "config.json").is_file():  # cache moved: resolve the name again
        base_dir = resolve_model_dir(manifest["base_model"]["name"])
    if (run_dir / "model" / "config.json").is_file():
        model = load_model(run_dir / "model", dtype, trust_remote_code=trust)
        return Loaded(model.to(device).eval(), tokenizer, "model", base_dir)
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{run_dir}: neither adapter/ nor model/ found; did the run finish?"
        )
    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():  # R8: no pickle
        raise FileNotFoundError(
            f"{run_dir}/adapter: no adapter_model.safetensors; pickled adapters (.bin) are refused"
        )
    base = load_model(base_dir, dtype, trust_remote_code=trust)
    method = run_method(config)
    model = method.load(base, str(run_dir / "adapter"))  # the method knows its inference view
    aligned = not method.adds_virtual_tokens
    return Loaded(model.to(device).eval(), tokenizer, "adapter", base_dir, aligned)


def run_method(config: dict) -> Method:
    """The method a run was trained with, rebuilt from its resolved config.yaml."""
    method = config.get("method") or {}
    try:
        return build_method(options_model(method["name"]).model_validate(method))
    except (KeyError, TypeError, ValueError) as err:
        raise RunDirError(f"config.yaml: the method section cannot be read back ({err})") from None


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
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:  # the end-of-sequence token ends the answer and is not shown
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)

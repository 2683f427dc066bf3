"""Load what a run produced (base + adapter, or the full model) for evaluation and generation.

A reference is a run directory, a local HF model directory, a .gguf file or a built-in name;
the tokenizer saved with a run (and so its chat template) is the one used for prompts. Generation
stops at the template's end of turn, a special token or a text marker (`stopping_criteria`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tuneforge.config import options_model
from tuneforge.data.templates import apply_template, cut_at_text, end_of_turn, render_prompt
from tuneforge.errors import ModelError, RunDirError
from tuneforge.methods import Method, build_method
from tuneforge.modelfiles import check_safetensors
from tuneforge.models import (
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
    positions_aligned: bool = True  # False for methods that add virtual tokens (prefix, prompt)


def is_run_dir(ref: str | Path) -> bool:
    path = Path(ref)
    return (path / "manifest.json").is_file() and (path / "config.yaml").is_file()


def load_reference(
    ref: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    *,
    template: str | None = None,
    fold: bool = False,
) -> Loaded:
    """Load a run directory or a base model reference, in eval mode.

    `template` (a built-in name, a jinja template, or a run's own template text) sets the chat
    template of a base model's tokenizer; a run always keeps the template it was trained with.
    `fold`: see `load_run`.
    """
    torch_dtype = resolve_dtype(dtype, device)
    if not is_run_dir(ref):
        base_dir = resolve_model_dir(str(ref))
        tokenizer = load_tokenizer(base_dir)
        if template is not None:
            apply_template(tokenizer, template)
        model = load_model(base_dir, torch_dtype).to(device).eval()
        return Loaded(model, tokenizer, "base", base_dir)
    return load_run(ref, torch_dtype, device, fold=fold)


def run_chat_template(ref: str | Path) -> str | None:
    """The chat template a run was trained with (None for anything that is not a run dir)."""
    if not is_run_dir(ref):
        return None
    config, _ = read_run(Path(ref))
    trust = bool(config.get("model", {}).get("trust_remote_code", False))
    return getattr(load_tokenizer(Path(ref) / "tokenizer", trust), "chat_template", None)


def adapter_base_dir(ref: str | Path) -> Path | None:
    """The base directory an adapter run puts its adapter on, when that base loads exactly as a
    plain base reference does (no remote code); None for anything else."""
    if not is_run_dir(ref) or not (Path(ref) / "adapter" / "adapter_config.json").is_file():
        return None
    if (Path(ref) / "model" / "config.json").is_file():
        return None
    config, manifest = read_run(Path(ref))
    if _trusts_remote_code(config):
        return None
    return _base_dir(Path(ref), manifest)


def _trusts_remote_code(config: dict) -> bool:
    model_section = config.get("model")
    return isinstance(model_section, dict) and model_section.get("trust_remote_code") is True


def load_run(
    run_dir: str | Path,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    base: torch.nn.Module | None = None,
    fold: bool = False,
) -> Loaded:
    """Load a run directory: its full model, or its adapter on its base model.

    `base`: the adapter run's base model, already loaded (in `dtype`, on `device`, from
    `adapter_base_dir(run_dir)`) and not loaded again; the adapter goes onto it in place.
    `fold`: for a model that is only evaluated, merge an adapter the method can fold without
    peft straight into the base weights (a plain LoRA); other adapters load as usual.
    """
    run_dir = Path(run_dir)
    config, manifest = read_run(run_dir)
    trust = _trusts_remote_code(config)
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
    base_dir = _base_dir(run_dir, manifest)
    if base is None:
        base = load_model(base_dir, dtype, trust_remote_code=trust)
    method = run_method(config)
    if fold and method.fold_saved(base, str(adapter)):
        return Loaded(base.to(device).eval(), tokenizer, "adapter", base_dir)
    try:
        model = method.load(base, str(adapter))  # the method knows its inference view
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        first = next((line for line in lines if "mismatch" in line), lines[0])
        raise ModelError(
            f"{adapter}: does not fit the base model {base_dir} ({first}); was it trained on "
            "another model? Point manifest.json's base_model at the model it was trained on"
        ) from err
    aligned = not method.adds_virtual_tokens
    return Loaded(model.to(device).eval(), tokenizer, "adapter", base_dir, aligned)


def run_method(config: dict) -> Method:
    """The method a run was trained with, rebuilt from its resolved config.yaml."""
    method = config.get("method") or {}
    try:
        return build_method(options_model(method["name"]).model_validate(method))
    except (KeyError, TypeError, ValueError) as err:
        raise RunDirError(f"config.yaml: the method section cannot be read back ({err})") from None


class StopAtText(StoppingCriteria):
    """A generation stopping criterion: a row is done once its generated text holds a marker.

    For end-of-turn markers that are not one token of the vocabulary (ChatML on a base model);
    only the newest tokens after the prompt are decoded, so a marker in the prompt never counts.
    """

    def __init__(self, tokenizer, texts: tuple[str, ...] | list[str], prompt_width: int) -> None:
        self.tokenizer, self.texts, self.prompt_width = tokenizer, tuple(texts), prompt_width
        # Every token decodes to at least one byte: a marker of n bytes spans at most n + 1 tokens.
        self.window = max(len(t.encode()) for t in self.texts) + 1

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=False)
        done = [any(t in tail for t in self.texts) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def stopping_criteria(tokenizer, prompt_width: int, texts=None):
    """transformers' StoppingCriteriaList for the template's text markers, or None when there
    are none (special end-of-turn tokens go to `eos_token_id` instead)."""
    texts = end_of_turn(tokenizer).texts if texts is None else tuple(texts)
    if not texts:
        return None
    return StoppingCriteriaList([StopAtText(tokenizer, texts, prompt_width)])


def answer_text(tokenizer, ids: list[int], stop_ids, texts) -> str:
    """The decoded answer before the first end-of-turn (token or text), never showing it."""
    for k, token in enumerate(ids):
        if token in stop_ids:
            ids = ids[:k]
            break
    return cut_at_text(tokenizer.decode(ids, skip_special_tokens=True), texts)


def run_base_dir(run_dir: str | Path) -> Path:
    """The base model directory an adapter run was trained on (read from its manifest)."""
    return _base_dir(Path(run_dir), read_run(Path(run_dir))[1])


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
    """Greedy generation with the run's chat template, stopping at the template's end of turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    tok = loaded.tokenizer
    ids = torch.tensor([render_prompt(tok, messages)])
    eot = end_of_turn(tok)
    out = loaded.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(eot.token_ids),
        pad_token_id=tok.pad_token_id,
        stopping_criteria=stopping_criteria(tok, ids.shape[1], eot.texts),
    )
    return answer_text(tok, out[0, ids.shape[1] :].tolist(), eot.token_ids, eot.texts)

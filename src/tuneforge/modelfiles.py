"""Refuse what is not a complete, readable model before a loader fails deep inside it.

Checks model directories (config, architecture, safetensors headers, tokenizer files) and GGUF
headers, and wraps what a loader still raises into one ModelError naming the file; loading
itself is models.py's.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from tuneforge.errors import ModelError

#: Any one of these makes a directory's tokenizer loadable without a download or a conversion.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_LOADER_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError, struct.error)


@contextmanager
def loader_errors(where: str | Path, what: str) -> Iterator[None]:
    """A third-party loader's failure on a user's files, as one ModelError naming them."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelError:
        raise
    except (*_LOADER_ERRORS, SafetensorError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{where}: cannot load the {what}: {first}") from err


def read_model_config(model_dir: Path) -> dict:
    """config.json of a model directory as a mapping, or a ModelError saying what is wrong."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err}); save the model again") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_model_dir(model_dir: Path) -> None:
    """Refuse a base model directory that lacks a readable config of a known architecture,
    complete weights or a tokenizer (a directory with its own model code, `auto_map`, is
    checked at load time, where trust_remote_code is known)."""
    _check_architecture(model_dir, read_model_config(model_dir), defer_auto_map=True)
    _check_weights(model_dir)
    check_tokenizer_files(model_dir)


def check_model_files(model_dir: Path, trust_remote_code: bool = False) -> None:
    """Refuse a directory without a known causal-LM architecture or complete safetensors weights."""
    config = read_model_config(model_dir)
    _check_architecture(model_dir, config, defer_auto_map=trust_remote_code)
    _check_weights(model_dir)


def _check_weights(model_dir: Path) -> None:
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:  # R8: never unpickle .bin / .pt weights
        raise ModelError(
            f"model.name: {model_dir} has no .safetensors weights; tuneforge never loads pickled "
            "weights (.bin, .pt, .pth). Convert them with a tool you trust, e.g. "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    for path in weights:
        check_safetensors(path)


def _check_architecture(model_dir: Path, config: dict, defer_auto_map: bool) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if defer_auto_map and "auto_map" in config:
        return  # the directory ships its own code, and the user said to run it
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{model_dir}/config.json: no 'model_type'; not a transformers model")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"{model_dir}/config.json: unknown architecture model_type {model_type!r}: "
            "this transformers version has no causal language model of that type; use a "
            "supported model (e.g. llama, qwen2, gpt2) or upgrade transformers"
        )


def check_tokenizer_files(model_dir: Path) -> None:
    """Refuse a directory with no tokenizer file transformers can load without converting."""
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a directory; expected a tokenizer directory")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{model_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer beside the weights with tokenizer.save_pretrained(DIR)"
        )


def check_safetensors(path: Path) -> None:
    """Refuse a .safetensors file whose header is not JSON or that is shorter than it claims."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = fh.read(length) if 0 <= length <= size - 8 else b""
    if length < 0 or length > size - 8:
        _bad_safetensors(path, f"truncated: {size} bytes, shorter than its header says")
    try:
        header = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        end = max((int(e) for e in ends), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        _bad_safetensors(path, "bad header: not the JSON a safetensors file starts with")
    if 8 + length + end > size:
        _bad_safetensors(path, f"truncated: {size} bytes, its header describes {8 + length + end}")


def _bad_safetensors(path: Path, detail: str) -> NoReturn:
    raise ModelError(f"{path}: damaged safetensors file ({detail}); copy or save it again")


def check_gguf(path: Path) -> None:
    """Refuse a file that is not a GGUF, or a GGUF whose header or tensors are cut short."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] != b"GGUF":
        raise ModelError(
            f"model.name: {path} is not a GGUF file (it does not start with the GGUF magic "
            "bytes); give a .gguf file, a local HF directory or a built-in model name"
        )
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"{path}: reading GGUF needs the gguf package: pip install gguf") from None
    try:
        GGUFReader(str(path))
    except (*_LOADER_ERRORS, EOFError) as err:
        raise ModelError(
            f"{path}: truncated or damaged GGUF file ({type(err).__name__}: {err}); "
            "copy or export it again"
        ) from None

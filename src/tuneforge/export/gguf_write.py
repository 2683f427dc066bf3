"""Write a Hugging Face model directory as one GGUF file (f32, f16 or bf16) with the `gguf` writer.

Hyper-parameters and tensor layouts per architecture are in gguf_arch.py, the tokenizer keys in
gguf_vocab.py; quantising below 16 bits is llama.cpp's own job (quantize.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tuneforge.errors import ExportError
from tuneforge.export.gguf_arch import Arch, architecture
from tuneforge.export.gguf_vocab import add_vocab, read_vocab

#: Output types written directly (quantised types come from llama.cpp).
FLOAT_TYPES = ("f32", "f16", "bf16")
_FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType values


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable model config ({err})") from None


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor in the directory's safetensors files."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no .safetensors weights to export")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name).float().numpy()


def _encode(array: np.ndarray, out_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw ggml type or None): matrices in `out_type`, vectors (norms, biases) in f32."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or out_type == "f32":
        return array, None
    if out_type == "f16":
        return array.astype(np.float16), None
    bf16 = gguf.GGMLQuantizationType.BF16
    return gguf.quants.quantize(array, bf16), bf16


def _gguf_name(arch: Arch, tmap: Any, name: str) -> str | None:
    """The GGUF tensor name, None for buffers llama.cpp does not want, ExportError if unknown."""
    if name.endswith((".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")):
        return None  # GPT-2's causal mask and rotary caches are recomputed by llama.cpp
    if name == "lm_head.weight" and arch.tied_output:
        return None
    mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExportError(
            f"weights: tensor {name!r} of {arch.hf_name} has no GGUF name; this model variant "
            "cannot be exported as GGUF"
        )
    return mapped


def add_tensors(writer: Any, arch: Arch, model_dir: Path, out_type: str) -> None:
    tmap = arch.tensor_map()
    wrote_output, embedding = False, None
    for name, array in tqdm(list(iter_tensors(model_dir)), desc="GGUF tensors", unit="tensor"):
        target = _gguf_name(arch, tmap, name)
        if target is None:
            continue
        data, raw = _encode(arch.transform(name, array, arch.config), out_type)
        writer.add_tensor(target, data, raw_dtype=raw)
        wrote_output |= target == "output.weight"
        embedding = array if target == "token_embd.weight" else embedding
    if not arch.tied_output and not wrote_output:  # GPT-2 ties its head to the embedding
        if embedding is None:
            raise ExportError(f"{model_dir}: no token embedding found")
        data, raw = _encode(embedding, out_type)
        writer.add_tensor("output.weight", data, raw_dtype=raw)


def write_gguf(
    model_dir: Path,
    tokenizer: Any,
    tokenizer_dir: Path,
    out_path: Path,
    out_type: str = "f16",
    name: str = "tuneforge export",
) -> Path:
    """Write `model_dir` (a plain HF directory) to `out_path` as GGUF in `out_type`."""
    import gguf

    if out_type not in FLOAT_TYPES:
        raise ExportError(f"GGUF float type {out_type!r} is not one of {', '.join(FLOAT_TYPES)}")
    cfg = read_config(model_dir)
    arch = architecture(cfg)
    vocab = read_vocab(tokenizer, tokenizer_dir, int(cfg["vocab_size"]))
    writer = gguf.GGUFWriter(str(out_path), arch.gguf_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(_FILE_TYPE[out_type])
        arch.add_params(writer, cfg)
        add_vocab(writer, vocab)
        add_tensors(writer, arch, model_dir, out_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
    return out_path

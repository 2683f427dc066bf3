"""Write a plain LoRA adapter as a GGUF adapter for llama.cpp (`--lora FILE` over the base GGUF).

Each module's scale (alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into its B matrix, so
llama.cpp applies the update at --lora-scale 1 exactly as peft does. Merged exports are merge.py's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.errors import ExportError
from tuneforge.export.gguf_arch import Arch, architecture
from tuneforge.export.gguf_write import read_config
from tuneforge.export.merge import ADAPTER_WEIGHTS, check_adapter_files

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _refuse_unsupported(config: dict[str, Any], adapter_dir: Path) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')}")
    if config.get("use_dora"):
        problems.append("DoRA magnitudes")
    if config.get("modules_to_save"):
        problems.append("fully trained modules (modules_to_save: method hybrid)")
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias: {config['bias']})")
    if problems:
        raise ExportError(
            f"{adapter_dir}: a GGUF adapter holds plain LoRA only, this one has "
            f"{', '.join(problems)}; export the merged model instead (--format gguf does both)"
        )


def module_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, scale) peft uses for `module`, honouring rank_pattern / alpha_pattern."""

    def pattern_value(patterns: dict[str, Any], default: float) -> float:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):  # peft's own pattern rule
                return value
        return default

    r = int(pattern_value(config.get("rank_pattern"), config["r"]))
    alpha = float(pattern_value(config.get("alpha_pattern"), config["lora_alpha"]))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _pairs(adapter_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors import safe_open

    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as fh:
        for key in fh.keys():
            found = _KEY.match(key)
            if found is None:
                raise ExportError(f"{adapter_dir}: tensor {key!r} is not a LoRA A/B matrix")
            pair = pairs.setdefault(found["module"], {})
            pair[found["ab"]] = fh.get_tensor(key).float().numpy()
    return pairs


def _lora_tensors(arch: Arch, config: dict[str, Any], adapter_dir: Path):
    """(gguf base name, lora_a, lora_b with the scale folded in) per adapted module."""
    tmap = arch.tensor_map()
    for module, pair in sorted(_pairs(adapter_dir).items()):
        target = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or set(pair) != {"A", "B"}:
            raise ExportError(f"{adapter_dir}: LoRA on {module!r} has no llama.cpp equivalent")
        _, scale = module_scale(config, module)
        b = arch.row_order(module + ".weight", pair["B"] * np.float32(scale), arch.config)
        yield target, np.ascontiguousarray(pair["A"]), np.ascontiguousarray(b)


def write_lora_gguf(adapter_dir: Path, base_dir: Path, out_path: Path) -> Path:
    """The adapter in `adapter_dir` (for the base in `base_dir`) as a GGUF LoRA adapter."""
    import gguf

    config = check_adapter_files(adapter_dir)
    _refuse_unsupported(config, adapter_dir)
    arch = architecture(read_config(base_dir))
    tensors = list(_lora_tensors(arch, config, adapter_dir))
    ranks = {a.shape[0] for _, a, _ in tensors}
    writer = gguf.GGUFWriter(str(out_path), arch.gguf_name)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / rank, or by 1 when alpha is 0; the scale sits in B already.
        writer.add_float32(
            gguf.Keys.Adapter.LORA_ALPHA, float(ranks.pop()) if len(ranks) == 1 else 0.0
        )
        writer.add_string("tuneforge.adapter_config", json.dumps(config, sort_keys=True))
        for name, a, b in tensors:
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out_path

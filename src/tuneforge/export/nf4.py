"""Save a merged model as a 4-bit NF4 bitsandbytes transformers model that `from_pretrained` reloads.

The input is a plain HF directory (merge.py's output); evaluating the result is recheck.py's job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneforge.errors import ExportError


def bitsandbytes_ready() -> None:
    """Raise ExportError naming the cause when bitsandbytes cannot quantise on this machine."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ExportError("--format nf4 needs bitsandbytes: pip install bitsandbytes") from None
    except Exception as err:  # a broken native library raises at import
        raise ExportError(f"--format nf4: bitsandbytes cannot load here ({err})") from None


def nf4_config(compute_dtype: torch.dtype):
    """NF4 weights with double-quantised scales; matmuls run in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def write_nf4(merged_dir: Path, tokenizer: Any, out_dir: Path, compute_dtype: torch.dtype) -> Path:
    """Quantise `merged_dir` to NF4 and save it (safetensors + quantization_config) in `out_dir`."""
    from transformers import AutoModelForCausalLM

    bitsandbytes_ready()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(merged_dir),
            quantization_config=nf4_config(compute_dtype),
            device_map=device,
            dtype=compute_dtype,
            use_safetensors=True,
        )
    except (RuntimeError, ValueError, ImportError) as err:
        raise ExportError(
            f"--format nf4: bitsandbytes could not quantise on {device}: {err}"
        ) from None
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir

"""`method.init_from: RUN_DIR`: load a saved adapter's weights into a freshly wrapped model.

Names and shapes are checked one by one, so a different rank, target set or method fails with a
message that names the tensor; the base model is checked by the fingerprint the run recorded.
Which run to start from is the recipe's choice; this registers no method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.errors import ConfigError

if TYPE_CHECKING:  # the methods package imports torch only inside hooks (config stays light)
    import torch

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_file(run_dir: str | Path) -> Path:
    """RUN_DIR/adapter/adapter_model.safetensors, or ConfigError saying what is missing."""
    path = Path(run_dir) / "adapter" / ADAPTER_FILE
    if not Path(run_dir).is_dir():
        raise ConfigError(f"method.init_from: {run_dir} is not a directory")
    if not path.is_file():
        raise ConfigError(
            f"method.init_from: {run_dir} has no adapter/{ADAPTER_FILE} (a finished run of an "
            "adapter method is needed; pickled .bin adapters are refused)"
        )
    return path


def recorded_base_fingerprint(run_dir: str | Path) -> str | None:
    """The base-model fingerprint RUN_DIR/manifest.json recorded, if any."""
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (manifest.get("base_model") or {}).get("fingerprint")


def load_adapter_weights(model: torch.nn.Module, run_dir: str | Path) -> int:
    """Copy RUN_DIR's saved adapter into `model` (a peft model); returns the tensors loaded."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = adapter_file(run_dir)
    saved = load_file(str(path))
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"method.init_from: {path} does not fit this method ({len(missing)} tensors missing, "
            f"e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}); use the same "
            "method.name and target_modules as that run"
        )
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            raise ConfigError(
                f"method.init_from: {name} has shape {tuple(saved[name].shape)} in {path}, "
                f"{tuple(tensor.shape)} here; use the same method.r (and options) as that run"
            )
    result = set_peft_model_state_dict(model, saved)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ConfigError(f"method.init_from: {path}: tensors not loaded: {unexpected[:3]}")
    return len(saved)

"""What a run records about itself: manifest.json, and the identity a resume must match.

Both read the whole config, so they belong to the recipes; the checks themselves are in
train/resume.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneforge.config import RunConfig
from tuneforge.data.pipeline import PreparedData
from tuneforge.models import weights_fingerprint
from tuneforge.recipes.parts import TrainingModel
from tuneforge.train.resume import tokens_digest
from tuneforge.train.rundir import file_sha256


def run_manifest(
    cfg: RunConfig, model_dir: Path, data: PreparedData, built: TrainingModel, accelerator: Any
) -> dict[str, Any]:
    """Versions are added by RunDir; this holds the base model, data files, counts and shape."""
    files = {"train": cfg.data.train}
    if isinstance(cfg.data.validation, str):
        files["validation"] = cfg.data.validation
    trainable, total = built.params
    return {
        "config_digest": cfg.digest(),
        "base_model": {
            "name": cfg.model.name,
            "dir": str(model_dir),
            "fingerprint": weights_fingerprint(model_dir),
        },
        "data": {
            "files": {
                k: {"path": str(Path(v).resolve()), "sha256": file_sha256(v)}
                for k, v in files.items()
            },
            **data.report.to_dict(),
        },
        "method": cfg.method.name,
        "dtype": str(built.dtype).removeprefix("torch."),
        "device": str(accelerator.device),
        "world_size": accelerator.num_processes,
        "strategy": getattr(accelerator, "strategy", "single"),
        "quantize": cfg.model.quantize,
        "liger_kernel": cfg.train.liger_kernel,
        "trainable_params": trainable,
        "total_params": total,
        "total_steps": built.total_steps,
        "fast_path": built.fast.to_dict(),
    }


def resume_identity(
    cfg: RunConfig, manifest: dict[str, Any], data: PreparedData, dtype: torch.dtype
) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume (checked field by field)."""
    files = manifest["data"]["files"]
    validation = files["validation"]["sha256"] if "validation" in files else cfg.data.validation
    return {
        "model": {"fingerprint": manifest["base_model"]["fingerprint"], "dtype": str(dtype)},
        "data": {
            "train": {"sha256": files["train"]["sha256"]},
            "validation": validation,
            "tokens_sha256": tokens_digest(data.train),
            "max_length": cfg.data.max_length,
        },
        "train": {k: getattr(cfg.train, k) for k in ("batch_size", "grad_accum", "seed")},
        "world_size": manifest["world_size"],
        "total_steps": manifest["total_steps"],
        "method": cfg.method.model_dump(mode="json"),
    }

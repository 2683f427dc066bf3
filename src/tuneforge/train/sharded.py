"""Sharded training state through torch.distributed.checkpoint (DCP): each rank writes its own
shard of the trainable weights and optimizer state, and any world size reads them back.

The files are DCP's HuggingFace storage: safetensors with the shard offsets in their headers, no
pickle anywhere (DCP's default writer pickles its metadata). Where the files go, the manifest and
atomicity are checkpoint.py's; what else a checkpoint holds is resume.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHARDS_DIR = "shards"  # inside a checkpoint directory


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: Any) -> list[dict[str, Any]]:
    """Write this rank's shards into `directory` (every rank calls it, collectively).

    Returns the optimizer's param_groups (hyper-parameters, parameter names): plain data that the
    caller stores as JSON beside the shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, _raw_optimizer(optimizer))
    state = {"model": {k: v.detach() for k, v in _trainable(model).items()}, "optim": osd["state"]}
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    dcp.save(state, storage_writer=writer)
    return osd["param_groups"]


def load_sharded(
    directory: Path, model: torch.nn.Module, optimizer: Any, param_groups: list[dict[str, Any]]
) -> None:
    """Read shards written by any world size into this model and optimizer (sharded or not).

    Every rank calls it. The optimizer's state is created first (torch does a step at rate 0 with
    zero gradients), then overwritten with the saved values, bit for bit.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    raw = _raw_optimizer(optimizer)
    osd = get_optimizer_state_dict(model, raw)
    with torch.no_grad():
        state = {"model": _trainable(model), "optim": osd["state"]}
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)))
    set_optimizer_state_dict(model, raw, {"state": state["optim"], "param_groups": param_groups})


def local_shards(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of each tensor (a DTensor's local shard, a plain tensor itself)."""
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in tensors.items()}


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on any rank (a collective where torch.distributed runs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value)
    return bool(value.item() > 0)

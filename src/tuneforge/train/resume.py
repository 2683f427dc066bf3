"""Exact resume: what a training checkpoint holds (trainable weights, optimizer, scheduler, RNG per
rank, data position, loop counters, callbacks' state) and the guardrails that refuse a changed run.

Storage and atomicity are checkpoint.py's; when to save is the loop's; the recipe wires it up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tuneforge.errors import CheckpointError, ResumeRefused
from tuneforge.train.checkpoint import Checkpoint, Checkpointer, state_files, tensor_files
from tuneforge.train.sharded import SHARDS_DIR, any_rank, load_sharded, local_shards, save_sharded

log = logging.getLogger("tuneforge")

# Identity fields that must match for an exact resume, with what a user changes to alter them.
FIELD_HINTS = {
    "model.fingerprint": "model.name (the base model's weights)",
    "data.train.sha256": "data.train (the file's contents)",
    "data.validation": "data.validation",
    "data.tokens_sha256": "the tokenized data (data.format, data.template, data.train_on, "
    "data.truncation or the tokenizer)",
    "total_steps": "train.epochs / train.max_steps (the schedule length)",
    "world_size": "the number of processes",
}


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and every CUDA device) generator states of this process."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- weights --------------------------------------------------------------------------------


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def check_finite(tensors: dict[str, torch.Tensor], sharded: bool = False) -> None:
    """Refuse to checkpoint non-finite weights (R5): a NaN never reaches a checkpoint.

    `sharded`: each rank checks its own shards and all ranks agree (a collective)."""
    if sharded:
        tensors = local_shards(tensors)
    bad = [
        n
        for n, t in tensors.items()  # a finite sum proves every element finite (the fast path)
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all()
    ]
    if sharded and any_rank(bool(bad)) and not bad:
        bad = ["(a shard on another rank)"]
    if bad:
        from tuneforge.errors import NonFiniteError

        raise NonFiniteError(
            f"non-finite values in {len(bad)} trainable weights (e.g. {bad[0]}); "
            "no checkpoint was written"
        )


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved trainable weights into `model`, bit for bit; names and shapes must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: its weights do not fit this model (method or model changed?): "
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:1]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            saved = tensors[name]
            if saved.shape != param.shape:
                raise CheckpointError(
                    f"{where}: {name} has shape {tuple(saved.shape)}, the model {tuple(param.shape)}"
                )
            param.copy_(saved.to(device=param.device, dtype=param.dtype))


# --- identity and guardrails ------------------------------------------------------------------


def tokens_digest(examples: Sequence[Any]) -> str:
    """sha256 of the tokenized examples (ids and labels, in order): the data the loop sees."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(array("q", ex.input_ids).tobytes())
        digest.update(b"|")
        digest.update(array("q", ex.labels).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def flat_items(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": 1} from {"a": {"b": 1}}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat_items(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_identity(
    saved: dict[str, Any], current: dict[str, Any], allow: bool, where: Path
) -> None:
    """Refuse (ResumeRefused, naming each field) when what makes a resume exact has changed."""
    old, new = flat_items(saved), flat_items(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return
    lines = [
        f"  {k}{' = ' + FIELD_HINTS[k] if k in FIELD_HINTS else ''}: "
        f"checkpoint {old.get(k)!r}, now {new.get(k)!r}"
        for k in changed
    ]
    if allow:
        log.warning(
            "resuming despite changes (--allow-config-change); the result will differ from an "
            "uninterrupted run:\n%s",
            "\n".join(lines),
        )
        return
    raise ResumeRefused(
        f"resume refused: {where} was made by a different run:\n"
        + "\n".join(lines)
        + "\nresume with the original settings, or pass --allow-config-change to accept the change"
    )


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Config keys (dotted) whose values differ between the checkpoint's config and this one."""
    old, new = flat_items(saved), flat_items(current)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# --- the training state ---------------------------------------------------------------------


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


class TrainingState:
    """Saves and restores everything an exact resume needs; `save` is the loop's on_checkpoint."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        *,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        callbacks: dict[str, Stateful],
        meta: dict[str, Any],
        score: Callable[[int], dict[str, Any] | None] = lambda step: None,
        sharded: bool = False,
    ) -> None:
        """`sharded`: weights and optimizer state go through train/sharded.py (FSDP2), every
        rank writing its own shards; otherwise rank 0 writes them whole."""
        self.checkpointer = checkpointer
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.callbacks, self.meta, self.score = callbacks, meta, score
        self.sharded = sharded
        self.last_saved: Path | None = None

    def _write_shards(self, tmp: Path) -> dict[str, dict[str, Any]]:
        groups = save_sharded(tmp / SHARDS_DIR, self.model, self.optimizer)
        return {"optimizer": state_files("optimizer", {"param_groups": groups})}

    def save(self, step: int, counters: dict[str, Any]) -> Path:
        weights = trainable_tensors(self.model)
        check_finite(weights, sharded=self.sharded)
        rank = self.checkpointer.rank
        if self.sharded:
            shared = {}
        else:
            shared = {
                "model": tensor_files("model", weights),
                "optimizer": state_files("optimizer", self.optimizer.state_dict()),
            }
        shared |= {
            "scheduler": state_files("scheduler", self.scheduler.state_dict()),
            "trainer": state_files(
                "trainer",
                {"counters": counters, **{k: c.state_dict() for k, c in self.callbacks.items()}},
            ),
        }
        per_rank = state_files(f"rng-rank{rank:03d}", rng_state())
        score = self.score(step)
        if score is not None:
            score = {**score, "value": _finite_or_none(score.get("value"))}
        meta = {
            **self.meta,
            "data_position": {
                k: counters[k] for k in ("micro_batch", "epoch", "batch_in_epoch") if k in counters
            },
            "counters": {
                k: _finite_or_none(v) if isinstance(v, float) else v for k, v in counters.items()
            },
            "score": score,
        }
        collective = self._write_shards if self.sharded else None
        self.last_saved = self.checkpointer.save(step, shared, per_rank, meta, collective)
        return self.last_saved

    def _restore_shards(self, ckpt: Checkpoint) -> None:
        """Sharded weights and optimizer state, written by any world size, into this run."""
        groups = ckpt.state("optimizer")["param_groups"]
        try:
            load_sharded(ckpt.path / SHARDS_DIR, self.model, self.optimizer, groups)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(
                f"{ckpt.path}: its shards do not fit this model (method or model changed?): {first}"
            ) from None

    def restore(self, ckpt: Checkpoint) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load weights, optimizer, scheduler and callbacks; return (loop counters, this rank's RNG
        state). Set the RNG state last, right before the loop runs."""
        if ckpt.sharded:
            self._restore_shards(ckpt)
        elif self.sharded:
            raise CheckpointError(
                f"{ckpt.path} holds whole (unsharded) weights; resume it with the "
                "train.strategy it was written with (single or ddp)"
            )
        else:
            load_trainable(self.model, ckpt.tensors("model"), ckpt.path)
        try:
            if not ckpt.sharded:
                self.optimizer.load_state_dict(ckpt.state("optimizer"))
            self.scheduler.load_state_dict(ckpt.state("scheduler"))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"{ckpt.path}: optimizer/scheduler state does not fit this run: {err}"
            ) from None
        trainer = ckpt.state("trainer")
        for name, callback in self.callbacks.items():
            if name in trainer and trainer[name] is not None:
                callback.load_state_dict(trainer[name])
        name = f"rng-rank{self.checkpointer.rank:03d}"
        rng = ckpt.state(name) if ckpt.has(name) else None
        if rng is None:
            log.warning("%s: no RNG state for this rank; dropout noise will differ", ckpt.path)
        return trainer["counters"], rng


def truncate_jsonl(path: Path, after_step: int) -> int:
    """Drop the records of steps after `after_step` (and a torn last line); returns how many."""
    if not path.is_file():
        return 0
    from tuneforge.paths import write_text_atomic

    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and int(record.get("step", 0) or 0) > after_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(x + "\n" for x in kept))
    return dropped


def reopen_run_dir(run_dir: Path, step: int) -> None:
    """Continue a run directory at `step`: it is unfinished again (no summary.json), and records
    of steps after the checkpoint are dropped so that no step appears twice."""
    (run_dir / "summary.json").unlink(missing_ok=True)
    for name in ("metrics.jsonl", "samples.jsonl"):
        dropped = truncate_jsonl(run_dir / name, step)
        if dropped:
            log.info("%s: dropped %d records after step %d", name, dropped, step)


def start_checkpointing(
    run_dir: Path,
    ckpt: Checkpoint | None,
    *,
    allow_change: bool,
    keep_last: int,
    rank: int,
    barrier: Callable[[], None],
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    callbacks: dict[str, Stateful],
    meta: dict[str, Any],
    score: Callable[[int], dict[str, Any] | None],
    sharded: bool = False,
) -> tuple[TrainingState, dict[str, Any] | None, dict[str, Any] | None]:
    """Make the run's TrainingState; when resuming, check `ckpt` against this run and restore it.

    Returns (state, loop counters or None, this rank's RNG state or None). A fresh run removes
    checkpoints an overwritten run dir still holds; a resume removes those newer than `ckpt`.
    """
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last, rank=rank, barrier=barrier)
    state = TrainingState(
        checkpointer,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        callbacks=callbacks,
        meta=meta,
        score=score,
        sharded=sharded,
    )
    counters = rng = None
    if ckpt is not None:
        check_identity(ckpt.meta["identity"], meta["identity"], allow_change, ckpt.path)
        changed = config_changes(ckpt.meta.get("config", {}), meta.get("config", {}))
        if changed and rank == 0:
            log.info("resuming with changed settings: %s", ", ".join(changed))
        counters, rng = state.restore(ckpt)
        state.last_saved = ckpt.path
    if rank == 0:
        checkpointer.clean_stale()
        dropped = checkpointer.discard_all(after_step=ckpt.step if ckpt is not None else -1)
        if dropped:
            log.info("removed checkpoints of steps %s (not part of this run)", dropped)
        if ckpt is not None:
            reopen_run_dir(run_dir, ckpt.step)
            log.info("resuming from %s (step %d)", ckpt.path, ckpt.step)
    barrier()
    return state, counters, rng

"""Atomic, self-describing checkpoints: safetensors + JSON only, written to a temporary dir,
fsynced, then renamed, so a checkpoint is visible only when complete (R2) and never unpickled (R8).

It stores and verifies named states; what goes into them (model, optimizer, RNG, loop counters)
and the resume guardrails are train/resume.py's business.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import CheckpointError, UnsafePathError
from tuneforge.paths import confined, writing
from tuneforge.train.sharded import SHARDS_DIR

FORMAT = "tuneforge-checkpoint"
VERSION = 1
META = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_CHUNK = 1 << 20

Payload = bytes | dict[str, torch.Tensor]  # a JSON/bytes file, or tensors for a .safetensors file


# --- plain-data encoding: JSON for structure, safetensors for tensors, no pickle ----------------


def flatten(obj: Any, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `obj` into a JSON-safe tree and a {key: tensor} dict; `unflatten` inverts it exactly."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, path or "root", tensors), tensors


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple | list):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {path} without pickle")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__tuple__" in tree:
        return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {k: unflatten(v, tensors) for k, v in tree["__items__"]}
    return {k: unflatten(v, tensors) for k, v in tree.items()}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    unique = {}
    for key, t in tensors.items():  # safetensors refuses shared storage: copy the rare repeats
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        unique[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return unique


# --- file primitives (every byte a checkpoint writes goes through these) ------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            os.write(fd, view[start : start + _CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a .safetensors file straight from the tensors (no in-memory copy) and fsync it."""
    if path.exists():
        raise FileExistsError(path)
    save_file(tensors, str(path))
    _fsync(path)


def _write_file(path: Path, payload: Payload) -> None:
    if isinstance(payload, bytes):
        _write_bytes(path, payload)
    else:
        _write_tensors(path, payload)


def _fsync(path: Path) -> None:
    """fsync a file or directory that is already written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:  # its own name: the kill tests count directory syncs
    _fsync(path)


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    """Rename first (atomic), then delete: a half-deleted checkpoint never keeps its final name."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    _replace(path, trash)
    _fsync_dir(path.parent)
    _remove_tree(trash)


# --- listing, locating, verifying -----------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint under `root` with a final name, oldest first.

    Saves in progress live under `.tmp-*` names and are never listed.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and not child.is_symlink():  # a link may lead out (R9)
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_checkpoint(root: str | Path, spec: str) -> Path:
    """The checkpoint that `--resume SPEC` names: `auto` (the newest) or a name/path under `root`."""
    root = Path(root)
    if spec == "auto":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(
                f"--resume auto: no complete checkpoint under {root} (incomplete saves are "
                "ignored); run without --resume to start a fresh run"
            )
        return found[-1][1]
    given = Path(spec).expanduser()
    try:
        if given.is_absolute() or given.exists():
            rel = os.path.relpath(given.resolve(), root.resolve())
            path = confined(root, rel)
        else:
            path = confined(root, spec)
    except UnsafePathError as err:
        raise CheckpointError(
            f"--resume {spec}: a checkpoint must lie inside {root} ({err})"
        ) from None
    if not _STEP_DIR.match(path.name):
        raise CheckpointError(
            f"--resume {spec}: {path.name!r} is not a complete checkpoint (expected step-NNNNNN)"
        )
    if not path.is_dir():
        raise CheckpointError(f"--resume {spec}: checkpoint {path} does not exist")
    return path


def _file_info(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK * 8), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


@dataclass
class Checkpoint:
    """A verified checkpoint: every file listed in its meta was read back and its hash checked.

    Only files listed (and verified) are ever read; JSON and safetensors only, never pickle.
    """

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def sharded(self) -> bool:
        """True for a checkpoint whose weights and optimizer state are per-rank shards (FSDP2)."""
        return any(name.startswith(f"{SHARDS_DIR}/") for name in self.meta["files"])

    def has(self, name: str) -> bool:
        return f"{name}.json" in self.meta["files"] or f"{name}.safetensors" in self.meta["files"]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if f"{name}.safetensors" not in self.meta["files"]:
            return {}
        return load_file(str(self.path / f"{name}.safetensors"))

    def state(self, name: str) -> Any:
        if f"{name}.json" not in self.meta["files"]:
            raise CheckpointError(f"{self.path}: {name}.json is missing from this checkpoint")
        tree = json.loads((self.path / f"{name}.json").read_text(encoding="utf-8"))
        return unflatten(tree, self.tensors(name))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; any missing, truncated or altered file raises CheckpointError."""
    path = Path(path)
    hint = "pick an older one with --resume PATH"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {META}; not a complete checkpoint") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}/{META} is corrupt ({err}); {hint}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} checkpoint")
    for name, info in meta["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}/{META}: file name {name!r} leaves the checkpoint")
        if not (path / name).is_file() or (path / name).is_symlink():
            raise CheckpointError(f"{path}: {name} is missing; {hint}")
        if _file_info(path / name) != {"bytes": info["bytes"], "sha256": info["sha256"]}:
            raise CheckpointError(f"{path}: {name} is corrupt (size or sha256 mismatch); {hint}")
    return Checkpoint(path, meta)


# --- writing ----------------------------------------------------------------------------------


def state_files(name: str, obj: Any) -> dict[str, Payload]:
    """The files of one named state: `name.json` (structure) and `name.safetensors` (tensors)."""
    tree, tensors = flatten(obj, name)
    files = {f"{name}.json": json.dumps(tree, allow_nan=False, sort_keys=True).encode()}
    if tensors:
        files[f"{name}.safetensors"] = _unshared(tensors)
    return files


def tensor_files(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Payload]:
    """A plain `name.safetensors` keyed by the tensors' own names (readable by any tool)."""
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {f"{name}.safetensors": _unshared(plain)}


class Checkpointer:
    """Writes `root/step-NNNNNN/` atomically and rotates old ones; one instance per process.

    Every rank calls `save` (collectively, with `barrier` between phases): each writes its own
    per-rank files into the shared temporary dir; rank 0 writes the shared files and the meta,
    fsyncs, renames and rotates.
    """

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        *,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"checkpoint.keep_last: must be >= 1, got {keep_last}")
        self.root, self.keep_last, self.rank, self.barrier = Path(root), keep_last, rank, barrier

    def clean_stale(self) -> None:
        """Remove leftovers of interrupted saves and deletions (rank 0, before training)."""
        if self.rank == 0 and self.root.is_dir():
            for child in self.root.iterdir():
                if child.name.startswith((".tmp-", ".trash-")):
                    _remove_tree(child)

    def discard_all(self, after_step: int = -1) -> list[int]:
        """Delete the checkpoints newer than `after_step` (all by default); rank 0 only."""
        dropped = []
        if self.rank == 0:
            for step, path in list_checkpoints(self.root):
                if step > after_step:
                    _discard(path)
                    dropped.append(step)
        return dropped

    def save(
        self,
        step: int,
        shared: dict[str, dict[str, Payload]],
        per_rank: dict[str, Payload],
        meta: dict[str, Any],
        collective: Callable[[Path], dict[str, dict[str, Payload]]] | None = None,
    ) -> Path:
        """Write one checkpoint. `shared` maps names to files (from `state_files`/`tensor_files`).

        `collective(tmp_dir)`, when given, runs on every rank while the checkpoint is still
        temporary (a sharded writer: each rank writes its own files under it); it returns more
        shared files, written by rank 0. Every file, in subdirectories too, is in the manifest.
        """
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"
        note = (
            f" (checkpoint {final.name} was not written; the earlier complete checkpoints are "
            "kept: continue with --resume auto once there is room)"
        )
        try:
            with writing(final, note):
                return self._save(step, final, tmp, shared, per_rank, meta, collective)
        except BaseException:
            if self.rank == 0:
                _remove_tree(tmp)
            raise

    def _save(
        self,
        step: int,
        final: Path,
        tmp: Path,
        shared: dict[str, dict[str, Payload]],
        per_rank: dict[str, Payload],
        meta: dict[str, Any],
        collective: Callable[[Path], dict[str, dict[str, Payload]]] | None = None,
    ) -> Path:
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            _remove_tree(tmp)
            tmp.mkdir()
        self.barrier()
        for name, payload in per_rank.items():
            _write_file(tmp / name, payload)
        if collective is not None:
            shared = {**shared, **collective(tmp)}
        self.barrier()
        if self.rank == 0:
            for group in shared.values():
                for name, payload in group.items():
                    _write_file(tmp / name, payload)
            files = _listing(tmp)
            full = {"format": FORMAT, "version": VERSION, "step": step, "created_unix": time.time()}
            full.update(meta)
            full["files"] = files
            _write_bytes(tmp / META, json.dumps(full, indent=1, allow_nan=False).encode())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (resumed from an older checkpoint)
                _discard(final)
            _replace(tmp, final)
            _fsync_dir(self.root)
            self.rotate()
        self.barrier()
        return final

    def rotate(self) -> list[int]:
        """Keep the newest `keep_last` checkpoints and the best one; delete the rest."""
        found = list_checkpoints(self.root)
        keep = {step for step, _ in found[-self.keep_last :]}
        best = best_checkpoint(found)
        if best is not None:
            keep.add(best)
        dropped = []
        for step, path in found:
            if step not in keep:
                _discard(path)
                dropped.append(step)
        return dropped


def _listing(tmp: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: bytes and sha256} of every file under `tmp`; subdirectories are
    fsynced here (their files were fsynced by whoever wrote them)."""
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_dir():
            _fsync_dir(path)
        elif path.is_file():
            files[path.relative_to(tmp).as_posix()] = _file_info(path)
    return files


def best_checkpoint(found: list[tuple[int, Path]]) -> int | None:
    """The step whose checkpoint recorded the best evaluation score (meta "score"), if any."""
    best_step, best_value = None, None
    for step, path in found:
        try:
            score = json.loads((path / META).read_text(encoding="utf-8")).get("score")
        except (OSError, ValueError):
            continue
        if not score or score.get("value") is None:
            continue
        value = score["value"] if score.get("mode", "min") == "min" else -score["value"]
        if best_value is None or value < best_value:
            best_step, best_value = step, value
    return best_step

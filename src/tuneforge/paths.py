"""Confine user-supplied names to their root directory (R9) and write files atomically.

A name with `..`, an absolute path, an encoded dot or a symlink that leads out is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from tuneforge.errors import UnsafePathError


def confined(root: str | Path, name: str) -> Path:
    """`root/name`, refusing anything that resolves outside `root` (symlinks followed)."""
    decoded = urllib.parse.unquote(name)
    if not name or decoded != name and (".." in decoded or "/" in decoded or "\\" in decoded):
        raise UnsafePathError(f"{name!r}: encoded path characters are not allowed")
    if (
        os.path.isabs(decoded)
        or "\\" in decoded
        or any(part == ".." for part in Path(decoded).parts)
    ):
        raise UnsafePathError(f"{name!r}: must be a relative name without '..'")
    root_real = Path(root).resolve()
    target = (root_real / decoded).resolve()
    if target != root_real and root_real not in target.parents:
        raise UnsafePathError(f"{name!r}: resolves outside {root_real}")
    return target


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")

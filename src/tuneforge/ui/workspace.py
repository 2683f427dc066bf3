"""The workspace directory the page works in: every file it reads or writes lies inside it.

Names from the browser go through `tuneforge.paths.confined` (no `..`, no absolute path, no
symlink out); listing data files, model directories and run directories is done here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import UnsafePathError, UsageError
from tuneforge.paths import confined

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
STATE_DIR = ".tuneforge-ui"  # queue, logs and chat state of the page, inside the workspace
SKIP_DIRS = {"checkpoints", "adapter", "model", "tokenizer", "plots", "tensorboard", "__pycache__"}
MAX_WALK_DEPTH = 4
MAX_LISTED = 500


@dataclass(frozen=True)
class Entry:
    name: str
    path: str  # relative to the workspace, "/"-separated
    is_dir: bool
    size: int


class Workspace:
    """A root directory; `resolve` turns a user-supplied relative name into a confined path."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"--workspace {root}: not a directory; create it first")
        self.root = root.resolve()
        self.state = self.root / STATE_DIR

    def resolve(self, name: str) -> Path:
        """The confined path for `name` ("" or "." is the root itself); UnsafePathError if not."""
        if name in ("", "."):
            return self.root
        path = confined(self.root, name)
        if STATE_DIR in path.relative_to(self.root).parts:
            raise UnsafePathError(f"{name!r}: the page's own state is not browsable")
        return path

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def listdir(self, name: str) -> list[Entry]:
        """The entries of a workspace directory (hidden ones left out), directories first."""
        path = self.resolve(name)
        if not path.is_dir():
            raise UnsafePathError(f"{name!r}: not a directory in the workspace")
        entries = []
        for child in sorted(path.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
            if child.name.startswith(".") or not _inside(self.root, child):
                continue
            size = child.stat().st_size if child.is_file() else 0
            entries.append(Entry(child.name, self.rel(child), child.is_dir(), size))
        return entries[:MAX_LISTED]

    def data_files(self) -> list[str]:
        return [self.rel(p) for p in self._walk() if p.suffix in DATA_SUFFIXES and p.is_file()]

    def model_dirs(self) -> list[str]:
        """Local Hugging Face model directories (a config.json beside weights)."""
        found = []
        for p in self._walk(dirs=True):
            if (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
                if any(p.glob("*.safetensors")):
                    found.append(self.rel(p))
        return found

    def run_dirs(self) -> list[str]:
        """Directories that hold a run: a config.yaml beside a manifest.json or metrics.jsonl."""
        found = []
        for p in self._walk(dirs=True):
            if (p / "config.yaml").is_file() and (
                (p / "manifest.json").is_file() or (p / "metrics.jsonl").is_file()
            ):
                found.append(self.rel(p))
        return found

    def _walk(self, dirs: bool = False) -> list[Path]:
        out: list[Path] = []
        for top, subdirs, files in os.walk(self.root, followlinks=False):
            depth = len(Path(top).relative_to(self.root).parts)
            subdirs[:] = sorted(
                d
                for d in subdirs
                if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_WALK_DEPTH
            )
            names = subdirs if dirs else sorted(files)
            for name in names:
                if not name.startswith(".") and len(out) < MAX_LISTED:
                    out.append(Path(top) / name)
        return [p for p in out if _inside(self.root, p)]


def _inside(root: Path, path: Path) -> bool:
    """False for a symlink that leads out of the workspace."""
    real = path.resolve()
    return real == root or root in real.parents

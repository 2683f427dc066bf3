"""Confine user-supplied names to their root directory (R9) and write files atomically.

A name with `..`, an absolute path, an encoded dot or a symlink that leads out is refused. An
OSError while writing an output (disk full, read-only, no permission) becomes one OutputError here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneforge.errors import OutputError, UnsafePathError

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")

#: errno -> what the user reads and does; any other OSError is not a user mistake and propagates.
OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another output location",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output location",
    errno.EROFS: "the file system is read-only; choose a writable output location",
    errno.EACCES: "permission denied; choose an output location you can write to",
    errno.EPERM: "operation not permitted; choose an output location you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another output location",
    errno.EISDIR: "is a directory, not a file; choose another output path",
}


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


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError):
        return err.errno
    # Writers in Rust (safetensors) raise their own type: "... No space left on device (os error 28)"
    match = _RUST_OS_ERROR.search(str(err))
    return int(match.group(1)) if match else None


def output_error(err: BaseException, path: str | Path | None = None) -> OutputError | None:
    """The user-facing error for an OS-level failure while writing `path`, or None when it is not
    one the user can fix (the caller re-raises it then)."""
    reason = OUTPUT_ERRNOS.get(_errno_of(err))
    if reason is None:
        return None
    where = path if path is not None else (getattr(err, "filename", None) or "output")
    return OutputError(f"{where}: cannot write: {reason}")


@contextlib.contextmanager
def writing(path: str | Path, note: str = "") -> Iterator[None]:
    """Turn a disk-full / read-only / permission failure inside the block into an OutputError
    naming `path` (plus `note`); every other exception passes through unchanged."""
    try:
        yield
    except OutputError:
        raise
    except Exception as err:
        mapped = output_error(err, path)
        if mapped is None:
            raise
        raise OutputError(f"{mapped}{note}") from err


def _write_fd(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` and fsync it (the one seam the fault tests inject into)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A failure (e.g. a full disk: OutputError) leaves neither the temporary file nor a new `path`.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            try:
                _write_fd(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_dir_atomic(path: str | Path, fill: Callable[[Path], None], note: str = "") -> Path:
    """Let `fill(tmp)` write a whole directory beside `path`, then rename it into place.

    A failure inside `fill` (e.g. a full disk: OutputError) removes the temporary directory and
    leaves `path` as it was; an older `path` is replaced only once the new one is complete.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with writing(path, note):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fill(tmp)
            for child in tmp.rglob("*"):
                if child.is_file():
                    with open(child, "rb") as fh:
                        os.fsync(fh.fileno())
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an older `path` moves aside first and comes back on failure."""
    old = path.with_name(f".trash-{path.name}-{os.getpid()}")
    moved = path.exists()
    if moved:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if moved:
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_output_path(path: str | Path, flag: str) -> Path:
    """Refuse an output file path that cannot be created (a file where a directory must be, or
    a directory where the file must be) before any work is done; `flag` names the argument."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return path

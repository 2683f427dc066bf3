"""The run directory: resolved config, manifest, metrics stream, summary and the saved artifact.

Layout: config.yaml, manifest.json, metrics.jsonl, summary.json, adapter/ or model/, tokenizer/.
summary.json is written last, so a run without it did not finish.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tuneforge.errors import RunDirError
from tuneforge.paths import write_json_atomic, write_text_atomic, writing

SAMPLES_FILE = "samples.jsonl"  # a few generations per evaluation (evaluation/validation.py)
PACKAGES = ("tuneforge", "torch", "transformers", "peft", "accelerate", "tokenizers")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class RunDir:
    """Writes the files of one run. Only the main process should create one."""

    def __init__(self, path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        """`resume`: continue a run here; its metrics stay (the caller truncates them)."""
        self.path, self.resumed = Path(path), resume
        if self.path.exists() and any(self.path.iterdir()) and not (overwrite or resume):
            raise RunDirError(
                f"output.dir: {self.path} is not empty; choose another output.dir, set output.overwrite=true, or continue it with --resume"
            )
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resume drops summary.json only once the checkpoint is accepted
            (self.path / "summary.json").unlink(missing_ok=True)
            (self.path / "metrics.jsonl").unlink(missing_ok=True)

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: dict[str, Any]) -> None:
        write_text_atomic(
            self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        )

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.path / "manifest.json", {"versions": versions(), **manifest})

    def log(self, record: dict[str, Any]) -> None:
        path = self.path / "metrics.jsonl"
        with writing(path), path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False, default=float) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"


def read_run(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, manifest) of a finished run directory."""
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "manifest.json").is_file():
        raise RunDirError(
            f"{path}: not a tuneforge run directory (config.yaml / manifest.json missing)"
        )
    return _read_mapping(path / "config.yaml", yaml.safe_load), _read_mapping(
        path / "manifest.json", json.loads
    )


def _read_mapping(path: Path, parse: Any) -> dict[str, Any]:
    """A run file that must hold a mapping; RunDirError naming it when it is damaged."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise RunDirError(
            f"{path}: damaged ({first}); restore it, or train the run again"
        ) from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a mapping, got {type(value).__name__}; damaged?")
    return value

"""R8 and R9: loading never executes code (booby-trapped pickles are refused without running) and
user-supplied names stay inside their root (`..`, absolute, encoded dots, symlinks out)."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.errors import CheckpointError, ModelError, RunDirError, UnsafePathError
from tuneforge.loading import load_reference
from tuneforge.models import load_model
from tuneforge.paths import confined
from tuneforge.train.checkpoint import find_checkpoint, load_checkpoint

from helpers import write_run_config, write_toy_messages

SRC = Path(__file__).parents[1] / "src" / "tuneforge"


class _Trap:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _trap_bytes(marker: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": _Trap(marker)})


def test_the_trap_is_live(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(_trap_bytes(marker))  # what an unsafe loader would do
    assert marker.exists()


def test_model_dir_with_only_pickled_weights_is_refused(tmp_path, tiny_model_dir, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "pwned"
    for name in ("pytorch_model.bin", "model.pt"):
        (model_dir / name).write_bytes(_trap_bytes(marker))
    with pytest.raises(ModelError, match="never loads pickled"):
        load_model(model_dir, dtype=None)
    data = write_toy_messages(tmp_path / "train.jsonl", n=8)
    cfg = write_run_config(tmp_path / "run.yaml", model_dir, data, tmp_path / "run")
    assert main(["train", str(cfg), "--quiet"]) == 2
    assert "no .safetensors weights" in capsys.readouterr().err
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_beside_them(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(_trap_bytes(marker))
    import torch

    model = load_model(model_dir, torch.float32)
    assert model.config.num_hidden_layers == 2 and not marker.exists()


def test_pickled_adapter_is_refused(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, run / "tokenizer")
    (run / "config.yaml").write_text("model:\n  name: x\n")
    manifest = {"base_model": {"name": str(tiny_model_dir), "dir": str(tiny_model_dir)}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    )
    marker = tmp_path / "pwned"
    (run / "adapter" / "adapter_model.bin").write_bytes(_trap_bytes(marker))
    with pytest.raises(RunDirError, match="pickled adapters"):
        load_reference(run, dtype="fp32")
    assert not marker.exists()


def test_checkpoint_loading_never_unpickles(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "pwned"
    blob = _trap_bytes(marker)
    (ckpt / "optimizer.pt").write_bytes(blob)
    import hashlib

    meta = {
        "format": "tuneforge-checkpoint",
        "version": 1,
        "step": 1,
        "files": {"optimizer.pt": {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}},
    }
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(find_checkpoint(tmp_path / "checkpoints", "auto"))
    with pytest.raises(CheckpointError, match="optimizer.json is missing"):
        loaded.state("optimizer")
    assert not marker.exists()


def test_source_never_unpickles_or_trusts_remote_code():
    """No pickle, no torch.load without weights_only=True, no hard-coded trust_remote_code=True."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M):
            offenders.append(f"{path}: imports pickle")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path}: {call.group(0)}")
        if "trust_remote_code=True" in text:
            offenders.append(f"{path}: trust_remote_code=True")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "name",
    [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "%2e%2e/escape",
        "%2E%2E%2Fescape",
        "..%2fescape",
        "a\\..\\..\\escape",
        "",
    ],
)
def test_confined_rejects_names_that_leave_the_root(tmp_path, name):
    with pytest.raises(UnsafePathError):
        confined(tmp_path / "root", name)


def test_confined_follows_symlinks_and_accepts_plain_names(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="resolves outside"):
        confined(root, "link")
    with pytest.raises(UnsafePathError, match="resolves outside"):
        confined(root, "link/secret.txt")
    assert confined(root, "runs/my-run") == root.resolve() / "runs" / "my-run"
    assert confined(root, "adapter.v2") == root.resolve() / "adapter.v2"

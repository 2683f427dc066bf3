"""Faults while writing (issue 19): a full disk during a checkpoint or the final save, and a
read-only output directory. Each ends in exit 2 and one line naming the path and the cause; the
earlier checkpoints stay intact, `--resume auto` finishes the run to the same weights as an
uninterrupted one, and no file is left under a final name.

ENOSPC / EROFS / EACCES are injected at the writers (checkpoint.py's file writer, paths.py's
fd writer, peft's safetensors call); the read-only directory is a real read-only bind mount in a
user namespace (`unshare -rm`), or an injected EROFS where the kernel does not allow one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuneforge.paths as paths
import tuneforge.train.checkpoint as ckpt
from tuneforge.cli import main
from tuneforge.train.checkpoint import load_checkpoint

from helpers import write_run_config, write_toy_messages

STEPS = 6


def _config(tmp: Path, model_dir: Path, name: str) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_toy_messages(data, n=24)
    return write_run_config(
        tmp / f"{name}.yaml",
        model_dir,
        data,
        tmp / name,
        data={"validation": None},
        train={"max_steps": STEPS},
        eval={"every_steps": None},
        checkpoint={"every_steps": 2, "keep_last": 5},
        log={"report": False},
    )


def _train(cfg: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["train", str(cfg), "--quiet", *extra])
    return code, capsys.readouterr().err


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _fail_with(err: int):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    return fail


def _names(run: Path) -> set[str]:
    """Every path under `run`, relative (directories too)."""
    return {str(p.relative_to(run)) for p in run.rglob("*")}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, one_thread):
    """An uninterrupted run: the weights every resumed run must reach bit for bit."""
    tmp = tmp_path_factory.mktemp("faults")
    assert main(["train", str(_config(tmp, tiny_model_dir, "base")), "--quiet"]) == 0
    return tmp, _adapter(tmp / "base")


def _assert_resumes_to_baseline(cfg: Path, run: Path, baseline, capsys) -> None:
    code, err = _train(cfg, capsys, "--resume", "auto")
    assert code == 0, err
    resumed, reference = _adapter(run), baseline[1]
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert not [n for n in _names(run) if n.startswith(".") or "/." in n]  # no temp leftovers


@pytest.mark.parametrize(
    "err,cause", [(errno.ENOSPC, "no space left on the device"), (errno.EROFS, "read-only")]
)
def test_fault_during_a_checkpoint_keeps_the_previous_one(
    err, cause, baseline, tiny_model_dir, monkeypatch, capsys
):
    tmp = baseline[0]
    cfg, run = _config(tmp, tiny_model_dir, f"ckpt-{err}"), tmp / f"ckpt-{err}"
    write = ckpt._write_tensors
    calls = {"n": 0}

    def second_save_fails(path, tensors):  # the step-4 checkpoint's first tensor file
        if path.parent.name == ".tmp-step-000004":
            calls["n"] += 1
            raise OSError(err, os.strerror(err))
        write(path, tensors)

    monkeypatch.setattr(ckpt, "_write_tensors", second_save_fails)
    code, stderr = _train(cfg, capsys)
    assert code == 2 and calls["n"] == 1
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert f"{run}/checkpoints/step-000004: cannot write: " in line and cause in line
    assert "continue with --resume auto" in line and "Traceback" not in stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # no torn tmp
    assert not (run / "summary.json").exists() and not (run / "adapter").exists()
    assert load_checkpoint(run / "checkpoints" / "step-000002").step == 2  # verified intact
    monkeypatch.setattr(ckpt, "_write_tensors", write)
    _assert_resumes_to_baseline(cfg, run, baseline, capsys)


def test_full_disk_while_saving_the_adapter(baseline, tiny_model_dir, monkeypatch, capsys):
    import peft.peft_model

    tmp = baseline[0]
    cfg, run = _config(tmp, tiny_model_dir, "final"), tmp / "final"

    def half_then_full(tensors, filename, metadata=None):  # a torn file, then ENOSPC
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_full)
    code, stderr = _train(cfg, capsys)
    assert code == 2, stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: {run}/adapter: cannot write: no space left on the device")
    assert "--resume auto" in line and "Traceback" not in stderr
    names = _names(run)
    assert "adapter" not in names and not [n for n in names if n.startswith(".tmp")]
    assert "summary.json" not in names and "checkpoints/step-000006" in names
    monkeypatch.undo()
    _assert_resumes_to_baseline(cfg, run, baseline, capsys)


def test_full_disk_while_writing_the_summary(baseline, tiny_model_dir, monkeypatch, capsys):
    tmp = baseline[0]
    cfg, run = _config(tmp, tiny_model_dir, "summary"), tmp / "summary"
    write_fd = paths._write_fd

    def summary_fails(fd, data):  # the fd writer every atomic JSON/text write goes through
        if b'"train_runtime_s"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_fd(fd, data)

    monkeypatch.setattr(paths, "_write_fd", summary_fails)
    code, stderr = _train(cfg, capsys)
    assert code == 2, stderr
    assert f"error: {run}/summary.json: cannot write: no space left on the device" in stderr
    names = _names(run)
    assert "summary.json" not in names and not [n for n in names if "/." in n or n[0] == "."]
    monkeypatch.undo()
    _assert_resumes_to_baseline(cfg, run, baseline, capsys)
    assert (run / "summary.json").is_file()


def _read_only_mount_works(path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = f"mount --bind {path} {path} && mount -o remount,bind,ro {path} && ! touch {path}/x"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True)
    return done.returncode == 0 and not (path / "x").exists()


def test_read_only_output_directory(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """output.dir inside a read-only directory: exit 2 naming it, nothing written there."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = write_run_config(
        tmp_path / "ro.yaml",
        tiny_model_dir,
        write_toy_messages(tmp_path / "t.jsonl", 8),
        ro / "run",
    )
    if _read_only_mount_works(ro):  # a real read-only file system (kernel EROFS)
        mount = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}"
        cmd = f'{mount} && exec "$0" -m tuneforge.cli train {cfg} --quiet'
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", cmd, sys.executable],
            capture_output=True,
            text=True,
            env=env,
        )
        code, stderr, how = done.returncode, done.stderr, "mount"
    else:  # no user namespaces here: the same EROFS, injected where the directory is created
        monkeypatch.setattr(Path, "mkdir", _fail_with(errno.EROFS))
        code, stderr = _train(cfg, capsys)
        how = "injected"
    assert code == 2, (how, stderr)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines == [f"error: {ro}/run: cannot write: the file system is read-only; choose a "
                     "writable output location"], (how, stderr)  # fmt: skip
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("err", [errno.EACCES, errno.ENOSPC])
def test_unwrapped_writer_oserror_is_mapped_by_the_cli(err, tmp_path, monkeypatch, capsys):
    """An OSError from a writer nobody wrapped still ends as one line (the CLI's safety net)."""
    from tuneforge.cli import evaluate

    def cmd_score(args):
        raise OSError(err, os.strerror(err), str(tmp_path / "out.json"))

    monkeypatch.setattr(evaluate, "cmd_score", cmd_score)
    code = main(["score", "--predictions", "p", "--references", "r"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}/out.json: ")
    assert ("permission denied" if err == errno.EACCES else "no space left") in lines[0]


def test_the_reliability_doc_lists_every_fault_case():
    doc = Path(__file__).parents[1] / "docs" / "reliability.md"
    block = doc.read_text(encoding="utf-8").split("<!-- fault-cases:begin -->")[1]
    documented = set(
        re.findall(r"^\| `(test_\w+)` \|", block.split("<!-- fault-cases:end")[0], re.M)
    )
    tests = {
        name for name in globals() if name.startswith("test_") and "reliability_doc" not in name
    }
    assert documented == tests

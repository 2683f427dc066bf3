"""Run `tuneforge train` with deterministic faults: SIGKILL or a signal at the K-th training forward,
or SIGKILL at the N-th write tick of a checkpoint save. Used by the kill-and-resume tests.

Usage: python tests/kill_runner.py [--kill-at-forward K] [--signal-at-forward K:SIGTERM[,SIGINT]]
           [--kill-at-save-tick N] [--rank R] -- train CONFIG ... (the tuneforge CLI arguments)
Under torchrun, --rank R gives only that rank the fault; KILL_STAMP=FILE records when it died.
A tick is one byte written by the checkpoint writer, or one directory operation (fsync, rename).
Also the tests' helpers to start it and read a run dir. Kept in tests/: the package knows nothing
of it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _die() -> None:
    stamp = os.environ.get("KILL_STAMP")  # when the kill happened, for the bounded-exit tests
    if stamp:
        Path(stamp).write_text(repr(time.time()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_forward(kill_at: int | None, signal_at: tuple[int, list[int]] | None) -> None:
    """Count training forwards with a pre-hook on the input embeddings (called once per forward)."""
    import tuneforge.recipes.parts as parts

    original = parts.load_model
    count = {"n": 0}

    def hook(module, args):
        if not module.training:
            return
        count["n"] += 1
        if kill_at is not None and count["n"] == kill_at:
            _die()
        if signal_at is not None and count["n"] == signal_at[0]:
            for signum in signal_at[1]:
                os.kill(os.getpid(), signum)

    def load_model(*args, **kwargs):
        model = original(*args, **kwargs)
        model.get_input_embeddings().register_forward_pre_hook(hook)
        return model

    parts.load_model = load_model


def patch_saver(kill_at_tick: int, setattr=setattr) -> dict[str, int]:
    """SIGKILL once the checkpoint writer has done `kill_at_tick` ticks (mid-file if it falls
    there). Returns the live tick counter; `setattr` may be pytest's monkeypatch.setattr."""
    import tuneforge.train.checkpoint as ckpt

    ticks = {"n": 0}

    def spend(n: int) -> int:
        """How many of `n` ticks may still run before the kill."""
        left = kill_at_tick - ticks["n"]
        ticks["n"] += n
        return max(0, min(n, left))

    write_bytes, write_tensors = ckpt._write_bytes, ckpt._write_tensors
    fsync_dir, replace = ckpt._fsync_dir, ckpt._replace

    def _write_bytes(path, data):
        allowed = spend(len(data))
        if allowed < len(data):
            with open(path, "wb") as fh:  # the torn prefix a kill leaves behind
                fh.write(data[:allowed])
            _die()
        write_bytes(path, data)

    def _write_tensors(path, tensors):
        write_tensors(path, tensors)
        size = os.path.getsize(path)
        allowed = spend(size)
        if allowed < size:
            os.truncate(path, allowed)  # the torn prefix a kill leaves behind
            _die()

    def _fsync_dir(path):
        if spend(1) < 1:
            _die()
        fsync_dir(path)

    def _replace(src, dst):
        if spend(1) < 1:
            _die()
        replace(src, dst)

    setattr(ckpt, "_write_bytes", _write_bytes)
    setattr(ckpt, "_write_tensors", _write_tensors)
    setattr(ckpt, "_fsync_dir", _fsync_dir)
    setattr(ckpt, "_replace", _replace)
    return ticks


# --- for the tests: start the trainer through this runner and read what it left ------------


def subprocess_env() -> dict[str, str]:
    """One thread per process: runs beside each other compare bit for bit."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_trainer(cfg: Path, *faults: str, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__)), *faults, "--", "train", str(cfg), "--quiet"]
    cmd += ["--resume", "auto"] if resume else []
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out + err


def run_trainer(cfg: Path, *faults: str, resume: bool = False) -> tuple[int, str]:
    return finish(start_trainer(cfg, *faults, resume=resume))


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*"))


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def comparable(rows: list[dict]) -> list[dict]:
    """Everything logged except wall-clock numbers."""
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at-forward", type=int)
    parser.add_argument("--signal-at-forward")
    parser.add_argument("--kill-at-save-tick", type=int)
    parser.add_argument("--rank", type=int, help="under torchrun: only this rank has the fault")
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.rank is not None and int(os.environ.get("RANK", "0")) != args.rank:
        args.kill_at_forward = args.signal_at_forward = args.kill_at_save_tick = None
    signal_at = None
    if args.signal_at_forward:
        k, names = args.signal_at_forward.split(":")
        signal_at = (int(k), [int(getattr(signal, n)) for n in names.split(",")])
    if args.kill_at_forward is not None or signal_at is not None:
        _patch_forward(args.kill_at_forward, signal_at)
    if args.kill_at_save_tick is not None:
        patch_saver(args.kill_at_save_tick)
    from tuneforge.cli import main as cli_main

    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main())

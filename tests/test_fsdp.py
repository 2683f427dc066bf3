"""FSDP2 under `tuneforge train --nproc 2` (gloo, CPU): equal to one process with the same global
batch, sharded checkpoints resumed bit for bit after a rank is SIGKILLed, and read back by one
process; launch errors (a port in use, ranks with different configs) in one clear line.

Tolerance against one process: rtol 1e-4, atol 1e-6 on every saved weight (fp32; the sums are
only reordered across ranks), as for DDP in test_ddp.py. Resume on the same world size: exact.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main

from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.dist

TESTS = Path(__file__).resolve().parent
TRAIN = {"max_steps": 4, "lr": 1e-2, "grad_accum": 2, "scheduler": "constant"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", *args]


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _config(tmp: Path, name: str, model_dir: Path, data: Path, **train) -> Path:
    return write_run_config(
        tmp / f"{name}.yaml",
        model_dir,
        data,
        tmp / name,
        train={**TRAIN, **train},
        checkpoint={"every_steps": 2, "keep_last": 3},
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_here(cfg: Path) -> None:
    """The one-process reference, trained in this process on one thread (the `one_thread`
    fixture): the same `tuneforge train` as the subprocess, minus an interpreter start."""
    assert main(["train", str(cfg), "--quiet"]) == 0


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir, one_thread):
    """One process with batch 4, and FSDP2 on two processes with batch 2 each (same global batch)."""
    tmp = tmp_path_factory.mktemp("fsdp-lora")
    data = write_toy_messages(tmp / "train.jsonl", n=40)
    one = _config(tmp, "one", tiny_model_dir, data, batch_size=4)
    two = _config(tmp, "two", tiny_model_dir, data, batch_size=2, strategy="fsdp2")
    _train_here(one)
    _ok(_run(_cli("train", str(two), "--quiet", "--nproc", "2")))
    return tmp, data, two


def _weights(run: Path, artifact: str = "adapter") -> dict[str, torch.Tensor]:
    name = "adapter_model" if artifact == "adapter" else "model"
    return load_file(run / artifact / f"{name}.safetensors")


def test_fsdp2_lora_two_processes_match_one(lora_runs):
    tmp, _, _ = lora_runs
    a, b = _weights(tmp / "one"), _weights(tmp / "two")
    assert a.keys() == b.keys()  # the plain PEFT names, gathered on rank 0
    assert all(v.numel() > 0 and v.dim() == 2 for v in b.values())  # no shard left in the export
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in b.items())  # trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    manifest = json.loads((tmp / "two" / "manifest.json").read_text())
    assert (manifest["strategy"], manifest["world_size"]) == ("fsdp2", 2)
    s1 = json.loads((tmp / "one" / "summary.json").read_text())
    s2 = json.loads((tmp / "two" / "summary.json").read_text())
    assert s1["train_tokens"] == s2["train_tokens"]
    assert s1["final_train_loss"] == pytest.approx(s2["final_train_loss"], rel=1e-4)
    assert s1["eval"]["eval_loss"] == pytest.approx(s2["eval"]["eval_loss"], rel=1e-4)


def test_sharded_checkpoint_every_rank_writes_its_shard(lora_runs):
    tmp, _, _ = lora_runs
    ckpt = tmp / "two" / "checkpoints" / "step-000002"
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    shards = sorted(n for n in meta["files"] if n.startswith("shards/"))
    assert len(shards) == 2  # one file per rank, each listed with its sha256
    assert all(Path(n).suffix in (".json", ".safetensors") for n in meta["files"])  # no pickle
    halves = [load_file(ckpt / n) for n in shards]
    key = next(k for k in halves[0] if "lora_A" in k and "exp_avg" not in k)
    full = _weights(tmp / "one")  # a LoRA A matrix (r=4 rows) is split 2 + 2 over the ranks
    assert halves[0][key].shape[0] + halves[1][key].shape[0] == 4
    assert full  # the whole adapter exists beside


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    import shutil

    name = f"step-{step:06d}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


def test_sharded_checkpoint_resumes_in_one_process(lora_runs, tiny_model_dir):
    """2 -> 1: the step-2 shards of the two-process run, continued by one process with the same
    global batch (batch 4), end where the two-process run ended (within the tolerance)."""
    tmp, data, _ = lora_runs
    _copy_checkpoint(tmp / "two", tmp / "two-to-one", 2)
    cfg = _config(tmp, "two-to-one", tiny_model_dir, data, batch_size=4, strategy="single")
    out = _run(_cli("train", str(cfg), "--quiet", "--resume", "auto", "--allow-config-change"))
    _ok(out)
    assert "world_size" in out.stderr  # the change is named, not silent
    a, b = _weights(tmp / "two"), _weights(tmp / "two-to-one")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_kill_one_rank_then_resume_is_exact(lora_runs, tiny_model_dir):
    """SIGKILL rank 1 in step 3 (after the step-2 checkpoint): the job exits non-zero within a
    bounded time; `--resume` on two processes ends bit for bit where the unbroken run ended."""
    tmp, data, _ = lora_runs
    cfg = _config(tmp, "killed", tiny_model_dir, data, batch_size=2, strategy="fsdp2")
    stamp = tmp / "killed-at"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runner = [str(TESTS / "kill_runner.py"), "--kill-at-forward", "5", "--rank", "1", "--"]
    env = {**_env(), "KILL_STAMP": str(stamp)}
    cmd = [*torchrun, "--nproc_per_node", "2", *runner, "train", str(cfg), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    ended = time.time()
    assert out.returncode != 0
    assert ended - float(stamp.read_text()) < 60  # the survivor is stopped, no hang
    assert "exitcode: -9" in out.stderr or "SIGKILL" in out.stderr  # which rank died, and how
    steps = sorted(p.name for p in (tmp / "killed" / "checkpoints").glob("step-*"))
    assert steps == ["step-000002"]
    _ok(_run(_cli("train", str(cfg), "--quiet", "--resume", "auto", "--nproc", "2")))
    a, b = _weights(tmp / "two"), _weights(tmp / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_full_finetune_matches_one(tmp_path, tiny_model_dir, one_thread):
    data = write_toy_messages(tmp_path / "train.jsonl", n=24)
    full = {"name": "full"}
    common = {"max_steps": 2, "lr": 1e-3, "grad_accum": 1, "scheduler": "constant"}
    cfgs = {}
    for name, train in (
        ("one", {"batch_size": 4}),
        ("two", {"batch_size": 2, "strategy": "fsdp2"}),
    ):
        cfgs[name] = write_run_config(
            tmp_path / f"{name}.yaml",
            tiny_model_dir,
            data,
            tmp_path / name,
            method=full,
            train={**common, **train},
            data={"train": str(data), "validation": None, "max_length": 64},
            eval={"every_steps": None},
            checkpoint={"every_steps": None, "at_epoch_end": False},
        )
    _train_here(cfgs["one"])
    _ok(_run(_cli("train", str(cfgs["two"]), "--quiet", "--nproc", "2")))
    a, b = _weights(tmp_path / "one", "model"), _weights(tmp_path / "two", "model")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_port_in_use_is_one_clear_error(tmp_path, tiny_model_dir, capsys):
    """Checked by the launching process before any rank starts: in this process is enough."""
    data = write_toy_messages(tmp_path / "train.jsonl", n=8)
    cfg = _config(tmp_path, "run", tiny_model_dir, data, strategy="fsdp2")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["train", str(cfg), "--nproc", "2", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: --port {port}: the port is in use on 127.0.0.1" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ranks_with_different_configs_refuse_to_start(tmp_path, tiny_model_dir):
    """Two 'nodes' (two torchrun agents, one process each) whose config files differ."""
    data = write_toy_messages(tmp_path / "train.jsonl", n=8)
    port = _free_port()
    procs = []
    for node, lr in ((0, 1e-2), (1, 2e-2)):
        cfg = _config(tmp_path, f"node{node}", tiny_model_dir, data, lr=lr, strategy="ddp")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "mismatch",
            "-m",
            "tuneforge.cli",
            "train",
            str(cfg),
            "--quiet",
        ]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode != 0
        assert "error: the ranks run different configs (rank 0 " in err, err[-2000:]
        assert "every node must run the same config file" in err
    assert not (tmp_path / "node0" / "adapter").exists()

"""The same loop under torchrun as 2-process DDP (gloo, CPU) equals one process with the global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main

from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.dist


def _train(cfg, nproc):
    """`tuneforge train` on `nproc` processes under torchrun; one process runs in this one (the
    same command, minus an interpreter start; the `one_thread` fixture keeps it on one thread)."""
    if nproc == 1:
        assert main(["train", str(cfg), "--quiet"]) == 0
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "tuneforge.cli",
        "train",
        str(cfg),
        "--quiet",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_ddp_two_processes_match_one(tmp_path, tiny_model_dir, one_thread):
    data = write_toy_messages(tmp_path / "train.jsonl", n=40)
    common = dict(train={"max_steps": 4, "lr": 1e-2, "grad_accum": 2})
    one = write_run_config(
        tmp_path / "one.yaml",
        tiny_model_dir,
        data,
        tmp_path / "one",
        **{**common, "train": {**common["train"], "batch_size": 4}},
    )
    two = write_run_config(
        tmp_path / "two.yaml",
        tiny_model_dir,
        data,
        tmp_path / "two",
        **{**common, "train": {**common["train"], "batch_size": 2}},
    )
    _train(one, 1)
    _train(two, 2)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert any(
        k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in base.items()
    )  # it trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["train_tokens"] == s2["train_tokens"]
    assert s1["final_train_loss"] == pytest.approx(s2["final_train_loss"], rel=1e-4)

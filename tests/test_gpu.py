"""The GPU path on a CUDA machine (bench/gpu_check.sh runs these): bf16 with SDPA and the fused
loss, liger-kernel, FSDP2 and DeepSpeed ZeRO-2/3 through `--nproc 1`, QLoRA on CUDA.

Skipped only where CUDA is absent. Tolerances are bf16's: runs that differ only in kernels or
engine agree on the final loss within 2 %.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_run_config, write_toy_messages

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: the GPU path needs one (bench/gpu_check.sh runs these on a GPU)"
NO_DEEPSPEED_ON_CPU = (
    "DeepSpeed cannot run here: tuneforge drives it through accelerate's integration, which on "
    "a CPU gives every rank process index 0 and world size 1 (measured: deepspeed 0.19.8, "
    "accelerate 1.15), so the ranks would train on the same rows; it also JIT-compiles a "
    "shared-memory op for about 11 min on first use. bench/gpu_check.sh runs this on a GPU"
)
pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)

TRAIN = {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "scheduler": "constant"}


def _config(tmp: Path, name: str, model_dir: Path, data: Path, **sections) -> Path:
    train = {**TRAIN, **sections.pop("train", {})}
    model = {"name": str(model_dir), "dtype": "auto", **sections.pop("model", {})}
    return write_run_config(
        tmp / f"{name}.yaml",
        model_dir,
        data,
        tmp / name,
        model=model,
        train=train,
        checkpoint={"every_steps": None, "at_epoch_end": False},
        **sections,
    )


def _train(cfg: Path, *extra: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tuneforge.cli", "train", str(cfg), "--quiet", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = Path(cfg).with_suffix("")
    return {
        "summary": json.loads((run / "summary.json").read_text()),
        "manifest": json.loads((run / "manifest.json").read_text()),
        "run": run,
    }


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    return tmp, write_toy_messages(tmp / "train.jsonl", n=64)


@pytest.fixture(scope="module")
def bf16_run(gpu_data, tiny_model_dir):
    tmp, data = gpu_data
    return _train(_config(tmp, "bf16", tiny_model_dir, data))


@requires_cuda
def test_bf16_sdpa_and_the_fused_loss_on_cuda(bf16_run, tiny_model_dir):
    from tuneforge.models import load_model
    from tuneforge.train.loss import CausalLMLoss

    m, s = bf16_run["manifest"], bf16_run["summary"]
    assert m["device"].startswith("cuda") and m["dtype"] == "bfloat16"
    assert s["final_train_loss"] < s["train_loss"] < 6.0  # it learns
    model = load_model(tiny_model_dir, torch.bfloat16, attn_implementation="sdpa").cuda()
    assert model.config._attn_implementation == "sdpa"
    assert CausalLMLoss(model).fast  # labelled positions only, logits never whole


@requires_cuda
def test_liger_kernel_matches_the_plain_kernels(gpu_data, tiny_model_dir, bf16_run):
    import liger_kernel  # noqa: F401  (bench/gpu_check.sh installs it: missing is a failure)

    tmp, data = gpu_data
    liger = _train(_config(tmp, "liger", tiny_model_dir, data, train={"liger_kernel": True}))
    assert liger["manifest"]["liger_kernel"] is True
    plain = bf16_run["summary"]["final_train_loss"]
    assert liger["summary"]["final_train_loss"] == pytest.approx(plain, rel=2e-2)


@requires_cuda
@pytest.mark.dist
def test_fsdp2_on_the_gpu_matches_one_process(gpu_data, tiny_model_dir, bf16_run):
    tmp, data = gpu_data
    out = _train(
        _config(tmp, "fsdp2", tiny_model_dir, data, train={"strategy": "fsdp2"}), "--nproc", "1"
    )
    assert out["manifest"]["strategy"] == "fsdp2"
    plain = bf16_run["summary"]["final_train_loss"]
    assert out["summary"]["final_train_loss"] == pytest.approx(plain, rel=2e-2)
    weights = load_file(out["run"] / "adapter" / "adapter_model.safetensors")
    assert all(t.numel() > 0 and t.dim() == 2 for t in weights.values())


@pytest.mark.skipif(not CUDA, reason=NO_DEEPSPEED_ON_CPU)
@pytest.mark.dist
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_and_exports_a_whole_adapter(gpu_data, tiny_model_dir, stage):
    """ZeRO-2 and ZeRO-3 (weights sharded too) train and save a plain, whole PEFT adapter."""
    import deepspeed  # noqa: F401  (bench/gpu_check.sh installs tuneforge[deepspeed])

    tmp, data = gpu_data
    train = {"strategy": "deepspeed", "zero_stage": stage}
    out = _train(_config(tmp, f"zero{stage}", tiny_model_dir, data, train=train), "--nproc", "1")
    s = out["summary"]
    assert out["manifest"]["strategy"] == "deepspeed"
    assert s["final_train_loss"] < s["train_loss"]
    weights = load_file(out["run"] / "adapter" / "adapter_model.safetensors")
    assert all(t.numel() > 0 and t.dim() == 2 for t in weights.values())  # gathered, not shards


@requires_cuda
def test_qlora_on_cuda(gpu_data, tiny_model_dir):
    tmp, data = gpu_data
    out = _train(_config(tmp, "qlora", tiny_model_dir, data, model={"quantize": "nf4"}))
    assert out["manifest"]["quantize"] == "nf4" and out["manifest"]["dtype"] == "bfloat16"
    assert out["summary"]["final_train_loss"] < out["summary"]["train_loss"]

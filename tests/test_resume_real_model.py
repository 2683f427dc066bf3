"""R1 on the real embedded model in its default dtype (bf16 weights, fp32 trainable LoRA weights and
optimizer state, bf16 autocast): SIGKILL mid-accumulation, resume, bit-identical result."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kill_runner import checkpoint_steps, comparable, finish, records, run_trainer, start_trainer
from tuneforge.models import cpu_supports_bf16

from helpers import write_run_config, write_toy_messages

pytestmark = pytest.mark.slow


def test_real_model_kill_and_resume_is_bit_identical(tmp_path):
    data = write_toy_messages(tmp_path / "train.jsonl", n=16, seed=4)
    cfgs = {}
    for name in ("base", "run"):
        cfgs[name] = write_run_config(
            tmp_path / f"{name}.yaml",
            "smollm2-135m-instruct",
            data,
            tmp_path / name,
            model={"name": "smollm2-135m-instruct", "dtype": "auto"},
            method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.05},
            data={"validation": None, "max_length": 48},
            train={
                "max_steps": 3,
                "batch_size": 1,
                "grad_accum": 2,
                "lr": 2e-3,
                "scheduler": "linear",
                "seed": 0,
            },  # fmt: skip
            eval={"every_steps": None},
            checkpoint={"every_steps": 1, "keep_last": 2},
            log={"report": False},
        )
    base = start_trainer(cfgs["base"])
    rc, log = run_trainer(cfgs["run"], "--kill-at-forward", "4")  # step 2, second micro-batch
    assert rc == -9, log[-2000:]
    assert checkpoint_steps(tmp_path / "run") == [1]
    rc, log = run_trainer(cfgs["run"], resume=True)
    assert rc == 0, log[-2000:]
    rc, log = finish(base)
    assert rc == 0, log[-2000:]

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["dtype"] == ("bfloat16" if cpu_supports_bf16() else "float32")
    for rel in ["adapter/adapter_model.safetensors", "checkpoints/step-000003/model.safetensors"]:
        a, b = load_file(tmp_path / "base" / rel), load_file(tmp_path / "run" / rel)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{rel}: {key}"
    state = load_file(tmp_path / "run" / "checkpoints/step-000003/optimizer.safetensors")
    assert {t.dtype for t in state.values() if t.ndim} == {torch.float32}
    assert comparable(records(tmp_path / "base")) == comparable(records(tmp_path / "run"))

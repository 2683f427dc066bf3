"""End to end on a tiny random model: train through the CLI, check the run dir, reload and generate."""

import json
import subprocess
import sys

import pytest
import torch

from tuneforge.cli import main
from tuneforge.loading import generate, load_reference

from helpers import write_run_config, write_toy_messages


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora-run")
    data = write_toy_messages(tmp / "train.jsonl", n=64)
    cfg = write_run_config(tmp / "run.yaml", tiny_model_dir, data, tmp / "run")
    assert main(["train", str(cfg), "--quiet"]) == 0
    return tmp / "run"


def test_run_dir_layout(lora_run):
    for name in ["config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "tokenizer"]:
        assert (lora_run / name).exists(), name
    assert (lora_run / "adapter" / "adapter_config.json").is_file()
    assert (lora_run / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(lora_run.rglob("*.bin")) and not list(lora_run.rglob("*.pt"))


def test_summary_and_manifest_numbers(lora_run):
    summary = json.loads((lora_run / "summary.json").read_text())
    for key in [
        "train_runtime_s",
        "train_tokens",
        "tokens_per_s",
        "peak_memory_mb",
        "train_loss",
        "eval",
    ]:
        assert key in summary, key
    assert summary["steps"] == 8 and summary["train_tokens"] > 0
    assert summary["eval"]["eval_loss"] > 0
    manifest = json.loads((lora_run / "manifest.json").read_text())
    assert manifest["data"]["rows_read"] == 64
    assert manifest["data"]["rows_used"] == 64
    assert len(manifest["data"]["files"]["train"]["sha256"]) == 64
    assert manifest["base_model"]["fingerprint"]
    lines = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == list(range(1, 9))
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]


def test_loss_falls_on_the_toy_task(lora_run):
    lines = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0]


def test_plain_peft_load_gives_the_same_logits(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()
    ours = load_reference(lora_run, dtype="fp32").model
    ids = torch.tensor([[1, 5, 9, 30, 77, 2]])
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = ours(input_ids=ids).logits
    assert torch.equal(a, b)
    # and the adapter changed the model
    with torch.no_grad():
        c = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(
            input_ids=ids
        ).logits
    assert not torch.allclose(a, c)


def _greedy(loaded, prompt: str, n: int) -> list[int]:
    """The model's own greedy continuation of the templated prompt, n tokens, no stopping."""
    from tuneforge.data.templates import render_prompt

    ids = torch.tensor([render_prompt(loaded.tokenizer, [{"role": "user", "content": prompt}])])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, loaded.model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    return ids[0, -n:].tolist()


def test_generate_uses_template_and_stops_at_eos(lora_run):
    loaded = load_reference(lora_run, dtype="fp32")
    tok = loaded.tokenizer
    greedy = _greedy(loaded, "Color of sky?", 12)
    # Make a greedy token the end-of-sequence token: generation must stop at its first occurrence
    # and show neither it nor anything after it.
    k = max(i for i in range(12) if greedy[i] not in greedy[:i])  # its first occurrence
    tok.eos_token = tok.convert_ids_to_tokens(greedy[k])
    text = generate(loaded, "Color of sky?", max_new_tokens=20)
    assert text == tok.decode(greedy[:k], skip_special_tokens=True)
    loaded = load_reference(lora_run, dtype="fp32")  # the run's own EOS again
    text = generate(loaded, "Color of sky?", max_new_tokens=20)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneforge.cli",
            "generate",
            "--model",
            str(lora_run),
            "--prompt",
            "Color of sky?",
            "--max-new-tokens",
            "20",
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == text + "\n"  # the answer, ended by a newline, and nothing else
    assert "Warning" not in out.stderr  # third-party deprecation noise stays out (see -v)


def test_full_finetune_saves_a_model(tmp_path, tiny_model_dir):
    data = write_toy_messages(tmp_path / "train.jsonl", n=32)
    cfg = write_run_config(
        tmp_path / "full.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        method={"name": "full"},
        train={"max_steps": 4, "lr": 1e-3},
    )
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "run"
    assert (run / "model" / "config.json").is_file() and not (run / "adapter").exists()
    loaded = load_reference(run, dtype="fp32")
    assert loaded.kind == "model"
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    changed = [
        n for n, p in loaded.model.named_parameters() if not torch.equal(p, base.get_parameter(n))
    ]
    assert len(changed) == len(list(base.parameters()))


def test_bad_config_fails_before_loading(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  max_stepz: 3\n")
    assert main(["train", str(cfg)]) == 2
    assert "train.max_stepz: unknown key" in capsys.readouterr().err


def test_nonempty_output_dir_is_refused(tmp_path, tiny_model_dir):
    data = write_toy_messages(tmp_path / "train.jsonl", n=16)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    cfg = write_run_config(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "run")
    assert main(["train", str(cfg), "--quiet"]) == 2
    assert (tmp_path / "run" / "keep.txt").read_text() == "x"


def test_data_check_reports_counts_and_mask(tmp_path, tiny_model_dir, capsys):
    data = write_toy_messages(tmp_path / "train.jsonl", n=20)
    with data.open("a") as fh:
        fh.write('{"messages": [{"role": "user", "content": "hi"}]}\n')  # no assistant turn
    cfg = write_run_config(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "run")
    assert main(["data", "check", str(cfg)]) == 2  # on_bad_row: fail names the row
    assert "train.jsonl:21:" in capsys.readouterr().err
    assert main(["data", "check", str(cfg), "data.on_bad_row=skip"]) == 0
    out = capsys.readouterr().out
    assert "read 21" in out and "used 20" in out
    assert "[[" in out and "]]" in out  # the loss mask is shown

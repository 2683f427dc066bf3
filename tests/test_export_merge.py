"""Merged export: the adapter folded into the base gives the logits of base + adapter, on every
tiny architecture and for LoRA and IA3, and the saved directory loads with transformers alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from exporthelpers import random_adapter, tiny_base
from tuneforge.errors import ExportError
from tuneforge.export.chatformat import stop_ids
from tuneforge.export.merge import check_adapter_files, merge_adapter, save_hf_dir

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def _peft_logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_tokenizer, one_thread, arch, method):
    base = tiny_base(tmp_path / "base", tiny_tokenizer, arch)
    adapter = random_adapter(base, tmp_path / "adapter", method)
    expected = _peft_logits(base, adapter)
    merged = merge_adapter(base, adapter, torch.float32)
    with torch.no_grad():
        got = merged(IDS).logits
        plain = merged.__class__.from_pretrained(str(base), dtype=torch.float32).eval()(IDS).logits
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)  # ...and merging keeps it


def test_merged_dir_loads_without_tuneforge(tmp_path, tiny_tokenizer, one_thread):
    base = tiny_base(tmp_path / "base", tiny_tokenizer)
    adapter = random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    merged = merge_adapter(base, adapter, torch.float32)
    save_hf_dir(merged, tiny_tokenizer, out, stop_ids(tiny_tokenizer))
    with torch.no_grad():
        expected = merged(IDS).logits[0, -1].tolist()
    script = (
        "import json, sys, torch\n"
        "sys.modules['tuneforge'] = None  # any tuneforge import now fails\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad(): last = m(ids).logits[0, -1].tolist()\n"
        "print(json.dumps({'last': last, 'eos': m.generation_config.eos_token_id,\n"
        "  'chat': t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False,\n"
        "  add_generation_prompt=True)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["last"] == pytest.approx(expected, abs=1e-6)
    assert got["eos"] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert got["chat"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))


def test_truncated_adapter_is_refused(tmp_path, tiny_tokenizer):
    base = tiny_base(tmp_path / "base", tiny_tokenizer)
    adapter = random_adapter(base, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match="corrupt or truncated"):
        check_adapter_files(adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ExportError, match="unreadable adapter config"):
        check_adapter_files(adapter)

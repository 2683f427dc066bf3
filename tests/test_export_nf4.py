"""NF4 export with bitsandbytes on this CPU: the saved 4-bit model reloads with plain
`from_pretrained` bit for bit, its linear layers are 4-bit, and it stays close to fp32."""

from __future__ import annotations

import torch

from exporthelpers import tiny_base
from tuneforge.export.merge import weights_bytes
from tuneforge.export.nf4 import write_nf4

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def test_nf4_saves_reloads_and_stays_close(tmp_path, tiny_tokenizer, one_thread):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    base = tiny_base(tmp_path / "base", tiny_tokenizer, hidden_size=64, intermediate_size=128)
    out = write_nf4(base, tiny_tokenizer, tmp_path / "nf4", torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    fp32 = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert reloaded.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert weights_bytes(out / "model.safetensors") < 0.5 * weights_bytes(
        base / "model.safetensors"
    )
    again = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
    with torch.no_grad():
        got, ref, twice = reloaded(IDS).logits, fp32(IDS).logits, again(IDS).logits
    assert torch.equal(got, twice)
    assert 0 < (got - ref).abs().max() < 0.25 * ref.abs().max()

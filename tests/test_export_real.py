"""Export of the real embedded model (SmolLM2-135M-Instruct), through llama.cpp itself: f16 logits
and 16 greedy tokens match transformers, q8_0 keeps the first 8 greedy tokens, q4_k_m loads,
generates and stays within a stated loss bound; merging a LoRA keeps base + adapter's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.data.formats import Example
from tuneforge.export.evalset import build_eval_set
from tuneforge.export.gguf_write import write_gguf
from tuneforge.export.probe import LlamaCppBackend, TorchBackend, score_examples
from tuneforge.export.quantize import quantize_gguf
from tuneforge.export.recheck import metrics_from
from tuneforge.models import load_tokenizer, resolve_model_dir

pytestmark = pytest.mark.slow

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do bees make?", "Bees make honey."),
    ("What is two plus three?", "Two plus three is five."),
]
#: f16 GGUF vs fp32 transformers on one chat prompt: measured max |diff| 0.07 over all positions
#: (0.025 at the last), logits up to ~38.
F16_LOGIT_ATOL = 0.25
#: q4_k_m held-out loss minus fp32 on QA: measured +0.008 nats (q8_0: -0.003, f16: +0.0007).
Q4_LOSS_BOUND = 0.05


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    tok = load_tokenizer(model_dir)
    out = tmp_path_factory.mktemp("real-gguf")
    f16 = write_gguf(model_dir, tok, model_dir, out / "m-f16.gguf", "f16")
    files = {"f16": f16}
    for quant in ("q8_0", "q4_k_m"):
        files[quant] = quantize_gguf(f16, out / f"m-{quant}.gguf", quant)
    torch_model = TorchBackend("hf", str(model_dir), "fp32", threads=torch.get_num_threads())
    messages = [{"role": "user", "content": QA[0][0]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return {
        "dir": model_dir,
        "tok": tok,
        "files": files,
        "torch": torch_model,
        "ids": ids,
        "greedy": torch_model.greedy(ids, 16),
    }


def _llama(path):
    return LlamaCppBackend(str(path), n_ctx=256, threads=torch.get_num_threads())


def test_f16_logits_and_16_greedy_tokens_match_transformers(real):
    llama = _llama(real["files"]["f16"])
    diff = np.abs(llama.logits(real["ids"]) - real["torch"].logits(real["ids"])).max()
    assert diff < F16_LOGIT_ATOL
    assert llama.greedy(real["ids"], 16) == real["greedy"]
    assert "Paris" in real["tok"].decode(real["greedy"])


def test_q8_0_keeps_the_first_8_greedy_tokens(real):
    assert _llama(real["files"]["q8_0"]).greedy(real["ids"], 8) == real["greedy"][:8]


def test_q4_k_m_generates_and_its_loss_stays_within_bound(real):
    tok = real["tok"]
    llama = _llama(real["files"]["q4_k_m"])
    tokens = llama.greedy(real["ids"], 8)
    assert len(tokens) == 8 and all(0 <= t < len(tok) for t in tokens)
    examples = [
        Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in QA
    ]
    evalset = build_eval_set(tok, examples, classification=False, max_length=128, source="qa")

    def loss(backend):
        raw = {"logprobs": score_examples(backend, evalset)[0]}
        return metrics_from(raw, evalset)["loss"]

    reference, quantised = loss(real["torch"]), loss(llama)
    assert reference < 3.0  # the instruct model knows these answers
    assert abs(quantised - reference) < Q4_LOSS_BOUND
    assert real["files"]["q4_k_m"].stat().st_size < 0.45 * real["files"]["f16"].stat().st_size


def test_merged_lora_equals_base_plus_adapter_on_the_real_model(real, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.export.merge import merge_adapter

    base = AutoModelForCausalLM.from_pretrained(str(real["dir"]), dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([real["ids"]])
    base = AutoModelForCausalLM.from_pretrained(str(real["dir"]), dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        got = merge_adapter(real["dir"], tmp_path / "adapter", torch.float32)(ids).logits
    plain = torch.from_numpy(real["torch"].logits(real["ids"]))
    assert (expected[0] - plain).abs().max() > 0.1  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)

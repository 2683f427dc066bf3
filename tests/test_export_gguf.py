"""GGUF export on the tiny models of every architecture: llama.cpp's logits and greedy tokens match
transformers, transformers' own GGUF reader gets the same weights back, the tokenizer, chat
template and stop tokens in the file behave as the run's tokenizer, and a LoRA adapter written
as GGUF gives llama.cpp the merged model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporthelpers import random_adapter, tiny_base
from tuneforge.errors import ExportError
from tuneforge.export.chatformat import end_of_turn_id
from tuneforge.export.gguf_write import write_gguf
from tuneforge.export.lora_gguf import write_lora_gguf
from tuneforge.export.merge import merge_adapter, save_hf_dir
from tuneforge.export.probe import LlamaCppBackend, TorchBackend
from tuneforge.export.quantize import parse_quant_list, quantize_gguf

ARCHS = ["llama", "qwen2", "gpt2"]
PROMPT = "The quick brown fox jumps over the lazy dog. 这本书很好"
#: f16 weights against fp32 on these tiny models: observed max |diff| ~3e-4; logits are ~0.5.
F16_LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """Per architecture: (base dir, f16 GGUF path)."""
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"gguf-{arch}")
        base = tiny_base(root / "base", tiny_tokenizer, arch)
        out[arch] = base, write_gguf(base, tiny_tokenizer, base, root / "m-f16.gguf", "f16")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_logits_and_greedy_match_transformers(exported, tiny_tokenizer, one_thread, arch):
    base, gguf = exported[arch]
    ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    torch_model = TorchBackend("hf", str(base), "fp32", threads=1)
    llama = LlamaCppBackend(str(gguf), n_ctx=128, threads=1)
    diff = np.abs(llama.logits(ids) - torch_model.logits(ids)).max()
    assert diff < F16_LOGIT_ATOL
    assert llama.greedy(ids, 16) == torch_model.greedy(ids, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_gguf_reader_gets_the_same_weights(exported, one_thread, arch):
    from transformers import AutoModelForCausalLM

    base, gguf = exported[arch]
    original = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict()
    read = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).state_dict()
    for name, weight in original.items():
        if name == "lm_head.weight" and name not in read:
            continue
        expected = weight.half().float() if weight.ndim >= 2 else weight  # f16 matrices, f32 norms
        assert torch.equal(read[name], expected), name


def test_tokenizer_template_and_stop_tokens_in_the_file(exported, tiny_tokenizer):
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, gguf = exported["llama"]
    llama = LlamaCppBackend(str(gguf), n_ctx=128, threads=1)
    meta, tok = llama.llm.metadata, tiny_tokenizer
    eot = end_of_turn_id(tok)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
    assert (
        int(meta["tokenizer.ggml.eot_token_id"]) == eot == tok.convert_tokens_to_ids("<|im_end|>")
    )
    assert meta["tokenizer.ggml.add_bos_token"] == "false"
    vocab = llama_cpp.llama_model_get_vocab(llama.llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, eot)
    assert not llama_cpp.llama_vocab_is_eog(vocab, tok.convert_tokens_to_ids("<|im_start|>"))
    for text in [
        PROMPT,
        "12345 numbers, 3.14!",
        "<|im_start|>user\nhi<|im_end|>\n",
        "  spaces\n\nx",
    ]:
        assert llama.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"], text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Color of snow?"},
        {"role": "assistant", "content": "white"},
        {"role": "user", "content": "And the sky?"},
    ]
    formatter = Jinja2ChatFormatter(
        meta["tokenizer.chat_template"], eos_token=tok.eos_token, bos_token=tok.bos_token
    )
    prompt = formatter(messages=messages).prompt
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert llama.tokenize(prompt) == tok(expected, add_special_tokens=False)["input_ids"]


def test_generation_stops_at_the_end_of_turn_token(tmp_path, tiny_tokenizer, one_thread):
    """A model rigged to answer <|im_end|> at once: llama.cpp and transformers both stop there."""
    from transformers import AutoModelForCausalLM

    base = tiny_base(tmp_path / "base", tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    eot = end_of_turn_id(tiny_tokenizer)
    with torch.no_grad():  # a large constant feature in the residual stream, read by one row
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.lm_head.weight[eot] = 0.0
        model.lm_head.weight[eot, 0] = 20.0
    save_hf_dir(model, tiny_tokenizer, tmp_path / "rigged", [eot])
    gguf = write_gguf(tmp_path / "rigged", tiny_tokenizer, base, tmp_path / "r.gguf", "f16")
    llama = LlamaCppBackend(str(gguf), n_ctx=128, threads=1)
    messages = [{"role": "user", "content": "Color of snow?"}]
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    done = llama.llm.create_completion(ids, max_tokens=8, temperature=0.0)
    assert done["choices"][0]["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 0
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out[0, len(ids) :].tolist() == [eot]


def test_quantised_files_load_and_generate(exported, tiny_tokenizer):
    _, gguf = exported["llama"]
    ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    f16 = LlamaCppBackend(str(gguf), n_ctx=128, threads=1).logits(ids)
    for quant in ("q8_0", "q4_0", "q4_k_m"):
        path = quantize_gguf(gguf, gguf.with_name(f"m-{quant}.gguf"), quant, threads=1)
        assert path.stat().st_size < gguf.stat().st_size
        logits = LlamaCppBackend(str(path), n_ctx=128, threads=1).logits(ids)
        assert 0 < np.abs(logits - f16).max() < 0.1, quant  # changed, but not destroyed


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gguf_adapter_over_base_equals_merged(tmp_path, tiny_tokenizer, one_thread, arch):
    base = tiny_base(tmp_path / "base", tiny_tokenizer, arch)
    adapter = random_adapter(base, tmp_path / "adapter")
    base_gguf = write_gguf(base, tiny_tokenizer, base, tmp_path / "base-f32.gguf", "f32")
    lora = write_lora_gguf(adapter, base, tmp_path / "lora.gguf")
    ids = tiny_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    merged = TorchBackend("hf", str(base), "fp32", threads=1)
    plain_torch = merged.logits(ids)
    merged.model = merge_adapter(base, adapter, torch.float32)
    expected = merged.logits(ids)
    plain = LlamaCppBackend(str(base_gguf), n_ctx=128, threads=1).logits(ids)
    got = LlamaCppBackend(str(base_gguf), n_ctx=128, threads=1, lora=str(lora)).logits(ids)
    effect, effect_cpp = expected - plain_torch, got - plain  # what the adapter changes
    assert np.abs(effect).max() > 0.1
    # The scale folded into B is exact (a fitted ratio of 1), and the change matches position
    # by position up to llama.cpp's arithmetic (measured: 0.07-0.14 % of the change).
    ratio = float((effect * effect_cpp).sum() / (effect * effect).sum())
    assert abs(ratio - 1) < 1e-3
    assert np.abs(effect_cpp - effect).max() < 5e-3 * np.abs(effect).max()


def test_unknown_quant_and_architecture_are_refused(tmp_path, tiny_tokenizer):
    import json

    with pytest.raises(ExportError, match="q9_x"):
        parse_quant_list("q8_0,q9_x")
    assert parse_quant_list("Q8_0, q4_k_m,q8_0") == ["q8_0", "q4_k_m"]
    base = tiny_base(tmp_path / "base", tiny_tokenizer)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match="MambaForCausalLM cannot be written as GGUF"):
        write_gguf(base, tiny_tokenizer, base, out, "f16")
    assert not out.exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_probe_scores_reuse_the_kv_cache_exactly(exported, tiny_tokenizer, one_thread, arch):
    """score_examples reads label answers from the example's own forward and cut-back KV caches;
    it must give what one full forward per (prompt + answer) gives, on both backends, including
    an example that does not start with its prompt (fresh prompt forward) and answers of 1-3
    tokens."""
    from tuneforge.export.evalset import EvalSet
    from tuneforge.export.probe import _log_softmax_rows, score_examples

    enc = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("The quick brown fox"), enc("这本书很好 and the dog")]
    answers = [enc(" jumps"), enc(" sleeps over"), enc(" is lazy today")]
    sequences = [prompts[0] + answers[1], enc("Another text entirely")]
    masks = [[t >= len(prompts[0]) for t in range(len(sequences[0]))], [True] * len(sequences[1])]
    evalset = EvalSet(sequences, masks, labels=["a", "b", "c"], prompts=prompts, answers=answers)
    base, gguf = exported[arch]
    for backend in (TorchBackend("hf", str(base), "fp32", 1), LlamaCppBackend(str(gguf), 128, 1)):
        logprobs, scores = score_examples(backend, evalset)
        for i, prompt in enumerate(prompts):
            for j, answer in enumerate(answers):
                ids = prompt + answer
                logp = _log_softmax_rows(backend.logits(ids)[:-1])
                want = sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids)))
                assert scores[i][j] == pytest.approx(want, abs=1e-4), (i, j)
        for ids, mask, got in zip(sequences, masks, logprobs, strict=True):
            logp = _log_softmax_rows(backend.logits(ids)[:-1])
            want = [logp[t - 1, ids[t]] if mask[t] else 0.0 for t in range(1, len(ids))]
            assert got == pytest.approx(want, abs=1e-4)

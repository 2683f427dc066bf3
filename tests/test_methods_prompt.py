"""Prefix / prompt / P-tuning at inference: the loaded-model wrapper matches peft's training forward,
continues correctly from a KV cache (as batched label scoring does), and generates the model's own
greedy tokens, also for a left-padded batch. peft's own generate() does not (peft #2131)."""

import pytest
import torch

from tuneforge.methods._prompt_runtime import PromptLearningLM

from conftest import build_tiny_gpt2, build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _peft(kind: str, arch: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    config = {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prompt": PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"
        ),
        "ptuning": PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16
        ),
    }[kind]
    base = build_tiny_llama(300, initializer_range=0.2) if arch == "llama" else build_tiny_gpt2(300)
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking prompt, so that it matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model.eval()


CASES = [(k, a) for k in ("prefix", "prompt", "ptuning") for a in ("llama", "gpt2")]


def _greedy(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("kind,arch", CASES)
def test_wrapper_is_the_training_forward_and_continues_from_cache(kind, arch):
    peft_model = _peft(kind, arch)
    wrapped = PromptLearningLM(peft_model)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as in training
    with torch.no_grad():
        ours = wrapped(input_ids=ids, attention_mask=mask).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :]
        assert torch.equal(ours, theirs)
        head = wrapped(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        tail = wrapped(input_ids=ids[:, 5:], attention_mask=mask, cache=head.cache, use_cache=True)
    torch.testing.assert_close(tail.logits[0], ours[0, 5:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,arch", CASES)
def test_generate_is_greedy_also_for_a_left_padded_batch(kind, arch):
    wrapped = PromptLearningLM(_peft(kind, arch))
    long = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    short = long[:, 3:]
    one = wrapped.generate(input_ids=long, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    assert torch.equal(one, _greedy(wrapped, long, 6))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    both = wrapped.generate(
        input_ids=batch, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0
    )
    alone = wrapped.generate(input_ids=short, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    assert torch.equal(both[0], one[0])
    assert torch.equal(both[1, 8:], alone[0, 5:])


def test_generate_stops_at_eos_and_rejects_unknown_options():
    wrapped = PromptLearningLM(_peft("prompt", "llama"))
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    first = int(_greedy(wrapped, ids, 1)[0, -1])
    out = wrapped.generate(input_ids=ids, max_new_tokens=5, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1 and int(out[0, -1]) == first
    with pytest.raises(TypeError, match="num_beams"):
        wrapped.generate(input_ids=ids, num_beams=4)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_cached_label_scoring_agrees_with_full_sequences(kind, tmp_path, tiny_tokenizer):
    """`tuneforge eval` accuracy continues each label from the prompt's KV cache; through the
    wrapper that must pick the same labels as scoring every full sequence from scratch."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from tuneforge.data.formats import load_examples
    from tuneforge.data.pipeline import TokenizedExample, collate
    from tuneforge.data.templates import render
    from tuneforge.evaluation.runner import _with_answer, label_predictions, sequence_logprobs

    from helpers import COLORS, write_toy_messages

    config = {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }[kind]
    base = build_tiny_llama(len(tiny_tokenizer), initializer_range=1.0)  # input-sensitive
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    wrapped = PromptLearningLM(model).eval()
    examples = load_examples(write_toy_messages(tmp_path / "t.jsonl", n=12), "auto").examples
    labels = sorted(COLORS)
    preds = label_predictions(wrapped, tiny_tokenizer, examples, labels, batch_size=4)
    expected = []
    for ex in examples:
        items = [
            TokenizedExample(*render(tiny_tokenizer, _with_answer(ex, lab)), "") for lab in labels
        ]
        logp, _ = sequence_logprobs(wrapped, collate(items, pad_id=tiny_tokenizer.pad_token_id))
        expected.append(labels[int(logp.argmax())])
    assert preds == expected
    assert len(set(expected)) > 1  # the prompt really steers the choice


def test_generate_reads_a_generation_config_as_evaluation_passes_it():
    from transformers import GenerationConfig

    wrapped = PromptLearningLM(_peft("prefix", "llama"))
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    config = GenerationConfig(max_new_tokens=3, do_sample=False, num_beams=1, eos_token_id=[])
    out = wrapped.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
    )
    assert torch.equal(out, _greedy(wrapped, ids, 3))


def test_training_time_evaluation_uses_the_wrapper(tmp_path, tiny_model_dir, monkeypatch):
    """eval.generate / accuracy during training see the same model as a reloaded run."""
    import tuneforge.recipes.parts as parts
    import tuneforge.recipes.train as recipe
    from tuneforge.config import load_config

    from helpers import write_run_config, write_toy_messages

    seen = []
    scorer = parts.ValidationScorer.__call__

    def spy(self, model, accelerator):
        seen.append(type(model).__name__)
        return scorer(self, model, accelerator)

    data = write_toy_messages(tmp_path / "train.jsonl", n=24)
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tiny_model_dir,
        data,
        tmp_path / "run",
        method={"name": "prompt", "num_virtual_tokens": 3},
        train={"max_steps": 2, "lr": 0.1},
        eval={"every_steps": None, "metrics": ["loss", "exact_match"], "generate": True},
        log={"report": False},
    )
    monkeypatch.setattr(parts.ValidationScorer, "__call__", spy)
    summary = recipe.run_training(load_config(cfg), show_progress=False).summary
    assert seen == ["PromptLearningLM"]
    assert "eval_exact_match" in summary["eval"]

"""The packed evaluation pass equals the full-logits reference (`sequence_logprobs`, one padded
batch per example) to 1e-5 in fp32: loss, every row's log-likelihood of every label, accuracy."""

import math

import pytest
import torch

from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import render
from tuneforge.evaluation.generation import generate_batched
from tuneforge.evaluation.offline import fold_adapters
from tuneforge.evaluation.packed import (
    MIN_PREFIX,
    pack_rows,
    packed_attention,
    packed_pass,
    plan_rows,
    shared_prefix,
    with_answer,
)
from tuneforge.evaluation.runner import evaluate_examples, sequence_logprobs

from conftest import build_tiny_gpt2, build_tiny_llama, build_tiny_qwen2

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

LONG = "The quick brown fox jumps over the lazy dog. 这本书很好，我很喜欢。" * 3
TEXTS = ["hi", LONG, "good book", "bad bad review " * 4, "two plus two", "质量太差了", "fox"]
# Multi-token labels, two sharing their first tokens, and one answer ("maybe") no label is.
ANSWERS = ["good", "bad bad", "bad", "good", "maybe", "bad", "bad bad"]
LABELS = ["bad", "bad bad", "good"]
# A templated set's shared instruction: packs forward it once and pack only what follows.
ASK = "Is the review positive or negative? Answer with one word.\n\nReview: "


def _examples(texts=TEXTS, answers=ANSWERS, ask=ASK):
    return [
        Example(
            messages=[{"role": "user", "content": ask + t}, {"role": "assistant", "content": a}],
            label=a if a in LABELS else "good",  # the class of an answer that is no label
            source=f"t:{i}",
        )
        for i, (t, a) in enumerate(zip(texts, answers, strict=True))
    ]


def _reference_loss(model, tok, examples) -> float:
    """Token-weighted mean negative log-likelihood from full logits, all rows in one padded batch."""
    items = [TokenizedExample(*render(tok, ex), "") for ex in examples]
    logp, count = sequence_logprobs(model, collate(items, pad_id=tok.pad_token_id))
    return float(-logp.sum() / count.sum())


def _reference_scores(model, tok, examples, labels) -> torch.Tensor:
    """[examples, labels]: each full sequence (prompt + label answer) scored from full logits."""
    out = torch.empty(len(examples), len(labels), dtype=torch.float64)
    for i, ex in enumerate(examples):
        items = [TokenizedExample(*render(tok, with_answer(ex, lab)), "") for lab in labels]
        out[i] = sequence_logprobs(model, collate(items, pad_id=tok.pad_token_id))[0].double()
    return out


@pytest.mark.parametrize("ask", [ASK, ""], ids=["shared-prefix", "no-prefix"])
@pytest.mark.parametrize("max_tokens", [1, 150, 330, 100_000])
def test_packed_pass_equals_full_logits(tiny_tokenizer, max_tokens, ask):
    """Every pack size: each row alone (budget below any row), uneven packs, all in one pack;
    rows sharing a long instruction (forwarded once per pack) and rows sharing 3 tokens."""
    model = build_tiny_llama(len(tiny_tokenizer), initializer_range=0.5).eval()
    examples = _examples(ask=ask)
    rows, _ = plan_rows(tiny_tokenizer, examples, LABELS, loss=True)
    assert (shared_prefix(rows) >= MIN_PREFIX) == bool(ask)
    lengths = [len(render(tiny_tokenizer, ex)[0]) for ex in examples]
    assert max(lengths) > 2 * min(lengths)  # rows of very different lengths
    with torch.no_grad():
        want_loss = _reference_loss(model, tiny_tokenizer, examples)
        want = _reference_scores(model, tiny_tokenizer, examples, LABELS)
    with packed_attention(model) as packable:
        assert packable
        got = packed_pass(model, tiny_tokenizer, examples, LABELS, loss=True, max_tokens=max_tokens)
    assert math.isclose(got.loss_sum / got.tokens, want_loss, rel_tol=1e-5)
    torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-5)
    assert float(want.std(0).min()) > 0.1  # every label's score depends on the row


def test_packs_hold_at_most_the_budget():
    from tuneforge.evaluation.packed import Row

    rows = [Row([0] * n, [0] * n, i) for i, n in enumerate([5, 40, 7, 12, 30, 3])]
    packs = pack_rows(rows, 20)
    assert [[len(r.ids) for r in p] for p in packs] == [[40], [30], [12, 7], [5, 3]]
    assert sorted(r.example for p in packs for r in p) == list(range(6))


def _check_against_reference(model, tok, examples, labels, batch_size, **options):
    with torch.no_grad():
        want_loss = _reference_loss(model, tok, examples)
        scores = _reference_scores(model, tok, examples, labels)
    got = evaluate_examples(
        model, tok, examples, ["loss", "accuracy"], batch_size, labels=labels, **options
    )
    refs = [ex.label for ex in examples]
    preds = [labels[j] for j in scores.argmax(-1).tolist()]
    accuracy = 100 * sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
    assert math.isclose(got["loss"], want_loss, rel_tol=1e-5)
    assert math.isclose(got["accuracy"], accuracy, abs_tol=1e-9)
    return got


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_evaluate_examples_equals_reference(tiny_tokenizer, arch):
    """Llama and Qwen2 pack; GPT-2 packs where the probe finds its examples kept apart (this
    transformers passes it the position ids), else keeps the padded path: equal either way."""
    build = {"llama": build_tiny_llama, "qwen2": build_tiny_qwen2, "gpt2": build_tiny_gpt2}
    model = build[arch](len(tiny_tokenizer)).eval()
    with packed_attention(model) as packable:
        assert packable or arch == "gpt2"
    # batch size 3 over 7 rows: a pack budget of 1536 tokens, and 3 + 3 + 1 padded rows
    _check_against_reference(model, tiny_tokenizer, _examples(), LABELS, 3)
    _check_against_reference(model, tiny_tokenizer, _examples(), LABELS, 1, batch_tokens=150)
    _check_against_reference(model, tiny_tokenizer, _examples(ask=""), LABELS, 1)
    assert model.config._attn_implementation == "sdpa"  # put back as it was


def test_prompt_learning_keeps_the_padded_path(tiny_tokenizer):
    """Virtual tokens (positions_aligned=False) never pack: same numbers as the reference."""
    from peft import PromptTuningConfig, get_peft_model

    from tuneforge.methods._prompt_runtime import PromptLearningLM

    base = build_tiny_llama(len(tiny_tokenizer), initializer_range=1.0)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    wrapped = PromptLearningLM(model).eval()
    with packed_attention(wrapped, positions_aligned=False) as packable:
        assert not packable
    _check_against_reference(
        wrapped, tiny_tokenizer, _examples(), LABELS, 3, positions_aligned=False
    )


def test_lora_run_packs_and_folding_keeps_the_numbers(tiny_tokenizer):
    """The quickstart's case: a LoRA adapter on every linear layer, evaluated packed, then merged
    into the fp32 base (what `tuneforge eval` does with a loaded run)."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(len(tiny_tokenizer))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    examples = _examples()
    with packed_attention(model) as packable:
        assert packable
    before = _check_against_reference(model, tiny_tokenizer, examples, LABELS, 2)
    with torch.no_grad():
        scores = _reference_scores(model, tiny_tokenizer, examples, LABELS)
    assert fold_adapters(model)
    after = evaluate_examples(model, tiny_tokenizer, examples, ["loss", "accuracy"], labels=LABELS)
    assert math.isclose(after["loss"], before["loss"], rel_tol=1e-5)
    assert after["accuracy"] == before["accuracy"]
    with torch.no_grad():
        torch.testing.assert_close(
            _reference_scores(model, tiny_tokenizer, examples, LABELS), scores, rtol=1e-5, atol=1e-5
        )


def test_folding_into_bf16_weights_keeps_the_numbers_to_bf16_rounding(tiny_tokenizer):
    """A bf16 base (`dtype: auto` on a bf16 CPU) with fp32 adapters, as `tuneforge eval` loads a
    run there: folded, the loss moves by bf16 rounding only and every label stays the same."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(len(tiny_tokenizer)).to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    examples = _examples()
    before = evaluate_examples(model, tiny_tokenizer, examples, ["loss", "accuracy"], labels=LABELS)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.get_base_layer().weight.detach().clone()
    assert fold_adapters(model)
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert not torch.equal(layer.get_base_layer().weight, weight)  # the delta went in
    after = evaluate_examples(model, tiny_tokenizer, examples, ["loss", "accuracy"], labels=LABELS)
    assert math.isclose(after["loss"], before["loss"], rel_tol=1e-2)
    assert after["accuracy"] == before["accuracy"]


def test_loss_only_plain_text_and_multi_turn_rows(tiny_tokenizer):
    model = build_tiny_qwen2(len(tiny_tokenizer)).eval()
    multi = Example(
        messages=[
            {"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": LONG},
            {"role": "assistant", "content": "good book"},
        ],
        source="m:0",
    )
    examples = [*_examples(), multi, Example(text=LONG, source="p:0")]
    with torch.no_grad():
        want = _reference_loss(model, tiny_tokenizer, examples)
    got = evaluate_examples(model, tiny_tokenizer, examples, ["loss"], 2)
    assert math.isclose(got["loss"], want, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(want), rel_tol=1e-5)


def test_progress_bar_counts_rows(tiny_tokenizer, capsys):
    model = build_tiny_llama(len(tiny_tokenizer)).eval()
    evaluate_examples(model, tiny_tokenizer, _examples(), ["loss", "accuracy"], progress=True)
    err = capsys.readouterr().err
    assert "eval loss + labels" in err and "/7" in err and "row" in err


def test_batched_generation_stops_per_row_like_one_at_a_time(tiny_tokenizer):
    """Left-padded greedy batches give each prompt the tokens it gets alone, each row stopping
    at its own stop token (picked so that some rows stop early and others run to the limit)."""
    model = build_tiny_llama(len(tiny_tokenizer), seed=5).eval()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    opts = dict(pad_id=tiny_tokenizer.pad_token_id, max_new_tokens=12)
    free = generate_batched(model, prompts, stop_ids=set(), batch_size=1, **opts)
    stop = {free[0][3]}  # the first row's fourth token ends its answer
    batched = generate_batched(model, prompts, stop_ids=stop, batch_size=4, **opts)
    single = [generate_batched(model, [p], stop_ids=stop, batch_size=1, **opts)[0] for p in prompts]
    assert batched == single
    assert len(batched[0]) <= 3 and any(len(a) == 12 for a in batched)


def test_a_row_whose_prompt_is_not_the_labels_prompt_is_forwarded_twice(
    tiny_tokenizer, monkeypatch
):
    """Where an example's own rendering does not start with the labels' prompt (a template
    that renders the answer's turn into the context), its loss row and its label row are apart."""
    import tuneforge.evaluation.packed as packed

    model = build_tiny_llama(len(tiny_tokenizer), initializer_range=0.5).eval()
    examples = _examples()
    real = packed.render

    def shifted(tok, ex, *args):  # the examples' own renderings get one more leading token
        ids, labels = real(tok, ex, *args)
        return ([7, *ids], [-100, *labels]) if any(ex is e for e in examples) else (ids, labels)

    monkeypatch.setattr(packed, "render", shifted)
    rows, _ = packed.plan_rows(tiny_tokenizer, examples, LABELS, loss=True)
    assert len(rows) == 2 * len(examples)
    items = [TokenizedExample(*shifted(tiny_tokenizer, ex), "") for ex in examples]
    with torch.no_grad():
        logp, count = sequence_logprobs(model, collate(items, pad_id=tiny_tokenizer.pad_token_id))
        want = _reference_scores(model, tiny_tokenizer, examples, LABELS)
    with packed_attention(model) as packable:
        assert packable
        got = packed_pass(model, tiny_tokenizer, examples, LABELS, loss=True, max_tokens=200)
    assert math.isclose(got.loss_sum / got.tokens, float(-logp.sum() / count.sum()), rel_tol=1e-5)
    torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-5)

"""Generation-based evaluation pieces: prompts and references from training rows, batched greedy
generation with left padding, label accuracy both ways, config checks and `tuneforge eval`."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import build_config
from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample
from tuneforge.data.templates import render, render_prompt
from tuneforge.errors import ConfigError
from tuneforge.evaluation.generation import (
    cut_at_stop,
    generate_batched,
    items_from_tokenized,
    left_pad,
)
from tuneforge.evaluation.metrics import classification_report
from tuneforge.evaluation.runner import label_predictions
from tuneforge.evaluation.score import score_texts
from tuneforge.evaluation.validation import ValidationScorer, score_generations
from tuneforge.loading import generate, load_reference

from conftest import build_tiny_llama
from helpers import write_toy_messages


def _chat(user: str, answer: str, source: str = "t:1", **extra) -> Example:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Example(messages=messages, source=source, **extra)


def _tokenized(tokenizer, examples):
    return [TokenizedExample(*render(tokenizer, ex), source=ex.source) for ex in examples]


class _OneProcess:
    num_processes, process_index = 1, 0


def test_prompt_and_reference_come_from_the_last_assistant_turn(tiny_tokenizer):
    multi = Example(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "Color of sky?"},
            {"role": "assistant", "content": "blue sky"},
        ],
        source="t:2",
    )
    rows = _tokenized(tiny_tokenizer, [_chat("Color of fox?", "red"), multi])
    rows.append(TokenizedExample([5, 6, 7], [5, 6, 7], "t:3"))  # plain text: nothing to answer
    items, stops = items_from_tokenized(rows, tiny_tokenizer)
    assert [i.reference for i in items] == ["red", "blue sky"]
    fox = [{"role": "user", "content": "Color of fox?"}]
    assert items[0].prompt_ids == render_prompt(tiny_tokenizer, fox)
    assert items[1].prompt_ids == render_prompt(tiny_tokenizer, multi.messages[:3])
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


def test_left_padding_and_cutting():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert cut_at_stop([5, 6], {2}) == [5, 6]


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), seed=3).eval()
    texts = ["hello world", "The quick brown fox jumps over the", "这本书", "two plus two is"]
    prompts = [tiny_tokenizer(t)["input_ids"] for t in texts]
    stop = {tiny_tokenizer.eos_token_id}
    opts = dict(pad_id=tiny_tokenizer.pad_token_id, stop_ids=stop, max_new_tokens=10)
    batched = generate_batched(model, prompts, batch_size=4, **opts)
    single = [generate_batched(model, [p], batch_size=1, **opts)[0] for p in prompts]
    assert batched == single
    assert any(len(a) == 10 for a in batched)  # it really generated
    assert all(tiny_tokenizer.eos_token_id not in a for a in batched)


def test_label_accuracy_by_likelihood_matches_the_eval_command_scorer(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer), seed=1).eval()
    texts = ["good book", "bad review", "quick fox", "two plus two", "great", "terrible"]
    labels = ["positive", "negative", "neutral"]
    examples = [_chat(t, labels[i % 3], f"t:{i}", label=labels[i % 3]) for i, t in enumerate(texts)]
    scorer = ValidationScorer(
        tiny_tokenizer, _tokenized(tiny_tokenizer, examples), ["accuracy"], generate=False
    )
    ours = scorer._pick(model, list(range(len(examples))))
    reference = label_predictions(model, tiny_tokenizer, examples, sorted(labels))
    assert ours == reference
    metrics, samples = scorer(model, _OneProcess())
    refs = [ex.label for ex in examples]
    assert metrics == {
        f"eval_{k}": v for k, v in classification_report(ours, refs, sorted(labels)).items()
    }
    assert samples == []


def test_generated_answers_are_matched_to_labels_for_accuracy():
    preds = ["The answer is red.", "blue", "I think green", "no idea"]
    refs = ["red", "red", "green", "blue"]
    out = score_generations(preds, refs, ["exact_match"], labels=["blue", "green", "red"])
    assert out["accuracy"] == 50.0  # red ok, blue wrong, green ok, none wrong
    assert out["exact_match"] == 0.0
    expected = classification_report(["red", "blue", "green", None], refs, ["blue", "green", "red"])
    assert out["macro_f1"] == pytest.approx(expected["macro_f1"])


def test_chinese_references_pick_the_zh_tokenizer(tiny_tokenizer):
    rows = _tokenized(
        tiny_tokenizer, [_chat("书怎么样?", "这本书很好"), _chat("质量?", "质量太差了")]
    )
    scorer = ValidationScorer(tiny_tokenizer, rows, ["bleu", "rouge"], generate=True)
    assert scorer.lang == "zh"
    preds, refs = ["这本书很好", "质量很差"], ["这本书很好", "质量太差了"]
    out = score_generations(preds, refs, ["bleu", "rouge"], lang=scorer.lang)
    assert out["rouge1"] > 0 and "tok:zh" in out["meta"]["signatures"]["bleu"]


def test_accuracy_refuses_free_text_answers(tiny_tokenizer):
    rows = _tokenized(tiny_tokenizer, [_chat(f"q{i}", f"answer {i}") for i in range(60)])
    with pytest.raises(ValueError, match="2 to 50 distinct answers"):
        ValidationScorer(tiny_tokenizer, rows, ["accuracy"], generate=True)
    text_only = [TokenizedExample([5, 6], [5, 6], "t:1")]
    with pytest.raises(ValueError, match="no validation row has a prompt"):
        ValidationScorer(tiny_tokenizer, text_only, ["loss"], generate=True)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"eval": {"metrics": ["loss", "blue"]}}, "eval.metrics: 'blue' is not one of loss"),
        ({"eval": {"metrics": ["rouge"]}}, "eval.metrics: rouge score generated text"),
        (
            {"eval": {"early_stopping": {"metric": "eval_bleu", "mode": "max"}}},
            "eval.early_stopping.metric: 'eval_bleu' is not logged",
        ),
        ({"data": {"validation": None}, "eval": {"generate": True}}, "eval.generate needs"),
        ({"log": {"tensorbord": True}}, "log.tensorbord: unknown key"),
    ],
)
def test_eval_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert str(err.value).startswith(message)


def test_eval_config_accepts_generation_metrics():
    cfg = build_config(
        {
            "eval": {
                "generate": True,
                "metrics": ["loss", "bleu", "rouge", "accuracy"],
                "early_stopping": {"metric": "eval_rougeL", "mode": "max"},
            }
        }
    )
    assert cfg.eval.max_new_tokens == 64 and cfg.log.tensorboard is False


def test_eval_command_scores_generations(tmp_path, tiny_model_dir, capsys):
    data = write_toy_messages(tmp_path / "test.jsonl", n=6, seed=2)
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]
    metrics = "loss,bleu,chrf,rouge,exact_match"
    assert main([*args, "--metrics", metrics, "--max-new-tokens", "6"]) == 0
    row = json.loads(out.read_text())[str(tiny_model_dir)]
    loaded = load_reference(tiny_model_dir, dtype="auto")
    examples = [json.loads(x)["messages"] for x in data.read_text().splitlines()]
    preds = [generate(loaded, m[0]["content"], max_new_tokens=6).strip() for m in examples]
    expected = score_texts(preds, [m[1]["content"] for m in examples], metrics.split(",")[1:])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert row[key] == pytest.approx(expected[key]), key
    assert row["loss"] > 0 and "bleu" in capsys.readouterr().out


def test_eval_command_refuses_unknown_metrics(tmp_path, capsys):
    assert main(["eval", "--model", "x", "--data", "y", "--metrics", "loss,blue"]) == 2
    assert "allowed: loss, perplexity, accuracy" in capsys.readouterr().err


def test_generation_keeps_no_gradients(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer)).train()
    prompts = [tiny_tokenizer("hello")["input_ids"]]
    generate_batched(model, prompts, pad_id=0, stop_ids={2}, max_new_tokens=3, batch_size=1)
    assert model.training  # restored
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()  # no_grad did not leak out

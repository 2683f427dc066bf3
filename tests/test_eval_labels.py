"""Label scoring by log-likelihood: the prefix-shared fast path equals scoring each full sequence."""

import torch

from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import render
from tuneforge.evaluation.runner import (
    _score_answers,
    _split_prompt,
    _with_answer,
    label_predictions,
)

from conftest import build_tiny_llama


def _examples():
    texts = ["good book", "bad bad review", "the quick brown fox jumps", "two plus two"]
    return [
        Example(
            messages=[{"role": "user", "content": t}, {"role": "assistant", "content": "x"}],
            source=f"f:{i}",
        )
        for i, t in enumerate(texts)
    ]


def _slow_scores(model, tokenizer, examples, labels):
    """Reference: one full right-padded forward per (example, label)."""
    out = torch.empty(len(examples), len(labels))
    for i, ex in enumerate(examples):
        for j, label in enumerate(labels):
            ids, lab = render(tokenizer, _with_answer(ex, label))
            batch = collate([TokenizedExample(ids, lab, "")], pad_id=tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1].float()
            target = batch["labels"][0, 1:]
            keep = target != -100
            logp = torch.log_softmax(logits, -1)[keep].gather(-1, target[keep].unsqueeze(-1))
            out[i, j] = logp.sum()
    return out


def test_fast_label_scores_equal_full_sequence_scores(tiny_tokenizer):
    model = build_tiny_llama(len(tiny_tokenizer)).eval()
    examples, labels = _examples(), ["positive", "negative", "great terrible"]
    prompts = [
        _split_prompt(*render(tiny_tokenizer, _with_answer(ex, labels[0])))[0] for ex in examples
    ]
    answers = [
        _split_prompt(*render(tiny_tokenizer, _with_answer(examples[0], lab)))[1] for lab in labels
    ]
    with torch.no_grad():
        fast = _score_answers(model, prompts, answers, tiny_tokenizer.pad_token_id)
        slow = _slow_scores(model, tiny_tokenizer, examples, labels)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    preds = label_predictions(model, tiny_tokenizer, examples, labels, batch_size=3)
    assert preds == [labels[j] for j in slow.argmax(-1).tolist()]

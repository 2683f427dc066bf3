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


def test_eval_loss_equals_full_logit_loss_in_any_batch_order(tiny_tokenizer):
    """The eval loss (training's labelled-positions loss over length-sorted batches) equals the
    token-weighted mean of full-logit log-probabilities, one sequence at a time."""
    import math

    from tuneforge.evaluation.runner import loss_metrics

    model = build_tiny_llama(len(tiny_tokenizer)).eval()
    examples = [_with_answer(ex, a) for ex, a in zip(_examples(), ["yes", "no way", "a", "four"])]
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, lab = render(tiny_tokenizer, ex)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(lab[1:])
            keep = target != -100
            logp = torch.log_softmax(logits, -1)[keep].gather(-1, target[keep].unsqueeze(-1))
            total, count = total - float(logp.sum()), count + int(keep.sum())
    for batch_size in (1, 3):
        got = loss_metrics(model, tiny_tokenizer, examples, batch_size=batch_size)
        assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
        assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-5)

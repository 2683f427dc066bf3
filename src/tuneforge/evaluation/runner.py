"""Evaluate a model (base, adapter run or full run) on a data file: loss, perplexity, accuracy.

Classification accuracy scores every label by its log-likelihood as the assistant's answer,
batch by batch, so memory stays flat however large the evaluation set is.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from tuneforge.data.formats import Example, load_examples
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import render
from tuneforge.evaluation.metrics import classification_report

IGNORE_INDEX = -100


def _with_answer(example: Example, answer: str) -> Example:
    """The example's conversation with its last assistant turn replaced by `answer`."""
    messages = list(example.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return replace(example, messages=[*messages, {"role": "assistant", "content": answer}])


@torch.no_grad()
def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled tokens, and their count, per sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = (
        torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    )
    return (logp * mask).sum(-1), mask.sum(-1)


def _batches(items: list[TokenizedExample], batch_size: int, pad_id: int):
    for i in range(0, len(items), batch_size):
        yield collate(items[i : i + batch_size], pad_id=pad_id)


def loss_metrics(
    model, tokenizer, examples: list[Example], batch_size: int = 8
) -> dict[str, float]:
    """Token-weighted loss and perplexity of the reference answers."""
    items = [TokenizedExample(*render(tokenizer, ex), source=ex.source) for ex in examples]
    total, count = 0.0, 0
    for batch in _batches(items, batch_size, tokenizer.pad_token_id):
        logp, n = sequence_logprobs(model, batch)
        total -= float(logp.sum())
        count += int(n.sum())
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def label_predictions(
    model, tokenizer, examples: list[Example], labels: list[str], batch_size: int = 8
) -> list[str]:
    """The most likely label for each example (summed token log-probabilities of the answer)."""
    items = [
        TokenizedExample(*render(tokenizer, _with_answer(ex, label)), source=ex.source)
        for ex in examples
        for label in labels
    ]
    scores: list[float] = []
    for batch in _batches(items, batch_size * len(labels), tokenizer.pad_token_id):
        logp, _ = sequence_logprobs(model, batch)
        scores.extend(logp.tolist())
    preds = []
    for i in range(len(examples)):
        row = scores[i * len(labels) : (i + 1) * len(labels)]
        preds.append(labels[max(range(len(labels)), key=row.__getitem__)])
    return preds


def evaluate_examples(
    model, tokenizer, examples: list[Example], metrics: list[str], batch_size: int = 8
) -> dict[str, Any]:
    """The requested metrics (loss, accuracy) on already-loaded examples."""
    out: dict[str, Any] = {"examples": len(examples)}
    if "loss" in metrics or "perplexity" in metrics:
        out.update(loss_metrics(model, tokenizer, examples, batch_size))
    if "accuracy" in metrics or "macro_f1" in metrics:
        refs = [ex.label if ex.label is not None else ex.messages[-1]["content"] for ex in examples]
        labels = sorted(set(refs))
        if len(labels) < 2:
            raise ValueError("accuracy needs at least two distinct labels in the evaluation data")
        preds = label_predictions(model, tokenizer, examples, labels, batch_size)
        out.update(classification_report(preds, refs, labels))
    return out


def evaluate_file(
    model, tokenizer, path: str, metrics: list[str], batch_size: int = 8, limit: int | None = None
):
    examples = load_examples(path, "auto", on_bad_row="fail").examples
    if limit is not None:
        examples = examples[:limit]
    model.eval()
    return evaluate_examples(model, tokenizer, examples, metrics, batch_size)

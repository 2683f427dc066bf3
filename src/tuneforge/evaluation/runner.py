"""Evaluate a model (base, adapter run or full run) on a data file: loss, perplexity, accuracy.

Accuracy scores every label by its log-likelihood as the assistant's answer. Models that pack
take packed.py's single pass; the padded passes here serve the others (virtual tokens, models
that attend across packed rows), batch by batch, so memory stays flat.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example, load_examples
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import render
from tuneforge.errors import DataError
from tuneforge.evaluation.metrics import classification_report
from tuneforge.evaluation.packed import (
    TOKENS_PER_BATCH_ROW,
    packed_attention,
    packed_pass,
)
from tuneforge.evaluation.packed import split_prompt as _split_prompt
from tuneforge.evaluation.packed import with_answer as _with_answer
from tuneforge.evaluation.progress import Progress, eval_bar
from tuneforge.train.loss import CausalLMLoss


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


def _length_sorted_batches(items: list[TokenizedExample], batch_size: int, pad_id: int):
    """Batches of similar-length rows (little padding); the loss is a sum, so order is free."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for i in range(0, len(order), batch_size):
        yield collate([items[j] for j in order[i : i + batch_size]], pad_id=pad_id)


def loss_metrics(
    model,
    tokenizer,
    examples: list[Example],
    batch_size: int = 8,
    *,
    positions_aligned: bool = True,
    progress: Progress = False,
) -> dict[str, float]:
    """Token-weighted loss and perplexity of the reference answers.

    The same loss as training's (train/loss.py): the head runs only at labelled positions,
    chunk by chunk, instead of full-vocabulary logits for every token of every row.
    """
    items = [TokenizedExample(*render(tokenizer, ex), source=ex.source) for ex in examples]
    loss_fn = CausalLMLoss(model, positions_aligned=positions_aligned)
    batches = _length_sorted_batches(items, batch_size, tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_bar(
            "loss",
            progress,
            iterable=batches,
            total=math.ceil(len(items) / batch_size),
            unit="batch",
        ):
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += float(loss_fn(model, batch, 1.0))  # num_items 1: the summed token loss
                count += n
    return _loss_dict(total, count)


def _loss_dict(total: float, count: int) -> dict[str, float]:
    """Token-weighted mean loss and its perplexity (NaN without labelled tokens)."""
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


@torch.no_grad()
def _score_answers(
    model, prompts: list[list[int]], answers: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Log-likelihood [batch, n_answers] of each answer after each prompt, the prompt run once.

    Prompts are left-padded with explicit position ids, so each row sees the same positions as
    in training; every answer then continues from a copy of the prompt's KV cache.
    """
    import copy

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    scores = torch.empty(len(prompts), len(answers))
    for j, answer in enumerate(answers):
        score = first[:, answer[0]].clone()
        if len(answer) > 1:
            cont = torch.tensor(answer[:-1]).expand(len(prompts), -1)
            cont_mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
            cont_pos = positions[:, -1:] + torch.arange(1, len(answer)).unsqueeze(0)
            step = model(
                input_ids=cont,
                attention_mask=cont_mask,
                position_ids=cont_pos,
                cache=copy.deepcopy(out.cache),
                use_cache=True,
            )
            logp = torch.log_softmax(step.logits.float(), dim=-1)
            targets = torch.tensor(answer[1:]).expand(len(prompts), -1)
            score += logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)
        scores[:, j] = score
    return scores


def label_predictions(
    model,
    tokenizer,
    examples: list[Example],
    labels: list[str],
    batch_size: int = 8,
    progress: Progress = False,
) -> list[str]:
    """The most likely label for each example (summed token log-probabilities of the answer)."""
    prompts, answers = [], None
    for ex in examples:
        split = [_split_prompt(*render(tokenizer, _with_answer(ex, label))) for label in labels]
        if len({tuple(p) for p, _ in split}) != 1:
            raise DataError(
                f"{ex.source}: the chat template renders the prompt differently per label"
            )
        prompts.append(split[0][0])
        tails = [a for _, a in split]
        if answers is not None and tails != answers:
            raise DataError(f"{ex.source}: labels tokenise differently after this prompt")
        answers = tails
    preds: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for i in eval_bar("labels", progress, iterable=starts, unit="batch"):
        scores = _score_answers(model, prompts[i : i + batch_size], answers, tokenizer.pad_token_id)
        preds.extend(labels[j] for j in scores.argmax(-1).tolist())
    return preds


def evaluate_examples(
    model,
    tokenizer,
    examples: list[Example],
    metrics: list[str],
    batch_size: int = 8,
    *,
    positions_aligned: bool = True,
    progress: Progress = False,
    labels: list[str] | None = None,
    batch_tokens: int | None = None,
) -> dict[str, Any]:
    """The requested metrics (loss, accuracy) on already-loaded examples.

    `labels`: the classes to choose among (default: the distinct answers of `examples`).
    Where the model packs exactly (packed_attention), one packed pass of up to `batch_tokens`
    tokens per forward (default: batch_size x TOKENS_PER_BATCH_ROW) gives loss and labels
    together; otherwise padded batches of `batch_size` rows, a pass per metric."""
    out: dict[str, Any] = {"examples": len(examples)}
    wants_labels = "accuracy" in metrics or "macro_f1" in metrics
    wants_loss = "loss" in metrics or "perplexity" in metrics
    refs = [
        ex.label if ex.label is not None else (ex.messages[-1]["content"] if ex.messages else "")
        for ex in examples
    ]
    labels = sorted(set(refs)) if labels is None else sorted(set(labels))
    if wants_labels and len(labels) < 2:  # checked before any pass runs: fail first
        raise DataError(
            f"{examples[0].source.rsplit(':', 1)[0] if examples else 'the data'}: accuracy "
            f"needs at least two distinct labels (answers), found {len(labels)}; use "
            "--metrics loss for free-text data"
        )
    packed = None
    if wants_loss or wants_labels:
        with packed_attention(model, positions_aligned) as packable:
            if packable:
                packed = packed_pass(
                    model,
                    tokenizer,
                    examples,
                    labels if wants_labels else [],
                    loss=wants_loss,
                    max_tokens=batch_tokens or batch_size * TOKENS_PER_BATCH_ROW,
                    progress=progress,
                )
    if wants_loss:
        out.update(
            _loss_dict(packed.loss_sum, packed.tokens)
            if packed is not None
            else loss_metrics(
                model,
                tokenizer,
                examples,
                batch_size,
                positions_aligned=positions_aligned,
                progress=progress,
            )
        )
    if wants_labels:
        if packed is not None:
            preds = [labels[j] for j in packed.scores.argmax(-1).tolist()] if examples else []
        else:
            preds = label_predictions(model, tokenizer, examples, labels, batch_size, progress)
        out.update(classification_report(preds, refs, labels))
    return out


def evaluate_file(
    model,
    tokenizer,
    path: str,
    metrics: list[str],
    batch_size: int = 8,
    limit: int | None = None,
    **options: Any,
):
    """`evaluate_examples` on a data file's rows (the first `limit` of them)."""
    examples = load_examples(path, "auto", on_bad_row="fail").examples
    if limit is not None:
        examples = examples[:limit]
    model.eval()
    return evaluate_examples(model, tokenizer, examples, metrics, batch_size, **options)

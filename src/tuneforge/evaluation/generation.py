"""Greedy, batched generation for evaluation: prompts left-padded, answers cut at end of turn.

Keeps only the generated token ids of each batch (never logits); scoring the texts is score.py's
and metrics.py's job, and deciding when to evaluate is the training recipe's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample
from tuneforge.data.templates import cut_at_text, end_of_turn, render, render_prompt
from tuneforge.evaluation.progress import Progress, eval_bar
from tuneforge.loading import answer_text, stopping_criteria


@dataclass(frozen=True)
class GenItem:
    """One prompt to answer and the reference answer it is scored against."""

    prompt_ids: list[int]
    reference: str
    source: str = ""


def last_labelled_run(labels: Sequence[int]) -> tuple[int, int] | None:
    """[start, end) of the last run of labelled tokens (the last assistant turn), or None."""
    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE_INDEX), None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def items_from_tokenized(
    examples: Sequence[TokenizedExample], tokenizer: Any
) -> tuple[list[GenItem], set[int]]:
    """Prompt/reference pairs from training-style examples, and the ids that end an answer.

    The prompt is everything before the last assistant turn, exactly as it was tokenised for
    training; the reference is that turn decoded. An example without a prompt (plain text, or
    data.train_on: all) has nothing to answer and is left out. The stop ids are the special
    tokens that close the references (what training taught the model to stop with) plus eos.
    """
    special = set(tokenizer.all_special_ids)
    eot = end_of_turn(tokenizer)
    stop_ids = set(eot.token_ids)
    items = []
    for ex in examples:
        span = last_labelled_run(ex.labels)
        if span is None or span[0] == 0:
            continue
        start, end = span
        if ex.labels[end - 1] in special:
            stop_ids.add(ex.labels[end - 1])
        answer = ex.input_ids[start:end]
        reference = cut_at_text(tokenizer.decode(answer, skip_special_tokens=True), eot.texts)
        reference = reference.strip()
        items.append(GenItem(list(ex.input_ids[:start]), reference, ex.source))
    return items, stop_ids


def items_from_examples(examples: Sequence[Example], tokenizer: Any) -> list[GenItem]:
    """Prompt/reference pairs from parsed rows: the conversation up to its last assistant turn."""
    items = []
    for ex in examples:
        turns = list(ex.messages)
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if not last:  # no assistant turn, or nothing before it (plain text rows)
            continue
        prompt = render_prompt(tokenizer, turns[:last])
        items.append(GenItem(prompt, turns[last]["content"].strip(), ex.source))
    return items


def end_of_turn_ids(tokenizer: Any, examples: Sequence[Example]) -> set[int]:
    """eos plus the special tokens that close assistant turns as the chat template renders them."""
    rows = [
        TokenizedExample(*render(tokenizer, ex), source=ex.source) for ex in examples if ex.messages
    ]
    return items_from_tokenized(rows, tokenizer)[1]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask with every prompt right-aligned, so all continue together."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def cut_at_stop(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    """The generated ids before the first stop id."""
    out = []
    for token in ids:
        if token in stop_ids:
            break
        out.append(token)
    return out


@torch.no_grad()
def generate_batched(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: set[int],
    max_new_tokens: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    stop_texts: Sequence[str] = (),
    tokenizer: Any = None,
    progress: Progress = False,
) -> list[list[int]]:
    """Greedy answers (token ids, stop token excluded) for each prompt, in the prompts' order.

    Prompts are batched by length (longest first) to waste little on padding; each batch keeps
    only its generated ids, so memory is one batch's KV cache however many prompts there are.
    A row also stops at any of `stop_texts` (decoded with `tokenizer`); the marker's ids stay in
    its answer, for `answer_text` to cut. `progress`: a progress bar counting rows.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    bar = eval_bar("generate", progress, total=len(order), unit="row")
    try:
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            ids, mask = left_pad([prompts[r] for r in rows], pad_id)
            stopping = (
                stopping_criteria(tokenizer, ids.shape[1], stop_texts) if stop_texts else None
            )
            with autocast:
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=config,
                    stopping_criteria=stopping,
                )
            new = out[:, ids.shape[1] :].tolist()
            for row, generated in zip(rows, new, strict=True):
                answers[row] = cut_at_stop(generated, stop_ids)
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return answers


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[GenItem],
    *,
    stop_ids: set[int] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: Progress = False,
) -> list[str]:
    """Decoded greedy answers for `items`, cut at the end of turn (a special token or the
    template's text marker), stripped of special tokens and outer whitespace."""
    eot = end_of_turn(tokenizer)
    stops = set(stop_ids or ()) | ({tokenizer.eos_token_id} - {None}) | eot.token_ids
    ids = generate_batched(
        model,
        [item.prompt_ids for item in items],
        pad_id=tokenizer.pad_token_id,
        stop_ids=stops,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
        stop_texts=eot.texts,
        tokenizer=tokenizer,
        progress=progress,
    )
    return [answer_text(tokenizer, a, stops, eot.texts).strip() for a in ids]

"""Loss and label log-likelihoods in one packed pass per batch: rows back to back, training's kernels.

Rendering is data/templates.py's, packing data/packing.py's, attention train/attention.py's, the
head's loss train/loss.py's; which metrics to report is runner.py's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example
from tuneforge.data.packing import pack_examples
from tuneforge.data.pipeline import TokenizedExample
from tuneforge.data.templates import render
from tuneforge.errors import DataError
from tuneforge.evaluation.prefix_attention import PREFIX_ATTENTION, register_prefix_attention
from tuneforge.evaluation.progress import Progress, eval_bar
from tuneforge.train.attention import ATTENTION_NAME, set_attention, use_packed_sdpa
from tuneforge.train.fastpath import keeps_packed_examples_apart
from tuneforge.train.loss import label_positions, lm_parts

#: Tokens per packed forward, per unit of `--batch-size` (8 -> 4096 tokens; 2048 measured 10 %
#: slower on the quickstart eval, 8192 no faster than 4096).
TOKENS_PER_BATCH_ROW = 512
#: (row, label) continuations per cached forward: bounds its [pairs, answer, vocab] logits.
MAX_PAIRS = 64
#: A prefix shared by a pack's rows is forwarded once when at least this long.
MIN_PREFIX = 8
#: Positions whose full-vocabulary logits exist at once when the head scores a pack.
HEAD_CHUNK = 512


def with_answer(example: Example, answer: str) -> Example:
    """The example's conversation with its last assistant turn replaced by `answer`."""
    messages = list(example.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return replace(example, messages=[*messages, {"role": "assistant", "content": answer}])


def split_prompt(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer is the labelled tail of the last assistant turn."""
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    last = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    return ids[:first], ids[first : last + 1]


@dataclass
class Row:
    """One sequence to forward: ids, loss labels, its example, and its label prompt's length."""

    ids: list[int]
    labels: list[int]
    example: int
    prompt: int = 0  # 0: the row scores no labels


@dataclass
class PassResult:
    """Summed token loss and its token count, and each example's log-likelihood of each label."""

    loss_sum: float
    tokens: int
    scores: torch.Tensor  # [examples, labels]


def _label_split(tokenizer: Any, ex: Example, labels: Sequence[str]):
    """(prompt, each label's answer ids, the first label's full ids) of one example."""
    renders = [render(tokenizer, with_answer(ex, label)) for label in labels]
    split = [split_prompt(ids, labs) for ids, labs in renders]
    if len({tuple(p) for p, _ in split}) != 1:
        raise DataError(f"{ex.source}: the chat template renders the prompt differently per label")
    if not split[0][0]:
        raise DataError(f"{ex.source}: the answer starts the row; no prompt to score labels after")
    return split[0][0], [a for _, a in split], renders[0][0]


def plan_rows(
    tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], *, loss: bool
) -> tuple[list[Row], list[list[int]]]:
    """The rows to forward (each example tokenised once for both passes) and the label answers.

    An example's own rendering serves the loss and the labels when its prompt is the labels'
    prompt (always, for ordinary templates); otherwise a loss row and a label row."""
    rows: list[Row] = []
    answers: list[list[int]] | None = None
    for n, ex in enumerate(examples):
        ids, labs = render(tokenizer, ex) if loss else ([], [])
        if not labels:
            rows.append(Row(ids, labs, n))
            continue
        prompt, tails, first = _label_split(tokenizer, ex, labels)
        if answers is not None and tails != answers:
            raise DataError(f"{ex.source}: labels tokenise differently after this prompt")
        answers = tails
        if loss and ids[: len(prompt)] == prompt:
            rows.append(Row(ids, labs, n, len(prompt)))
            continue
        if loss:
            rows.append(Row(ids, labs, n))
        rows.append(Row(first, [IGNORE_INDEX] * len(first), n, len(prompt)))
    return rows, answers or []


def pack_rows(rows: Sequence[Row], max_tokens: int) -> list[list[Row]]:
    """Rows longest first, cut into packs of at most `max_tokens` tokens (a longer row alone)."""
    packs: list[list[Row]] = []
    size = 0
    for row in sorted(rows, key=lambda r: -len(r.ids)):
        if not packs or size + len(row.ids) > max_tokens:
            packs.append([])
            size = 0
        packs[-1].append(row)
        size += len(row.ids)
    return packs


@contextmanager
def packed_attention(model: torch.nn.Module, positions_aligned: bool = True) -> Iterator[bool]:
    """True inside when the model can run packed rows exactly (training's kernel works on it and
    keeps examples apart), with the prefix-sharing kernel switched on; put back on leaving."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(getattr(base, "config", None), "_attn_implementation", None)
    ok = positions_aligned and lm_parts(model) is not None
    ok = ok and (before in (ATTENTION_NAME, PREFIX_ATTENTION) or use_packed_sdpa(base))
    try:
        ok = ok and keeps_packed_examples_apart(model)
        if ok:
            set_attention(base, register_prefix_attention())
        yield ok
    finally:
        if before is not None and base.config._attn_implementation != before:
            set_attention(base, before)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of `a` and `b`."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def shared_prefix(pack: Sequence[Row]) -> int:
    """Tokens every row of `pack` starts with and none is scored on (0: under MIN_PREFIX, one row).

    The prefix stops before each row's first loss target and before its label prompt's last
    token, whose hidden states the scores need."""
    if len(pack) < 2:
        return 0
    first = pack[0].ids
    size = min(len(r.ids) for r in pack) - 1
    for row in pack:
        size = min(size, _common(first, row.ids))
        scored = next((i for i, lab in enumerate(row.labels[1:], 1) if lab != IGNORE_INDEX), None)
        if scored is not None:
            size = min(size, scored - 1)
        if row.prompt:
            size = min(size, row.prompt - 1)
    return size if size >= MIN_PREFIX else 0


def _pack_batch(pack: Sequence[Row], prefix: int, device) -> dict[str, torch.Tensor]:
    """The rows after `prefix`, back to back: input_ids, position_ids (from `prefix` on, per row)
    and labels (each row's first dropped, as data/packing.py does), (1, T) each."""
    batch = pack_examples([TokenizedExample(r.ids[prefix:], r.labels[prefix:], "") for r in pack])
    batch["position_ids"] += prefix
    return {k: v.to(device) for k, v in batch.items()}


def _hidden_and_cache(model, decoder, batch, mask, prefix_ids, cache):
    """The decoder's last hidden states of a packed row (head skipped) after the cached prefix."""
    captured: list[torch.Tensor] = []

    def capture(module, args, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if hidden is not None else output[0])

    handle = decoder.register_forward_hook(capture)
    try:
        if prefix_ids is not None:
            ids = torch.tensor([prefix_ids], device=mask.device)
            positions = torch.arange(len(prefix_ids), device=mask.device)[None]
            keep = torch.zeros_like(ids, dtype=torch.bool)
            model(
                input_ids=ids,
                position_ids=positions,
                logits_to_keep=keep,
                cache=cache,
                use_cache=True,
            )
        model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            logits_to_keep=torch.zeros_like(mask),
            cache=cache,
            use_cache=cache is not None,
        )
    finally:
        handle.remove()
    return captured[-1][0]


def _head_scores(
    head, hidden: torch.Tensor, loss_at: list[int], loss_targets: list[int], positions, targets
) -> tuple[float, torch.Tensor]:
    """(summed loss of `loss_targets` at `loss_at`, log p(target) at each of `positions`).

    The head runs once over the positions either needs (an example's own answer is both), at
    most HEAD_CHUNK positions at a time, so full-vocabulary logits stay small."""
    at = sorted(set(loss_at) | set(positions))
    where = {pos: i for i, pos in enumerate(at)}
    rows = torch.tensor([where[pos] for pos in [*loss_at, *positions]], dtype=torch.long)
    cols = torch.tensor([*loss_targets, *targets], dtype=torch.long)
    picked = torch.zeros(len(cols), dtype=torch.float32)
    for start in range(0, len(at), HEAD_CHUNK):
        sel = ((rows >= start) & (rows < start + HEAD_CHUNK)).nonzero().squeeze(-1)
        logits = torch.nn.functional.linear(
            hidden[at[start : start + HEAD_CHUNK]], head.weight, head.bias
        ).float()
        index = (rows[sel] - start).to(logits.device), cols[sel].to(logits.device)
        # logit - logsumexp, as training's loss: closer to fp64 than fp32 log_softmax here
        picked[sel] = (logits[index] - torch.logsumexp(logits, dim=-1)[index[0]]).cpu()
    return -float(picked[: len(loss_at)].double().sum()), picked[len(loss_at) :]


@torch.no_grad()
def _continue(model, cache, pairs, prefix: int, pad_id: int) -> torch.Tensor:
    """Summed log-likelihood of each pair's tokens after its row's first `length` tokens.

    A pair is (row offset in the packed row, length, answer tokens from there on). Those
    tokens' keys and values (the shared prefix, then the row's own) are gathered from the
    cache and left-padded, so each pair continues exactly where its row stands.
    """
    from transformers import DynamicCache

    width = max(c for _, c, _ in pairs)
    span = max(len(t) for _, _, t in pairs) - 1
    device = cache.layers[0].keys.device
    index = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros(len(pairs), width + span, dtype=torch.long)
    ids = torch.full((len(pairs), span), pad_id, dtype=torch.long)
    for i, (offset, length, tokens) in enumerate(pairs):
        own = torch.arange(prefix + offset, offset + length)  # the row's tokens after the prefix
        index[i, width - length :] = torch.cat([torch.arange(prefix), own])
        mask[i, width - length : width + len(tokens) - 1] = 1
        ids[i, : len(tokens) - 1] = torch.tensor(tokens[:-1])
    index = index.to(device)
    kv = [
        (layer.keys[0][:, index].transpose(0, 1), layer.values[0][:, index].transpose(0, 1))
        for layer in cache.layers
    ]
    positions = torch.tensor([c for _, c, _ in pairs]).unsqueeze(1) + torch.arange(span)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        cache=DynamicCache(ddp_cache_data=kv),
        use_cache=True,
    ).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    out = torch.zeros(len(pairs), dtype=torch.float64)
    for i, (_, _, tokens) in enumerate(pairs):
        target = torch.tensor(tokens[1:], device=logp.device).unsqueeze(-1)
        out[i] = float(logp[i, : len(tokens) - 1].gather(-1, target).sum())
    return out


def _label_targets(pack: Sequence[Row], answers: list[list[int]], prefix: int):
    """What the packed forward scores itself and what continues from its cache.

    Label j's first k + 1 answer tokens are read off the packed row wherever the row holds
    its first k (the prompt's last position gives the first token for every label); the rest
    become (row offset, length, tokens) continuations. Positions count from after `prefix`.
    """
    positions, targets, owners, pairs, pair_owners = [], [], [], [], []
    offset = 0
    for row in pack:
        for j, answer in enumerate(answers if row.prompt else ()):
            k = min(_common(answer, row.ids[row.prompt :]), len(answer) - 1)
            for t in range(k + 1):
                positions.append(offset + row.prompt - 1 + t - prefix)
                targets.append(answer[t])
                owners.append((row.example, j))
            if k < len(answer) - 1:
                pairs.append((offset, row.prompt + k, answer[k:]))
                pair_owners.append((row.example, j))
        offset += len(row.ids) - prefix
    return positions, targets, owners, pairs, pair_owners


def _score_pack(model, parts, pack: Sequence[Row], answers, scores, pad_id: int) -> tuple:
    """(summed loss, loss tokens) of one pack; adds its label log-likelihoods into `scores`."""
    from transformers import DynamicCache

    decoder, head = parts
    prefix = shared_prefix(pack)
    batch = _pack_batch(pack, prefix, next(model.parameters()).device)
    mask, loss_targets = label_positions(batch["labels"])
    positions, targets, owners, pairs, pair_owners = _label_targets(pack, answers, prefix)
    cache = DynamicCache() if pairs or prefix else None
    prefix_ids = pack[0].ids[:prefix] if prefix else None
    hidden = _hidden_and_cache(model, decoder, batch, mask, prefix_ids, cache)
    loss_at = mask[0].nonzero().squeeze(-1).tolist()
    loss, logp = _head_scores(head, hidden, loss_at, loss_targets.tolist(), positions, targets)
    for (example, j), value in zip(owners, logp.tolist(), strict=True):
        scores[example, j] += value
    for start in range(0, len(pairs), MAX_PAIRS):
        logp = _continue(model, cache, pairs[start : start + MAX_PAIRS], prefix, pad_id)
        owned = pair_owners[start : start + MAX_PAIRS]
        for (example, j), value in zip(owned, logp.tolist(), strict=True):
            scores[example, j] += value
    return loss, int(loss_targets.numel())


@torch.no_grad()
def packed_pass(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    loss: bool,
    max_tokens: int,
    progress: Progress = False,
) -> PassResult:
    """The summed loss of `examples` (when `loss`) and their log-likelihood of each label.

    Call it inside `packed_attention(model)` where that said True: each example is forwarded
    once, packed with others up to `max_tokens`, by the kernels training uses.
    """
    rows, answers = plan_rows(tokenizer, examples, labels, loss=loss)
    scores = torch.zeros(len(examples), len(answers), dtype=torch.float64)
    parts = lm_parts(model)
    total, count, pad_id = 0.0, 0, tokenizer.pad_token_id or 0
    what = "loss + labels" if loss and labels else ("loss" if loss else "labels")
    was_training = model.training
    model.eval()
    try:
        with eval_bar(what, progress, total=len(rows), unit="row") as bar:
            for pack in pack_rows(rows, max_tokens):
                pack_loss, pack_tokens = _score_pack(model, parts, pack, answers, scores, pad_id)
                total, count = total + pack_loss, count + pack_tokens
                bar.update(len(pack))
    finally:
        model.train(was_training)
    return PassResult(total, count, scores)

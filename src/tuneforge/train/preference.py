"""Preference training: DPO and KTO losses as pure functions, and a small trainer around them.

The reference policy is a frozen second adapter on the same peft model (no second copy of the
base); which adapters to load and where the result goes is recipes/retrain.py's business.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example
from tuneforge.data.pipeline import TokenizedExample, collate
from tuneforge.data.templates import render, render_prompt

OBJECTIVES = ("sft", "dpo", "kto")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): -log σ(β[(πc - rc) - (πr - rr)]), averaged over pairs.

    Inputs are summed answer log-probabilities per pair. Returns (loss, the per-pair margin
    β[(πc - rc) - (πr - rr)]).
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) on single rated answers, no pairs needed.

    r = π - ref per answer; z0 = max(kl, 0), detached (the batch's KL reference point);
    a good answer costs λD·(1 - σ(β(r - z0))), a bad one λU·(1 - σ(β(z0 - r))); the mean.
    """
    ratio = policy - reference
    z0 = kl.clamp(min=0).detach()
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable.bool(), good, bad).mean()


def answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (with gradients)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def tokenize_answer(
    tokenizer: Any, prompt: list[dict[str, str]], answer: str, max_length: int | None = None
) -> TokenizedExample:
    """The conversation plus `answer`, with loss labels on the answer only (not earlier turns),
    cut to the last `max_length` tokens (the answer is at the end)."""
    ids, labels = render(tokenizer, Example(messages=[*prompt, {"role": "assistant", "content": answer}]))  # fmt: skip
    n_prompt = len(render_prompt(tokenizer, prompt))
    labels = [IGNORE_INDEX] * min(n_prompt, len(labels)) + labels[n_prompt:]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return TokenizedExample(ids, labels, source="feedback")


@contextmanager
def active_adapter(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run with peft adapter `name` active; restore the previous adapter and requires_grad flags
    (peft's set_adapter marks the active adapter trainable)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@dataclass
class PreferenceSettings:
    objective: str = "dpo"  # dpo | kto
    beta: float = 0.1
    lr: float = 5e-4
    steps: int = 20
    batch_size: int = 4
    max_length: int = 512
    reference_adapter: str = "reference"
    seed: int = 0


def _logps(model, tokenizer, items: Sequence[TokenizedExample], ref: str | None) -> torch.Tensor:
    batch = collate(list(items), pad_id=tokenizer.pad_token_id)
    if ref is None:
        return answer_logps(model, batch)
    with torch.no_grad(), active_adapter(model, ref):
        return answer_logps(model, batch)


def preference_loss(model, tokenizer, rows: Sequence[dict[str, Any]], s: PreferenceSettings):
    """The objective's loss on one batch of exported rows (pairs for DPO, rated answers for KTO)."""
    ref, cut = s.reference_adapter, s.max_length
    if s.objective == "dpo":
        chosen = [tokenize_answer(tokenizer, r["prompt"], r["chosen"], cut) for r in rows]
        rejected = [tokenize_answer(tokenizer, r["prompt"], r["rejected"], cut) for r in rows]
        both = chosen + rejected
        policy, reference = (
            _logps(model, tokenizer, both, None),
            _logps(model, tokenizer, both, ref),
        )
        n = len(rows)
        return dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], s.beta)[0]
    items = [tokenize_answer(tokenizer, r["prompt"], r["completion"], cut) for r in rows]
    # The KL reference point: each prompt with another row's answer (TRL's mismatched pairs).
    shifted = [
        tokenize_answer(tokenizer, r["prompt"], rows[(i + 1) % len(rows)]["completion"], cut)
        for i, r in enumerate(rows)
    ]
    with torch.no_grad():
        kl = (
            _logps(model, tokenizer, shifted, None) - _logps(model, tokenizer, shifted, ref)
        ).mean()
    policy, reference = _logps(model, tokenizer, items, None), _logps(model, tokenizer, items, ref)
    desirable = torch.tensor([bool(r["label"]) for r in rows])
    return kto_loss(policy, reference, desirable, kl, s.beta)


def train_preference(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    s: PreferenceSettings,
    show_progress: bool = True,
) -> list[float]:
    """`s.steps` AdamW steps over shuffled batches of `rows`; returns the loss of each step."""
    from tqdm.auto import tqdm

    if s.objective not in ("dpo", "kto"):
        raise ValueError(f"objective: {s.objective!r} is not dpo or kto")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(s.seed)).tolist()
    losses = []
    model.train()
    for step in tqdm(range(s.steps), desc=s.objective, disable=not show_progress):
        start = (step * s.batch_size) % len(rows)
        batch = [rows[order[(start + k) % len(rows)]] for k in range(min(s.batch_size, len(rows)))]
        loss = preference_loss(model, tokenizer, batch, s)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses

"""Pad-free batches: pack a micro-batch's examples into one row, and length-grouped example order.

A packed row restarts position ids at each example and carries no attention mask, which tells the
attention kernel (train/attention.py, or transformers' own) to keep examples apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tuneforge.constants import IGNORE_INDEX


def pack_examples(batch: Sequence[Any]) -> dict[str, torch.Tensor]:
    """One row holding every example back to back: input_ids, position_ids and labels, (1, T).

    Each example's first label becomes -100: in a padded batch the first token is never a target
    either, and here it would be predicted from the previous example's last token. So a packed
    row carries exactly the targets of the padded batch, and the same loss.
    """
    if not batch:
        raise ValueError("pack_examples: the batch is empty")
    ids, positions, labels = [], [], []
    for ex in batch:
        n = len(ex.input_ids)
        if n == 0:
            raise ValueError(f"pack_examples: an empty example ({getattr(ex, 'source', '?')})")
        ids.extend(ex.input_ids)
        positions.extend(range(n))
        labels.append(IGNORE_INDEX)
        labels.extend(ex.labels[1:])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


def input_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-padding) input tokens of a padded batch (attention mask) or a packed one (all)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def length_grouped(order: Sequence[int], lengths: Sequence[int], group_size: int) -> list[int]:
    """`order` with each run of `group_size` consecutive examples sorted by length, longest first.

    Micro-batches cut from the result hold examples of similar length (little padding), while
    which examples share a step is still decided by the seeded epoch order. The longest group
    comes first so that an out-of-memory error shows on step 1, not hours in.
    """
    if group_size < 1:
        raise ValueError(f"length_grouped: group_size must be at least 1, got {group_size}")
    groups = [
        sorted(order[i : i + group_size], key=lambda j: -lengths[j])
        for i in range(0, len(order), group_size)
    ]
    if len(groups) > 1:
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
        groups[0], groups[longest] = groups[longest], groups[0]
    return [i for group in groups for i in group]

"""Apply the transforms to rows: N seeded copies of each row, changing its prompt side only.

The prompt side is the instruction/input, the user turns, or a classification row's text; answers
change only with `targets`, labels never. Copies equal to their row, to an earlier copy, or to a
held-out prompt are dropped and counted. Choosing the rows (the training split) is the caller's.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneforge.augment import OpContext, Transform, augment_text, check_lang, get_ops
from tuneforge.data.formats import Example
from tuneforge.errors import DataError

_USER_ROLES = {"user", "human"}
_ANSWER_ROLES = {"assistant", "gpt"}


@dataclass(frozen=True)
class AugmentPlan:
    """What to do: copy c of a row applies ops[c % len(ops)] with its own seeded generator."""

    ops: tuple[str, ...]
    n: int = 4
    alpha: float = 0.1
    seed: int = 0
    lang: str = "auto"
    targets: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise DataError(f"augment: n (copies per row) must be at least 1, got {self.n}")
        if not 0.0 < self.alpha <= 1.0:
            raise DataError(f"augment: alpha must be in (0, 1], got {self.alpha}")
        get_ops(list(self.ops))
        check_lang(self.lang)

    def transform(self, copy_index: int) -> Transform:
        return get_ops([self.ops[copy_index % len(self.ops)]])[0]

    def rng(self, row_key: str, copy_index: int) -> random.Random:
        # A string seed is hashed with SHA-512: the same copies on every run and machine.
        return random.Random(f"{self.seed}:{row_key}:{copy_index}")


@dataclass
class AugmentStats:
    rows: int = 0
    copies: int = 0
    by_op: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)  # unchanged / duplicate / in_held_out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "copies": self.copies,
            "by_op": dict(self.by_op),
            "dropped": dict(sorted(self.dropped.items())),
        }


# --- slots: the strings of a row that a copy may change -----------------------------------------


def example_slots(example: Example, targets: bool) -> list[int]:
    """Indices of the messages a copy changes (user turns; answers too with `targets`)."""
    if example.text is not None:
        return []
    roles = set(_USER_ROLES)
    if targets and example.label is None:  # a classification answer is its label: never changed
        roles |= _ANSWER_ROLES
    return [i for i, m in enumerate(example.messages) if m["role"] in roles]


def record_slots(record: dict[str, Any], fmt: str, targets: bool) -> list[tuple[Any, ...]]:
    """Key paths into a raw row (as read from its file) of the strings a copy changes."""
    if fmt == "alpaca":
        keys = ["instruction", "input"] + (["output"] if targets else [])
        return [(k,) for k in keys if isinstance(record.get(k), str) and record[k].strip()]
    if fmt in ("messages", "sharegpt"):
        turns, role, text = ("messages", "role", "content")
        if fmt == "sharegpt":
            turns, role, text = ("conversations", "from", "value")
        roles = set(_USER_ROLES)
        if targets and record.get("label") is None:
            roles |= _ANSWER_ROLES
        return [
            (turns, i, text)
            for i, turn in enumerate(record[turns])
            if turn.get(role) in roles and isinstance(turn.get(text), str)
        ]
    if fmt == "classification":
        return [("text",)]
    return [("text",)] if targets else []  # plain text has no prompt side


def _get(record: Any, path: tuple[Any, ...]) -> str:
    for key in path:
        record = record[key]
    return record


def _set(record: Any, path: tuple[Any, ...], value: str) -> None:
    for key in path[:-1]:
        record = record[key]
    record[path[-1]] = value


# --- making copies --------------------------------------------------------------------------


def _copies(
    texts: list[str], row_key: str, where: str, plan: AugmentPlan, stats: AugmentStats, held_out
) -> Iterable[tuple[int, str, list[str]]]:
    """(copy index, op name, new texts) for each kept copy of one row's slot texts."""
    seen = {tuple(texts)}
    stats.rows += 1
    for c in range(plan.n):
        op = plan.transform(c)
        ctx = OpContext(plan.rng(row_key, c), plan.alpha)
        try:
            new = [augment_text(t, op, ctx, plan.lang) for t in texts]
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        key = tuple(new)
        reason = None
        if new == texts:
            reason = "unchanged"
        elif key in seen:
            reason = "duplicate"
        elif any(t in held_out for t in new):
            reason = "in_held_out"
        seen.add(key)
        if reason:
            stats.dropped[reason] += 1
            continue
        stats.copies += 1
        stats.by_op[op.name] += 1
        yield c, op.name, new


def augment_examples(
    examples: Sequence[Example], plan: AugmentPlan, held_out: Iterable[Example] = ()
) -> tuple[list[Example], AugmentStats]:
    """The new copies of `examples` (originals not included), and what happened.

    `held_out` (the validation split): a copy whose changed text equals any of their prompts or
    answers is dropped, so no augmented text can appear in both splits.
    """
    if any(ex.text is not None for ex in examples) and not plan.targets:
        raise DataError(
            "data.augment: plain-text rows have no prompt side to augment; set "
            "data.augment.targets: true to change the text itself"
        )
    banned = {m["content"] for ex in held_out for m in ex.messages} | {
        ex.text for ex in held_out if ex.text is not None
    }
    stats, out = AugmentStats(), []
    for row, ex in enumerate(examples):
        if ex.text is not None:
            texts = [ex.text]
        else:
            slots = example_slots(ex, plan.targets)
            texts = [ex.messages[i]["content"] for i in slots]
        for c, op, new in _copies(texts, str(row), ex.source, plan, stats, banned):
            if ex.text is not None:
                changed = dataclasses.replace(ex, text=new[0])
            else:
                messages = [dict(m) for m in ex.messages]
                for i, text in zip(slots, new, strict=True):
                    messages[i]["content"] = text
                changed = dataclasses.replace(ex, messages=messages)
            out.append(dataclasses.replace(changed, source=f"{ex.source}#aug{c + 1}-{op}"))
    return out, stats


def augment_records(
    records: Iterable[tuple[str, dict[str, Any]]], fmt: str, plan: AugmentPlan
) -> tuple[list[dict[str, Any]], AugmentStats]:
    """New copies of raw rows `(file:line, record)`, each with an `augmented` provenance key."""
    stats, out = AugmentStats(), []
    for where, record in records:
        slots = record_slots(record, fmt, plan.targets)
        if not slots:
            raise DataError(
                f"{where}: a {fmt} row has no prompt side to augment; pass --targets to "
                "change the text itself"
            )
        texts = [_get(record, s) for s in slots]
        for c, op, new in _copies(texts, where.rpartition(":")[2], where, plan, stats, ()):
            changed = copy.deepcopy(record)
            for slot, text in zip(slots, new, strict=True):
                _set(changed, slot, text)
            changed["augmented"] = {"from": where, "op": op, "copy": c + 1}
            out.append(changed)
    return out, stats

"""Self-instruct synthesis without the model: few-shot prompts from seed rows, cleaning of what a
model wrote, and the filters that decide which new rows are kept.

Filters: length, language, valid label (and no other label declared), exact duplicates, and
ROUGE-L similarity to every existing or kept row below a threshold. Generation is a callable the
synthesize recipe passes in (a model's batched sampler); here nothing loads a model.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rouge_score import rouge_scorer

from tuneforge.augment.text import detect_language

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]

INSTRUCTION_PROMPT = (
    "Here are examples of tasks a user gave an assistant:\n\n{examples}\n\n"
    "Write one new task of the same kind, on a different topic. Write only the task."
)
LABEL_PROMPT = (
    'Here are examples of inputs whose label is "{label}":\n\n{examples}\n\n'
    'Write one new, different input whose label is "{label}". Write only the input.'
)
_NUMBERING = re.compile(
    r"^\s*(?:(?:task|input|example|new task|new input)\s*\d*\s*[:：.]|\d+[.)])\s*", re.I
)
_LABEL_LINE = re.compile(r"\n\s*label\s*[:：]\s*(.+?)\s*$", re.I)


class _Tokenizer:
    """ROUGE units: Han characters one by one, other words lower-cased (rouge_score drops CJK)."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"[\u3400-\u9fff]|[^\W\u3400-\u9fff]+", text.lower())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (0 when either has no units)."""
    return _SCORER.score(a, b)["rougeL"].fmeasure


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def clean(text: str) -> tuple[str, str | None]:
    """(the first paragraph without numbering or quotes, a label the model declared or None)."""
    text = text.strip()
    declared = None
    match = _LABEL_LINE.search(text)
    if match:
        declared, text = match.group(1).strip().strip("\"'“”"), text[: match.start()]
    text = text.strip().split("\n\n", 1)[0].strip()
    text = _NUMBERING.sub("", text).strip().strip("\"'“”").strip()
    return text, declared


@dataclass
class Candidate:
    text: str
    label: str | None = None  # the label asked for (classification)
    declared: str | None = None  # a label the model wrote itself, if any
    seeds: list[str] = field(default_factory=list)  # file:line of the few-shot seeds


@dataclass
class Filters:
    """Decides, candidate by candidate, what is kept; kept texts join the comparison pool."""

    existing: list[str]
    labels: set[str] | None = None
    lang: str | None = None  # "zh" / "en"; None: no language check
    min_chars: int = 5
    max_chars: int = 1000
    max_similarity: float = 0.7
    rejected: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.pool = list(self.existing)
        self.seen = {normalise(t) for t in self.existing}

    def reason(self, c: Candidate) -> str | None:
        """Why `c` is rejected, or None if it is kept."""
        if not self.min_chars <= len(c.text) <= self.max_chars:
            return "length"
        if self.labels is not None and c.label not in self.labels:
            return "invalid_label"
        if c.declared is not None and c.declared != c.label:
            return "label_mismatch"
        if self.lang is not None and detect_language(c.text) != self.lang:
            return "language"
        if normalise(c.text) in self.seen:
            return "duplicate"
        if any(rouge_l(c.text, other) >= self.max_similarity for other in self.pool):
            return "too_similar"
        return None

    def keep(self, c: Candidate) -> bool:
        why = self.reason(c)
        if why is not None:
            self.rejected[why] += 1
            return False
        self.pool.append(c.text)
        self.seen.add(normalise(c.text))
        return True


@dataclass(frozen=True)
class Seed:
    prompt: str
    label: str | None
    source: str


def few_shot_prompt(
    pool: Sequence[Seed], shots: int, rng: random.Random, label: str | None
) -> tuple[Messages, list[str]]:
    """A user message showing `shots` seeds (of `label`, if given); and their sources."""
    picked = rng.sample(list(pool), min(shots, len(pool)))
    examples = "\n\n".join(f"{i}. {s.prompt}" for i, s in enumerate(picked, start=1))
    if label is None:
        text = INSTRUCTION_PROMPT.format(examples=examples)
    else:
        text = LABEL_PROMPT.format(label=label, examples=examples)
    return [{"role": "user", "content": text}], [s.source for s in picked]


@dataclass
class SynthSettings:
    n: int
    shots: int = 4
    batch_size: int = 8
    seed: int = 0
    max_candidates: int | None = None  # default: 5 * n


def synthesize_candidates(
    seeds: Sequence[Seed],
    generate: Generate,
    filters: Filters,
    settings: SynthSettings,
    labels: Sequence[str] | None = None,
    on_batch: Callable[[int, int], Any] | None = None,
) -> tuple[list[Candidate], int]:
    """Kept candidates (at most n) and how many were generated. Label mode cycles the labels."""
    by_label: dict[str | None, list[Seed]] = {}
    for seed in seeds:
        by_label.setdefault(seed.label if labels else None, []).append(seed)
    budget = settings.max_candidates or 5 * settings.n
    kept: list[Candidate] = []
    made = 0
    while len(kept) < settings.n and made < budget:
        size = min(settings.batch_size, budget - made)
        prompts, plans = [], []
        for i in range(made, made + size):
            rng = random.Random(f"{settings.seed}:synth:{i}")
            label = labels[i % len(labels)] if labels else None
            messages, sources = few_shot_prompt(by_label.get(label, []), settings.shots, rng, label)
            prompts.append(messages)
            plans.append((label, sources))
        for text, (label, sources) in zip(generate(prompts), plans, strict=True):
            body, declared = clean(text)
            candidate = Candidate(body, label, declared, sources)
            if len(kept) < settings.n and filters.keep(candidate):
                kept.append(candidate)
        made += size
        if on_batch is not None:
            on_batch(made, len(kept))
    return kept, made

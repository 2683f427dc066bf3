"""Token statistics of a dataset under one tokenizer: tokens per character of the text, and the
share of rows whose rendered example is longer than a max_length, to choose a model on numbers.

Reading rows is formats.py's job and rendering templates.py's; which models to compare is the
recipe's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge.data.formats import Example
from tuneforge.data.templates import render


@dataclass(frozen=True)
class TokenStats:
    rows: int
    chars: int
    tokens: int  # of the rows' text alone, no template
    over_max_length: int  # rows whose rendered example (template included) exceeds max_length
    max_length: int

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars if self.chars else 0.0

    @property
    def over_share(self) -> float:
        return self.over_max_length / self.rows if self.rows else 0.0


def example_text(example: Example) -> str:
    """Everything a row says: its text, or its messages' contents joined by newlines."""
    if example.text is not None:
        return example.text
    return "\n".join(str(m.get("content", "")) for m in example.messages)


def token_stats(tokenizer: Any, examples: Sequence[Example], max_length: int) -> TokenStats:
    """Count tokens of every row's text and how many rendered rows exceed `max_length`."""
    texts = [example_text(ex) for ex in examples]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    over = sum(len(render(tokenizer, ex)[0]) > max_length for ex in examples)
    return TokenStats(
        rows=len(examples),
        chars=sum(len(t) for t in texts),
        tokens=sum(len(ids) for ids in encoded),
        over_max_length=over,
        max_length=max_length,
    )

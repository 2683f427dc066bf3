"""Helpers the transforms share: which words may be replaced, and their synonyms in a text.

Leaves the choice of how many words to change to each transform.
"""

from __future__ import annotations

from tuneforge.augment.text import Tokens
from tuneforge.augment.thesaurus import STOPWORDS, synonyms


def changes_for(n_words: int, alpha: float) -> int:
    """How many words a transform changes: alpha of them, at least one (EDA's n = alpha * l)."""
    return max(1, int(alpha * n_words))


def content_words(tokens: Tokens) -> list[int]:
    """Indices of eligible words that are not stop words (those carry the meaning EDA keeps)."""
    stop = STOPWORDS.get(tokens.lang, frozenset())
    return [i for i in tokens.word_indices() if tokens.parts[i].lower() not in stop]


def synonyms_of(tokens: Tokens, index: int) -> list[str]:
    return synonyms(tokens.parts[index], tokens.lang)

"""Random swap (EDA RS): n times, two random words change places; spaces and punctuation stay.

Needs no thesaurus, so it works for any language.
"""

from __future__ import annotations

from tuneforge.augment import OpContext, register
from tuneforge.augment.text import Tokens
from tuneforge.augment.words import changes_for


@register("swap")
def random_swap(tokens: Tokens, ctx: OpContext) -> Tokens:
    parts = list(tokens.parts)
    indices = tokens.word_indices()
    if len(indices) < 2:
        return tokens
    for _ in range(changes_for(len(indices), ctx.alpha)):
        i, j = ctx.rng.sample(indices, 2)
        parts[i], parts[j] = parts[j], parts[i]
    return Tokens(parts, list(tokens.word), tokens.lang, tokens.joiner)

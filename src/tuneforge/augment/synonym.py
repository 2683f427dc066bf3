"""Synonym replacement (EDA SR): n = alpha * words content words, each replaced by a synonym.

Words are tried in a random order; those without a synonym in the thesaurus are passed over.
"""

from __future__ import annotations

from tuneforge.augment import OpContext, register
from tuneforge.augment.text import Tokens
from tuneforge.augment.words import changes_for, content_words, synonyms_of


@register("synonym", needs_thesaurus=True)
def synonym_replacement(tokens: Tokens, ctx: OpContext) -> Tokens:
    parts = list(tokens.parts)
    want = changes_for(len(tokens.word_indices()), ctx.alpha)
    candidates = content_words(tokens)
    ctx.rng.shuffle(candidates)
    done = 0
    for i in candidates:
        options = synonyms_of(tokens, i)
        if options:
            parts[i] = ctx.rng.choice(options)
            done += 1
            if done >= want:
                break
    return Tokens(parts, list(tokens.word), tokens.lang, tokens.joiner)

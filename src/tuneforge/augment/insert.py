"""Random insertion (EDA RI): n times, a synonym of a random content word goes in at a random place.

A word without synonyms is passed over (up to 10 draws per insertion, as in EDA).
"""

from __future__ import annotations

from tuneforge.augment import OpContext, register
from tuneforge.augment.text import Tokens
from tuneforge.augment.words import changes_for, content_words, synonyms_of

DRAWS_PER_INSERTION = 10


@register("insert", needs_thesaurus=True)
def random_insertion(tokens: Tokens, ctx: OpContext) -> Tokens:
    parts, word = list(tokens.parts), list(tokens.word)
    sources = content_words(tokens)
    if not sources:
        return tokens
    for _ in range(changes_for(len(tokens.word_indices()), ctx.alpha)):
        options: list[str] = []
        for _ in range(DRAWS_PER_INSERTION):
            options = synonyms_of(tokens, ctx.rng.choice(sources))
            if options:
                break
        if not options:
            continue
        new = ctx.rng.choice(options)
        words_now = [i for i, w in enumerate(word) if w]
        at = ctx.rng.choice(words_now + [len(parts)])  # before a word, or at the end
        if at == len(parts):
            # after the last word (before trailing punctuation)
            at = words_now[-1] + 1
            parts[at:at] = [tokens.joiner, new] if tokens.joiner else [new]
            word[at:at] = [False, True] if tokens.joiner else [True]
        else:
            parts[at:at] = [new, tokens.joiner] if tokens.joiner else [new]
            word[at:at] = [True, False] if tokens.joiner else [True]
    return Tokens(parts, word, tokens.lang, tokens.joiner)

"""Random deletion (EDA RD): each word goes with probability alpha; at least one word stays.

A deleted word takes one neighbouring space with it, so no double spaces are left behind.
"""

from __future__ import annotations

from tuneforge.augment import OpContext, register
from tuneforge.augment.text import Tokens


@register("delete")
def random_deletion(tokens: Tokens, ctx: OpContext) -> Tokens:
    indices = tokens.word_indices()
    if len(indices) < 2:
        return tokens
    gone = {i for i in indices if ctx.rng.random() < ctx.alpha}
    if len(gone) == len(indices):  # EDA keeps one random word
        gone.discard(ctx.rng.choice(indices))
    if not gone:
        return tokens
    drop = set(gone)
    for i in sorted(gone) if tokens.joiner else ():  # Chinese has no spaces between words
        after, before = i + 1, i - 1
        if after < len(tokens.parts) and tokens.parts[after].isspace() and after not in drop:
            drop.add(after)
        elif before >= 0 and tokens.parts[before].isspace() and before not in drop:
            drop.add(before)
    keep = [k for k in range(len(tokens.parts)) if k not in drop]
    return Tokens(
        [tokens.parts[k] for k in keep], [tokens.word[k] for k in keep], tokens.lang, tokens.joiner
    )

"""Data scarcity: EDA transforms registered by name (one module each), applied to the prompt side
of rows with a strength alpha, N seeded copies per row; synthesis filters in synth.py.

Transforms see tokenised text (text.py) and synonyms (thesaurus.py); which rows and fields they
touch is rows.py's. Nothing here loads a model: generation is the synthesize recipe's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.augment.text import THESAURUS_LANGS, Tokens, detect_language, tokenize
from tuneforge.errors import DataError, UsageError


@dataclass(frozen=True)
class OpContext:
    """What a transform may use: the copy's own random generator and the strength alpha."""

    rng: random.Random
    alpha: float


@dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[Tokens, OpContext], Tokens]
    needs_thesaurus: bool  # synonym and insert look words up; swap and delete do not


_REGISTRY: dict[str, Transform] = {}


def register(name: str, *, needs_thesaurus: bool = False):
    """Function decorator: make `fn(tokens, ctx) -> tokens` available as the op `name`."""

    def wrap(fn: Callable[[Tokens, OpContext], Tokens]):
        if name in _REGISTRY:
            raise ValueError(f"augment op {name!r} registered twice")
        _REGISTRY[name] = Transform(name, fn, needs_thesaurus)
        return fn

    return wrap


def op_names() -> list[str]:
    return list(_REGISTRY)


def get_ops(names: list[str] | tuple[str, ...], where: str = "--ops") -> list[Transform]:
    """The transforms for `names`, or UsageError naming the first unknown one."""
    if not names:
        raise UsageError(f"{where}: give at least one of {', '.join(_REGISTRY)}")
    for name in names:
        if name not in _REGISTRY:
            raise UsageError(f"{where}: unknown op {name!r}; known ops: {', '.join(_REGISTRY)}")
    return [_REGISTRY[name] for name in names]


def check_lang(lang: str, where: str = "--lang") -> str:
    """`lang` if a thesaurus exists for it (or auto); else DataError naming the language."""
    if lang != "auto" and lang not in THESAURUS_LANGS:
        known = ", ".join(f"{k} ({v})" for k, v in THESAURUS_LANGS.items())
        raise DataError(f"{where}: no thesaurus for language {lang!r}; available: auto, {known}")
    return lang


def augment_text(text: str, op: Transform, ctx: OpContext, lang: str = "auto") -> str:
    """`text` after one transform. lang "auto" picks the language per text (detect_language)."""
    if lang == "auto":
        found = detect_language(text)
        if found is None:  # no letters at all: nothing to change
            return text
        if found not in THESAURUS_LANGS and op.needs_thesaurus:
            raise DataError(
                f"text is in {found}, which has no thesaurus for the {op.name} op "
                f"(available: zh, en); drop {op.name} from the ops or set the language"
            )
        lang = found
    return op.apply(tokenize(text, lang), ctx).text()


def _discover() -> None:
    """Import every transform module of this package so that each registers itself."""
    import importlib

    for name in ("synonym", "insert", "swap", "delete"):
        importlib.import_module(f"{__name__}.{name}")


_discover()

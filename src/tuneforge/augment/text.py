"""Split a text into tokens the EDA transforms may touch, and tell which language a text is in.

Only tokens of the chosen language are "words" (eligible); everything else (spaces, punctuation,
numbers, words of another script) is kept as it is. Synonyms live in thesaurus.py.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

#: Languages with a thesaurus (the transforms that need synonyms work only in these).
THESAURUS_LANGS = {"zh": "Tongyici Cilin", "en": "WordNet 3.0"}
LANG_CHOICES = ("auto", *THESAURUS_LANGS)

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+(?:['\-][A-Za-z]+)*")
_REGEX_TOKENS = re.compile(r"[A-Za-z]+(?:['\-][A-Za-z]+)*|\w+|\s+|[^\w\s]")
_SCRIPT_NAMES = {
    "CJK": "zh",
    "LATIN": "en",
    "HIRAGANA": "ja (Japanese kana)",
    "KATAKANA": "ja (Japanese kana)",
    "HANGUL": "ko (Korean Hangul)",
    "CYRILLIC": "Cyrillic script",
    "ARABIC": "Arabic script",
    "GREEK": "Greek script",
    "HEBREW": "Hebrew script",
    "DEVANAGARI": "Devanagari script",
    "THAI": "Thai script",
}


def is_zh_word(token: str) -> bool:
    return bool(_HAN.search(token))


def is_en_word(token: str) -> bool:
    return bool(_LATIN_WORD.fullmatch(token))


def _script(char: str) -> str:
    name = unicodedata.name(char, "")
    first = name.split(" ", 1)[0]
    return first if first in _SCRIPT_NAMES else "OTHER"


def detect_language(text: str) -> str | None:
    """ "zh", "en", another language/script name, or None for a text without letters.

    By script: Han characters count one each, Latin words one each (a Chinese sentence with an
    English product name is Chinese); kana or Hangul anywhere make it Japanese or Korean.
    """
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            counts[_script(char)] += 1
    if not counts:
        return None
    for script in ("HIRAGANA", "KATAKANA", "HANGUL"):
        if counts[script]:
            return _SCRIPT_NAMES[script]
    han, latin_words = counts["CJK"], len(_LATIN_WORD.findall(text))
    others = {s: n for s, n in counts.items() if s not in ("CJK", "LATIN", "OTHER")}
    top_other = max(others.items(), key=lambda kv: kv[1], default=(None, 0))
    if top_other[1] > max(han, counts["LATIN"]):
        return _SCRIPT_NAMES[top_other[0]]
    if han == 0 and latin_words == 0:
        return "an unknown script"
    return "zh" if han >= latin_words else "en"


@dataclass(frozen=True)
class Tokens:
    """A tokenised text: `parts` joined give the text back; `word[i]` marks the eligible tokens.

    Transforms build new Tokens and never change one (tokenize caches them per text).
    """

    parts: Sequence[str]
    word: Sequence[bool]
    lang: str
    joiner: str = field(default=" ")  # what separates an inserted word from its neighbours

    def text(self) -> str:
        return "".join(self.parts)

    def word_indices(self) -> list[int]:
        return [i for i, w in enumerate(self.word) if w]


@lru_cache(maxsize=4096)  # the N copies of a row tokenise it once
def tokenize(text: str, lang: str) -> Tokens:
    """Chinese with jieba (only Han tokens are words); English by regex (only Latin words are)."""
    if lang == "zh":
        parts = tuple(_jieba_cut(text))
        return Tokens(parts, tuple(is_zh_word(p) for p in parts), "zh", joiner="")
    parts = tuple(_REGEX_TOKENS.findall(text))
    if "".join(parts) != text:  # the regex covers every character; guard the invariant anyway
        raise RuntimeError("tokenize: the tokens do not rebuild the text")
    if lang == "en":
        return Tokens(parts, tuple(is_en_word(p) for p in parts), "en")
    # No thesaurus: swap and delete still work on whitespace-separated words.
    return Tokens(parts, tuple(bool(re.search(r"\w", p)) for p in parts), lang)


_JIEBA = None


def _jieba_cut(text: str) -> list[str]:
    global _JIEBA
    if _JIEBA is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _JIEBA = jieba
    return list(_JIEBA.cut(text, HMM=False))  # no HMM: the same cut whatever else ran before

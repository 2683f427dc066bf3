"""prepare_data end to end on small files: row accounting (R4), truncation policies, splits, batches.

Uses the tiny ChatML tokenizer from conftest; no model.
"""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.constants import IGNORE_INDEX
from tuneforge.data.formats import Example
from tuneforge.data.pipeline import (
    TokenizedExample,
    collate,
    format_check_report,
    length_stats,
    prepare_data,
    split_examples,
)
from tuneforge.errors import DataError


def chat(question, answer):
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_jsonl(path, rows):
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", "utf-8"
    )
    return path


@pytest.fixture
def mixed_file(tmp_path):
    """Lines 1-2 good, 3 invalid JSON, 4 missing field, 5 no assistant turn, 6 very long answer."""
    return write_jsonl(
        tmp_path / "train.jsonl",
        [
            chat("What is two plus two?", "Four."),
            chat("Say hi", "hi"),
            "{broken",
            {"messages": [{"role": "user"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            chat("Tell a story", "The quick brown fox jumps over the lazy dog. " * 10),
        ],
    )


def test_skip_counts_every_row(mixed_file, tiny_tokenizer):
    data = prepare_data(
        mixed_file, None, tiny_tokenizer, on_bad_row="skip", max_length=64, truncation="drop"
    )
    r = data.report
    assert r.format == "messages"
    assert r.rows_read == 6 and r.rows_used == 2
    assert r.dropped == {
        "invalid_json": 1,
        "missing_field": 1,
        "no_assistant_turn": 1,
        "over_length": 1,
    }
    assert r.rows_read == r.rows_used + sum(r.dropped.values())
    assert [b.line for b in r.bad_rows] == [3, 4, 5, 6]
    assert str(r.bad_rows[-1]).startswith(f"{mixed_file}:6: ") and "> max_length 64" in str(
        r.bad_rows[-1]
    )
    assert (r.train_size, r.validation_size) == (2, 0) and data.validation == []
    json.dumps(r.to_dict())  # the manifest can store it


def test_fail_stops_before_tokenising(mixed_file, tiny_tokenizer):
    with pytest.raises(DataError) as info:
        prepare_data(mixed_file, None, tiny_tokenizer)
    message = str(info.value)
    assert f"{mixed_file}:3: invalid JSON" in message
    assert f"{mixed_file}:4: messages[0]: missing field 'content'" in message
    assert f"{mixed_file}:5: conversation has no assistant turn" in message
    assert ":6:" not in message  # over-length is a truncation matter, not a bad row


def test_truncate_keeps_rows_and_counts_them(tmp_path, tiny_tokenizer):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 10
    path = write_jsonl(tmp_path / "t.jsonl", [chat("Hi", "Four."), chat("Tell", long_answer)])
    data = prepare_data(path, None, tiny_tokenizer, max_length=40)
    assert data.report.truncated == 1 and data.report.dropped == {}
    cut = data.train[1]
    assert len(cut.input_ids) == len(cut.labels) == 40
    assert cut.labels[-1] != IGNORE_INDEX
    assert data.report.token_lengths["max"] == 40


def test_truncation_that_leaves_no_trainable_token_drops_the_row(tmp_path, tiny_tokenizer):
    long_question = "The quick brown fox jumps over the lazy dog. " * 10
    path = write_jsonl(tmp_path / "t.jsonl", [chat("Hi", "Four."), chat(long_question, "Yes.")])
    data = prepare_data(path, None, tiny_tokenizer, max_length=40)
    assert data.report.dropped == {"no_trainable_tokens": 1}
    assert data.report.truncated == 0 and data.report.rows_used == 1
    assert str(data.report.bad_rows[0]).startswith(f"{path}:2: no trainable tokens")


def test_truncation_error_names_file_line_and_length(tmp_path, tiny_tokenizer):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 10
    path = write_jsonl(tmp_path / "t.jsonl", [chat("Hi", "Four."), chat("Tell", long_answer)])
    n_tokens = len(prepare_data(path, None, tiny_tokenizer, max_length=4096).train[1].input_ids)
    with pytest.raises(DataError, match=rf"{path}:2: {n_tokens} tokens > max_length 40"):
        prepare_data(path, None, tiny_tokenizer, max_length=40, truncation="error")


def test_bad_policy_values(mixed_file, tiny_tokenizer):
    with pytest.raises(ValueError, match="data.truncation"):
        prepare_data(mixed_file, None, tiny_tokenizer, truncation="cut")
    with pytest.raises(ValueError, match="data.on_bad_row"):
        prepare_data(mixed_file, None, tiny_tokenizer, on_bad_row="ignore")
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        prepare_data(mixed_file, 1.5, tiny_tokenizer, on_bad_row="skip")


def test_text_format_all_tokens_trained(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"text": "The quick brown fox."}, {"text": "Bonjour le monde."}]
    )
    data = prepare_data(path, None, tiny_tokenizer)
    assert data.report.format == "text"
    for ex in data.train:
        assert ex.labels == ex.input_ids and ex.input_ids[-1] == tiny_tokenizer.eos_token_id


def examples(n):
    return [Example(messages=[], text=f"row {i}", source=f"f:{i + 1}") for i in range(n)]


def test_split_is_seeded_disjoint_and_complete():
    rows = examples(20)
    train, val = split_examples(rows, 0.25, seed=3)
    again = split_examples(rows, 0.25, seed=3)
    assert (train, val) == again
    assert len(val) == 5 and len(train) == 15
    assert {e.source for e in train}.isdisjoint({e.source for e in val})
    assert sorted(e.source for e in train + val) == sorted(e.source for e in rows)
    assert split_examples(rows, 0.25, seed=4)[1] != val  # the seed matters


def test_split_keeps_one_example_each_side_when_possible():
    assert [len(s) for s in split_examples(examples(2), 0.01, 0)] == [1, 1]
    assert [len(s) for s in split_examples(examples(3), 0.99, 0)] == [1, 2]
    assert [len(s) for s in split_examples(examples(1), 0.5, 0)] == [1, 0]


def test_validation_ratio_in_prepare_data(tmp_path, tiny_tokenizer):
    rows = [chat(f"Question {i}", f"Answer {i}.") for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    a = prepare_data(path, 0.3, tiny_tokenizer, seed=1)
    b = prepare_data(path, 0.3, tiny_tokenizer, seed=1)
    assert [e.source for e in a.validation] == [e.source for e in b.validation]
    assert (a.report.train_size, a.report.validation_size) == (7, 3)
    assert {e.source for e in a.train}.isdisjoint({e.source for e in a.validation})


def test_validation_file_is_loaded_and_counted(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b"), chat("c", "d")])
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "e", "output": "f"}, "{bad"])
    data = prepare_data(train, str(val), tiny_tokenizer, on_bad_row="skip")
    r = data.report
    assert (r.train_size, r.validation_size) == (2, 1)
    assert r.rows_read == 4 and r.dropped == {"invalid_json": 1}
    assert str(r.bad_rows[0]).startswith(f"{val}:2: invalid JSON")
    assert data.validation[0].source == f"{val}:1"


def test_all_rows_dropped_is_an_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), "{bad"])
    with pytest.raises(DataError, match="no usable training rows"):
        prepare_data(path, None, tiny_tokenizer, on_bad_row="skip", max_length=2, truncation="drop")


def test_render_errors_follow_on_bad_row(tmp_path, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('no boom') }}{% endif %}"
        "{{ m['content'] + eos_token }}{% endfor %}"
    )
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), chat("boom", "c")])
    with pytest.raises(DataError, match=rf"{path}:2: cannot render: .*no boom"):
        prepare_data(path, None, tok)
    data = prepare_data(path, None, tok, on_bad_row="skip")
    assert data.report.dropped == {"render_error": 1} and data.report.rows_used == 1


def test_collate_pads_right_and_masks_pads():
    batch = [
        TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7], "f:1"),
        TokenizedExample([8], [8], "f:2"),
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in out.values())
    assert collate(batch, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)


def test_collate_keeps_the_trained_eos_when_pad_is_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id  # the tiny tokenizer has pad = eos, like many chat models
    batch = [
        TokenizedExample([5, eos], [5, eos], "f:1"),
        TokenizedExample([5, 6, eos], [5, 6, eos], "f:2"),
    ]
    out = collate(batch, pad_id=tiny_tokenizer.pad_token_id)
    assert out["labels"][0].tolist() == [5, eos, IGNORE_INDEX]
    assert out["attention_mask"][0].tolist() == [1, 1, 0]


def test_length_stats():
    stats = length_stats([1, 2, 3, 4, 10])
    assert stats == {"min": 1.0, "mean": 4.0, "p50": 3.0, "p95": pytest.approx(8.8), "max": 10.0}
    assert length_stats([])["max"] == 0.0


def test_format_check_report(mixed_file, tiny_tokenizer):
    data = prepare_data(
        mixed_file, None, tiny_tokenizer, on_bad_row="skip", max_length=64, truncation="drop"
    )
    text = format_check_report(data, tiny_tokenizer)
    assert "format: messages" in text
    assert "rows: read 6, used 2, dropped 4" in text
    assert "invalid_json 1" in text and "over_length 1" in text
    assert f"{mixed_file}:3: invalid JSON" in text
    assert "token lengths: min" in text and "p95" in text
    assert (
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n[[Four.<|im_end|>]]\n"
        in text
    )

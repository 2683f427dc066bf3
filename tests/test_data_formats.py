"""Reading data files: every format in every file type, auto-detection, bad rows as file:line.

Fast unit tests on small files written to tmp_path; no tokenizer or model.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneforge.data.formats import (
    FORMATS,
    BadRow,
    Example,
    RowError,
    detect_format,
    load_examples,
    read_records,
    to_example,
)
from tuneforge.errors import DataError

ROWS = {
    "alpaca": [
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi.", "output": "hi", "system": "Be brief."},
    ],
    "messages": [
        {
            "messages": [
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Four."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
    ],
    "sharegpt": [
        {
            "conversations": [
                {"from": "human", "value": "What is two plus two?"},
                {"from": "gpt", "value": "Four."},
            ]
        },
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
            ]
        },
    ],
    "text": [{"text": "The quick brown fox."}, {"text": "jumps over the lazy dog."}],
    "classification": [{"text": "great book", "label": "positive"}, {"text": "bad", "label": 0}],
}

EXPECTED_FIRST = {
    "alpaca": [
        {"role": "user", "content": "Add the numbers.\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ],
    "messages": ROWS["messages"][0]["messages"],
    "sharegpt": ROWS["messages"][0]["messages"],
    "classification": [
        {"role": "user", "content": "great book"},
        {"role": "assistant", "content": "positive"},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def write_file(tmp_path, kind, rows):
    """Write rows as .jsonl / .json / .csv / .parquet; CSV cells holding lists become JSON."""
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        return write_jsonl(path, rows)
    if kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), "utf-8")
    elif kind == "csv":
        columns = sorted({key for row in rows for key in row})
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                cells = [row.get(c, "") for c in columns]
                writer.writerow([json.dumps(c) if isinstance(c, list) else c for c in cells])
    elif kind == "parquet":  # a parquet column has one type: integer labels become strings
        rows = [{k: str(v) if k == "label" else v for k, v in row.items()} for row in rows]
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_in_every_file_type(tmp_path, fmt, kind):
    path = write_file(tmp_path, kind, ROWS[fmt])
    result = load_examples(path)
    assert result.format == fmt
    assert result.rows_read == 2 and not result.bad_rows
    first = result.examples[0]
    if fmt == "text":
        assert first.text == "The quick brown fox." and first.messages == []
    else:
        assert first.messages == EXPECTED_FIRST[fmt]
    if fmt == "classification":
        assert [e.label for e in result.examples] == ["positive", "0"]
    # source is file:line where line is 2 for the first data row of a CSV (header is line 1)
    assert first.source == f"{path}:{2 if kind == 'csv' else 1}"


def test_alpaca_system_and_messages_label(tmp_path):
    second = to_example(ROWS["alpaca"][1], "alpaca", "f:2")
    assert second.messages[0] == {"role": "system", "content": "Be brief."}
    row = dict(ROWS["messages"][0], label="positive", extra={"ignored": True})
    example = to_example(row, "messages", "f:1")
    assert example.label == "positive" and example.messages == ROWS["messages"][0]["messages"]


def test_openai_content_parts_are_joined():
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "c"},
        ]
    }
    assert to_example(row, "messages", "f:1").messages[0]["content"] == "ab"


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [], "label": "x"}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "x", "output": "y"}, "alpaca"),
        ({"text": "x"}, "text"),
        ({"text": "x", "label": 1}, "classification"),
        ({"text": "x", "label": None}, "text"),
    ],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_names_the_keys_it_saw():
    with pytest.raises(DataError, match=r"\['prompt', 'completion'\]|\['completion', 'prompt'\]"):
        detect_format({"prompt": "a", "completion": "b"})


def test_auto_detection_skips_leading_invalid_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{oops\n{"instruction": "a", "output": "b"}\n', "utf-8")
    result = load_examples(path, on_bad_row="skip")
    assert result.format == "alpaca" and len(result.examples) == 1
    assert [str(b) for b in result.bad_rows][0].startswith(f"{path}:1: invalid JSON")


def test_unknown_keys_everywhere_fail_with_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=rf"{path}:1: no format fits a row with keys"):
        load_examples(path)


BAD_ROWS = [
    ("{not json", "invalid_json", "invalid JSON"),
    ('{"instruction": "a"}', "missing_field", "missing field 'output'"),
    (
        '{"instruction": "a", "output": 5}',
        "wrong_type",
        "field 'output' must be a string, got integer",
    ),
    ('{"instruction": "a", "output": "  "}', "empty_response", "empty response: 'output' is blank"),
    (
        '{"instruction": "a", "input": [1], "output": "b"}',
        "wrong_type",
        "field 'input' must be a string, got array",
    ),
    ("[1, 2]", "not_an_object", "row is a JSON array, expected an object"),
]


def test_each_bad_row_kind_is_reported_with_file_line_reason(tmp_path):
    good = '{"instruction": "a", "output": "b"}'
    lines = [good, ""] + [row for row, _, _ in BAD_ROWS]  # a blank line is not a row
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    result = load_examples(path, fmt="alpaca", on_bad_row="skip")
    assert result.rows_read == 1 + len(BAD_ROWS)
    assert len(result.examples) == 1
    assert [(b.line, b.kind) for b in result.bad_rows] == [
        (i + 3, kind) for i, (_, kind, _) in enumerate(BAD_ROWS)
    ]
    for bad, (_, _, reason) in zip(result.bad_rows, BAD_ROWS, strict=True):
        assert str(bad).startswith(f"{path}:{bad.line}: {reason}")


@pytest.mark.parametrize(
    ("row", "kind", "reason"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "no_assistant_turn",
            "conversation has no assistant turn",
        ),
        ({"messages": "hi"}, "wrong_type", "field 'messages' must be an array, got string"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "bad_role",
            "messages[0].role 'bot' is not one of",
        ),
        ({"messages": [{"role": "user"}]}, "missing_field", "messages[0]: missing field 'content'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "empty_response",
            "empty response: messages[1] (assistant) is blank",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "bad_turn_order",
            "conversation starts with an assistant turn",
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}]},
            "no_assistant_turn",
            "no assistant turn",
        ),
        (
            {"conversations": [{"from": "bing", "value": "x"}]},
            "bad_role",
            "conversations[0].from 'bing'",
        ),
        ({"text": ""}, "empty_text", "empty text"),
        ({"text": 3}, "wrong_type", "field 'text' must be a string, got integer"),
        (
            {"text": "x", "label": True},
            "wrong_type",
            "field 'label' must be a string or integer, got boolean",
        ),
        ({"text": "x", "label": ""}, "empty_response", "empty label"),
    ],
)
def test_row_errors_for_conversation_and_text_formats(row, kind, reason):
    fmt = detect_format(row) if "label" not in row else "classification"
    with pytest.raises(RowError, match=re.escape(reason)) as info:
        to_example(row, fmt, "f:1")
    assert info.value.kind == kind


def test_fail_collects_all_bad_rows_and_lists_them(tmp_path):
    rows = ['{"text": "ok"}'] + ["{broken"] * 25
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows), "utf-8")
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert len(info.value.bad_rows) == 25
    assert f"{path}:2: invalid JSON" in message and f"{path}:21: invalid JSON" in message
    assert f"{path}:22:" not in message and "... and 5 more" in message
    assert "data.on_bad_row: skip" in message


def test_skip_returns_bad_rows_and_counts_add_up(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": ""}, {"text": "b"}])
    result = load_examples(path, on_bad_row="skip")
    assert result.rows_read == len(result.examples) + len(result.bad_rows) == 3
    assert result.bad_rows == [BadRow(str(path), 2, "empty text: 'text' is blank", "empty_text")]


def test_csv_lines_count_header_and_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",pos\n\n,neg\nx,y,z\n', "utf-8")
    result = load_examples(path, on_bad_row="skip")
    assert result.examples[0] == Example(
        messages=[
            {"role": "user", "content": "two\nlines"},
            {"role": "assistant", "content": "pos"},
        ],
        label="pos",
        source=f"{path}:2",
    )
    assert [str(b) for b in result.bad_rows] == [
        f"{path}:5: empty text: 'text' is blank",
        f"{path}:6: row has 3 fields, the header has 2",
    ]


def test_csv_conversation_column_with_bad_json(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user""}"\n', "utf-8")
    result = load_examples(path, fmt="messages", on_bad_row="skip")
    assert result.bad_rows[0].kind == "invalid_json" and result.bad_rows[0].line == 2


def test_json_array_row_numbers_and_jsonl_named_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, "oops", {"text": "b"}]), "utf-8")
    result = load_examples(path, on_bad_row="skip")
    assert [str(b) for b in result.bad_rows] == [
        f"{path}:2: row is a JSON string, expected an object"
    ]
    lines_path = write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])
    assert len(load_examples(lines_path).examples) == 2


def test_parquet_nulls_count_as_missing(tmp_path):
    path = write_file(
        tmp_path, "parquet", [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    )
    result = load_examples(path, on_bad_row="skip")
    assert result.format == "alpaca"
    assert [str(b) for b in result.bad_rows] == [f"{path}:2: missing field 'output'"]


def test_invalid_utf8_line_is_one_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    result = load_examples(path, on_bad_row="skip")
    assert len(result.examples) == 1 and result.bad_rows[0].kind == "invalid_encoding"


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n", "utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "bad.json").write_text('[{"text": "a"},', "utf-8")
    with pytest.raises(DataError, match=r"bad.json:1: invalid JSON"):
        load_examples(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="data.format"):
        load_examples(tmp_path / "empty.jsonl", fmt="chat")


def test_formats_module_does_not_import_torch():
    code = "import sys, tuneforge.data.formats; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""`tuneforge augment`: the output file, its determinism, and every broken input of the table."""

import importlib.util
import json
from pathlib import Path

import pytest

from tuneforge.cli import main

_SPEC = importlib.util.spec_from_file_location(
    "bad_inputs_augment", Path(__file__).parent / "bad_inputs" / "augment.py"
)
BAD = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(BAD)

ROWS = [
    {"text": "The happy child reads a good book about a brave dog.", "label": "positive"},
    {"text": "这本书的质量非常好，我很喜欢。", "label": "positive"},
    {"text": "The quiet garden was a terrible place to wait.", "label": "negative"},
]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_writes_rows_then_copies_deterministically(tmp_path, capsys):
    data = write(tmp_path / "in.jsonl", ROWS)
    argv = ["augment", str(data), "--n", "4", "--alpha", "0.2", "--seed", "5"]
    assert main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert "rows/s" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0
    a = (tmp_path / "a.jsonl").read_text()
    assert a == (tmp_path / "b.jsonl").read_text()
    out = [json.loads(line) for line in a.splitlines()]
    assert out[:3] == ROWS
    copies = out[3:]
    assert 0 < len(copies) <= 12
    for row in copies:
        source = ROWS[int(row["augmented"]["from"].rsplit(":", 1)[1]) - 1]
        assert row["label"] == source["label"] and row["text"] != source["text"]
    assert {row["augmented"]["op"] for row in copies} == {"synonym", "insert", "swap", "delete"}
    assert main([*argv, "--only-new", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()] == copies


@pytest.mark.parametrize("row", BAD.ROWS, ids=[r["id"] for r in BAD.ROWS])
def test_bad_input(row, tmp_path, capsys, tiny_model_dir):
    for name, content in row.get("files", {}).items():
        (tmp_path / name).write_text(content)
    before = set(tmp_path.iterdir())
    argv = [
        a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_model_dir))
        for a in row["argv"]
    ]
    assert main(argv) == row["exit"]
    err = capsys.readouterr().err
    assert row["stderr"] in err and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # nothing half-written

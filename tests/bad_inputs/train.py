"""Bad-input rows for `tuneforge train` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BINARY, BROKEN_MODELS, PARQUET_WRONG_TYPES, TOY_JSONL, run_config

CFG = "{tmp}/run.yaml"
VALID = {"run.yaml": run_config(), "train.jsonl": TOY_JSONL}


def _data(name: str, content, substring: str, **extra) -> dict:
    """A row whose data.train is `name` with `content` (None: a directory of that name)."""
    files = {"run.yaml": run_config(train=f"{{tmp}}/{name}")}
    row = {"id": extra.pop("id"), "argv": ["train", CFG], "files": files, "stderr": substring}
    if content is None:
        row["setup"] = [("mkdir", name)]
    else:
        files[name] = content
    return {**row, **extra}


ROWS = [
    {"id": "train-config-missing", "argv": ["train", "{tmp}/nope.yaml"],
     "stderr": "{tmp}/nope.yaml: config file not found"},
    {"id": "train-config-is-a-directory", "argv": ["train", "{tmp}/cfg"], "setup": [("mkdir", "cfg")],
     "stderr": "{tmp}/cfg: is a directory"},
    {"id": "train-config-binary", "argv": ["train", CFG], "files": {"run.yaml": BINARY},
     "stderr": "run.yaml: not a text file"},
    {"id": "train-config-broken-yaml", "argv": ["train", CFG], "files": {"run.yaml": "model: [oops\n"},
     "stderr": "run.yaml:2: not valid YAML"},
    {"id": "train-config-not-a-mapping", "argv": ["train", CFG], "files": {"run.yaml": "- a\n- b\n"},
     "stderr": "the top level must be a mapping"},
    {"id": "train-config-unknown-key", "argv": ["train", CFG], "files": {"run.yaml": "train: {lrr: 1}\n"},
     "stderr": "train.lrr"},
    {"id": "train-config-wrong-type", "argv": ["train", CFG], "files": {"run.yaml": "train: {batch_size: many}\n"},
     "stderr": "train.batch_size"},
    {"id": "train-override-empty-key", "argv": ["train", CFG, "a..b=1"], "files": VALID,
     "stderr": "a..b=1: empty key in the override"},
    {"id": "train-override-empty-value", "argv": ["train", CFG, "train.lr="], "files": VALID,
     "stderr": "train.lr: "},
    {"id": "train-override-bad-yaml", "argv": ["train", CFG, "train.lr=[1"], "files": VALID,
     "stderr": "train.lr: the value '[1' is not valid YAML"},
    {"id": "train-override-without-equals", "argv": ["train", CFG, "train.lr"], "files": VALID,
     "stderr": "train.lr: an override must look like key.path=value"},
    {"id": "train-override-into-a-value", "argv": ["train", CFG, "train.lr.x=3"], "files": VALID,
     "stderr": "train.lr"},
    {"id": "train-override-unknown-method", "argv": ["train", CFG, "method.name=lorax"], "files": VALID,
     "stderr": "method.name: 'lorax' is not one of"},
    {"id": "train-unknown-flag", "argv": ["train", CFG, "--bogus"], "files": VALID,
     "stderr": "unrecognized arguments: --bogus"},
    {"id": "train-missing-config-argument", "argv": ["train"],
     "stderr": "tuneforge train: the following arguments are required: config"},
    {"id": "train-resume-without-checkpoint", "argv": ["train", CFG, "--resume", "auto"], "files": VALID,
     "stderr": "--resume auto: no complete checkpoint"},
    {"id": "train-resume-outside-the-run", "argv": ["train", CFG, "--resume", "../../etc"], "files": VALID,
     "stderr": "a checkpoint must lie inside"},
    {"id": "train-output-not-empty", "argv": ["train", CFG], "files": {**VALID, "out/keep.txt": "x"},
     "stderr": "output.dir: {tmp}/out is not empty"},
    {"id": "train-output-is-a-file", "argv": ["train", CFG], "files": {**VALID, "out": "x"},
     "stderr": "{tmp}/out"},
    _data("data.jsonl", None, "{tmp}/data.jsonl: is a directory", id="train-data-is-a-directory"),
    _data("data.jsonl", BINARY, "not valid UTF-8", id="train-data-binary-jsonl"),
    _data("data.csv", BINARY, "{tmp}/data.csv: not valid UTF-8", id="train-data-binary-csv"),
    _data("data.parquet", BINARY, "{tmp}/data.parquet: unreadable Parquet file", id="train-data-binary-parquet"),
    _data("data.csv", "instruction,input\nhello,world\n", "{tmp}/data.csv:2: missing field 'output'",
          id="train-data-csv-missing-column"),
    _data("data.parquet", PARQUET_WRONG_TYPES, "data.parquet:1: field 'instruction' must be a string, got integer",
          id="train-data-parquet-wrong-types"),
    _data("data.json", '{"messages": []}', "{tmp}/data.json: expected a JSON array", id="train-data-json-object"),
    _data("data.jsonl", "", "{tmp}/data.jsonl: the file has no rows", id="train-data-empty"),
    _data("data.txt", "hello\n", "unsupported file type '.txt'", id="train-data-unsupported-suffix"),
    {"id": "train-data-missing", "argv": ["train", CFG], "files": {"run.yaml": run_config(train="{tmp}/none.jsonl")},
     "stderr": "{tmp}/none.jsonl: file not found"},
    *(
        {"id": f"train-model-{name}", "argv": ["train", CFG],
         "files": {**files, **VALID, "run.yaml": run_config(model=model)}, "setup": setup, "stderr": substring}
        for name, model, files, setup, substring in BROKEN_MODELS
    ),
]  # fmt: skip

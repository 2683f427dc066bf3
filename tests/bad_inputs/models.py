"""Broken inputs of `tuneforge models` (issue 19's table): each a one-line error, exit 2."""

ROWS = [
    {
        "id": "models-missing-data-file",
        "argv": ["models", "--data", "{tmp}/absent.jsonl"],
        "exit": 2,
        "stderr": "--data",
    },
    {
        "id": "models-accept-unknown-license",
        "argv": ["models", "--accept-license", "no-such-model"],
        "exit": 2,
        "stderr": "--accept-license",
    },
    {
        "id": "models-bad-max-length",
        "argv": ["models", "--max-length", "0"],
        "exit": 2,
        "stderr": "--max-length",
    },
    {
        "id": "models-local-dir-without-config",
        "argv": ["models", "--model", "{tmp}"],
        "exit": 2,
        "stderr": "model.name",
    },
]

"""Broken inputs of `tuneforge plan` (issue 19's table): each a one-line error, exit 2."""

_CONFIG = "model:\n  name: {model}\ndata:\n  train: {tmp}/train.jsonl\n  validation: null\n"
_ROW = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'

ROWS = [
    {
        "id": "plan-unknown-model",
        "argv": ["plan", "{tmp}/run.yaml"],
        "files": {
            "run.yaml": "model:\n  name: no-such-model\ndata:\n  train: {tmp}/train.jsonl\n",
            "train.jsonl": _ROW,
        },
        "exit": 2,
        "stderr": "model.name",
    },
    {
        "id": "plan-missing-data-file",
        "argv": ["plan", "{tmp}/run.yaml"],
        "files": {"run.yaml": "model:\n  name: {model}\ndata:\n  train: {tmp}/absent.jsonl\n"},
        "exit": 2,
        "stderr": "absent.jsonl",
    },
    {
        "id": "plan-memory-not-a-size",
        "argv": ["plan", "{tmp}/run.yaml", "--memory", "lots"],
        "files": {"run.yaml": _CONFIG, "train.jsonl": _ROW},
        "exit": 2,
        "stderr": "--memory",
    },
    {
        "id": "plan-fits-no-setting",
        "argv": ["plan", "{tmp}/run.yaml", "--memory", "1MB"],
        "files": {"run.yaml": _CONFIG, "train.jsonl": _ROW},
        "exit": 2,
        "stderr": "no setting fits",
    },
    {
        "id": "plan-bad-override",
        "argv": ["plan", "{tmp}/run.yaml", "train.batch_size=0"],
        "files": {"run.yaml": _CONFIG, "train.jsonl": _ROW},
        "exit": 2,
        "stderr": "train.batch_size",
    },
]

"""Broken inputs of `tuneforge train`'s distributed and quantisation options (issue 16), as rows for
the shared bad-input runner (format: HELPERS.md / tests/bad_inputs/README.md)."""

CONFIG = "model: {name: x}\ndata: {train: t.jsonl}\n"

ROWS = [
    {
        "id": "train-nproc-zero",
        "argv": ["train", "{tmp}/c.yaml", "--nproc", "0"],
        "files": {"c.yaml": CONFIG},
        "exit": 2,
        "stderr": "--nproc 0: must be at least 1",
    },
    {
        "id": "train-port-without-nproc",
        "argv": ["train", "{tmp}/c.yaml", "--port", "29500"],
        "files": {"c.yaml": CONFIG},
        "exit": 2,
        "stderr": "--port: only with --nproc N",
    },
    {
        "id": "train-unknown-strategy",
        "argv": ["train", "{tmp}/c.yaml", "train.strategy=fsdp3"],
        "files": {"c.yaml": CONFIG},
        "exit": 2,
        "stderr": "train.strategy: 'fsdp3' is not one of auto, single, ddp, fsdp2, deepspeed",
    },
    {
        "id": "train-zero-stage-one",
        "argv": ["train", "{tmp}/c.yaml", "train.zero_stage=1"],
        "files": {"c.yaml": CONFIG},
        "exit": 2,
        "stderr": "train.zero_stage: 1 is not one of 2, 3",
    },
    {
        "id": "train-unknown-quantize",
        "argv": ["train", "{tmp}/c.yaml", "model.quantize=nf8"],
        "files": {"c.yaml": CONFIG},
        "exit": 2,
        "stderr": "model.quantize: 'nf8' is not one of nf4",
    },
    {
        "id": "train-nf4-with-fsdp2",
        "argv": ["train", "{tmp}/c.yaml", "model.quantize=nf4", "train.strategy=fsdp2"],
        "files": {"c.yaml": CONFIG},
        "exit": 2,
        "stderr": "model.quantize: nf4 runs with train.strategy single or ddp, not fsdp2",
    },
]

"""Bad-input rows for `tuneforge compare` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import TOY_JSONL, TOY_LABELS, run_config

CFG = "{tmp}/run.yaml"
VALID = {"run.yaml": run_config(data={"train": "{tmp}/train.jsonl", "validation": 0.25}),
         "train.jsonl": TOY_JSONL, "test.jsonl": TOY_LABELS}  # fmt: skip
ARGS = ["--out", "{tmp}/cmp", "--doc", "{tmp}/cmp.md", "--methods", "lora"]

ROWS = [
    {"id": "compare-test-file-missing", "argv": ["compare", CFG, "--test", "{tmp}/none.jsonl", *ARGS],
     "files": VALID, "stderr": "{tmp}/none.jsonl: file not found"},
    {"id": "compare-test-file-json-object", "argv": ["compare", CFG, "--test", "{tmp}/t.json", *ARGS],
     "files": {**VALID, "t.json": "{}"}, "stderr": "{tmp}/t.json: expected a JSON array"},
    {"id": "compare-unknown-method", "argv": ["compare", CFG, "--test", "{tmp}/test.jsonl", *ARGS, "--methods", "bogus"],
     "files": VALID, "stderr": "--methods bogus: method.name: 'bogus' is not one of"},
    {"id": "compare-method-key-wrong-type", "argv": ["compare", CFG, "--test", "{tmp}/test.jsonl", *ARGS, "--methods", "lora:r=x"],
     "files": VALID, "stderr": "--methods lora:r=x: method.r"},
    {"id": "compare-method-spec-without-value", "argv": ["compare", CFG, "--test", "{tmp}/test.jsonl", *ARGS, "--methods", "lora:r"],
     "files": VALID, "stderr": "'r' must look like key=value"},
    {"id": "compare-config-missing", "argv": ["compare", "{tmp}/nope.yaml", "--test", "{tmp}/test.jsonl", *ARGS],
     "files": VALID, "stderr": "{tmp}/nope.yaml: config file not found"},
    {"id": "compare-config-broken-yaml", "argv": ["compare", CFG, "--test", "{tmp}/test.jsonl", *ARGS],
     "files": {**VALID, "run.yaml": "model: [oops\n"}, "stderr": "run.yaml:2: not valid YAML"},
    {"id": "compare-without-test", "argv": ["compare", CFG], "files": VALID,
     "stderr": "the following arguments are required: --test"},
    {"id": "compare-steps-not-a-number", "argv": ["compare", CFG, "--test", "x", "--steps", "many"], "files": VALID,
     "stderr": "argument --steps: invalid int value: 'many'"},
]  # fmt: skip

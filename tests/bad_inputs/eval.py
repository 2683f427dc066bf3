"""Bad-input rows for `tuneforge eval` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BINARY, BROKEN_MODELS, BROKEN_RUNS, TOY_LABELS

DATA = {"test.jsonl": TOY_LABELS}
RUN = ["eval", "--model", "{run}", "--data"]

ROWS = [
    {"id": "eval-data-json-object", "argv": [*RUN, "{tmp}/t.json"], "files": {"t.json": "{}"},
     "stderr": "{tmp}/t.json: expected a JSON array"},
    {"id": "eval-data-is-a-directory", "argv": [*RUN, "{tmp}/t.jsonl"], "setup": [("mkdir", "t.jsonl")],
     "stderr": "{tmp}/t.jsonl: is a directory"},
    {"id": "eval-data-missing", "argv": [*RUN, "{tmp}/none.jsonl"], "stderr": "{tmp}/none.jsonl: file not found"},
    {"id": "eval-data-binary-json", "argv": [*RUN, "{tmp}/t.json"], "files": {"t.json": BINARY},
     "stderr": "{tmp}/t.json: not valid UTF-8"},
    {"id": "eval-data-one-label", "argv": [*RUN, "{tmp}/t.jsonl"],
     "files": {"t.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n'},
     "stderr": "{tmp}/t.jsonl: accuracy needs at least two distinct labels"},
    {"id": "eval-unknown-metric", "argv": [*RUN, "{tmp}/test.jsonl", "--metrics", "bleu,wer"], "files": DATA,
     "stderr": "--metrics: unknown metric(s) wer"},
    {"id": "eval-batch-size-zero", "argv": [*RUN, "{tmp}/test.jsonl", "--batch-size", "0"], "files": DATA,
     "stderr": "argument --batch-size: must be at least 1, got 0"},
    {"id": "eval-limit-negative", "argv": [*RUN, "{tmp}/test.jsonl", "--limit", "-1"], "files": DATA,
     "stderr": "argument --limit: must be at least 1, got -1"},
    {"id": "eval-output-under-a-file", "argv": [*RUN, "{tmp}/test.jsonl", "--output", "{tmp}/f/x.json"],
     "files": {**DATA, "f": "x"}, "stderr": "--output {tmp}/f/x.json: {tmp}/f is a file"},
    {"id": "eval-output-is-a-directory", "argv": [*RUN, "{tmp}/test.jsonl", "--output", "{tmp}/o"],
     "files": DATA, "setup": [("mkdir", "o")], "stderr": "--output {tmp}/o: is a directory"},
    {"id": "eval-lang-unknown", "argv": [*RUN, "{tmp}/test.jsonl", "--lang", "fr"], "files": DATA,
     "stderr": "argument --lang: invalid choice: 'fr'"},
    {"id": "eval-without-data", "argv": ["eval", "--model", "{run}"],
     "stderr": "the following arguments are required: --data"},
    *(
        {"id": f"eval-{name}", "argv": ["eval", "--model", "{tmp}/r", "--data", "{tmp}/test.jsonl"],
         "files": DATA, "setup": setup, "stderr": substring}
        for name, setup, substring in BROKEN_RUNS
    ),
    *(
        {"id": f"eval-model-{name}", "argv": ["eval", "--model", model, "--data", "{tmp}/test.jsonl"],
         "files": {**files, **DATA}, "setup": setup, "stderr": substring}
        for name, model, files, setup, substring in BROKEN_MODELS
    ),
    {"id": "eval-compare-model-broken", "argv": [*RUN, "{tmp}/test.jsonl", "--compare", "{tmp}/m"],
     "files": DATA, "setup": [("copy", "{model}", "m"), ("remove", "m/tokenizer.json")], "stderr": "{tmp}/m: no tokenizer"},
]  # fmt: skip

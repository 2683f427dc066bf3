"""Bad-input rows for `tuneforge generate` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BROKEN_MODELS, BROKEN_RUNS

ROWS = [
    *(
        {"id": f"generate-model-{name}", "argv": ["generate", "--model", model, "--prompt", "hi"],
         "files": files, "setup": setup, "stderr": substring}
        for name, model, files, setup, substring in BROKEN_MODELS
    ),
    *(
        {"id": f"generate-{name}", "argv": ["generate", "--model", "{tmp}/r", "--prompt", "hi"],
         "setup": setup, "stderr": substring}
        for name, setup, substring in BROKEN_RUNS
    ),
    {"id": "generate-max-new-tokens-zero", "argv": ["generate", "--model", "{run}", "--prompt", "hi", "--max-new-tokens", "0"],
     "stderr": "argument --max-new-tokens: must be at least 1, got 0"},
    {"id": "generate-dtype-fp16", "argv": ["generate", "--model", "{run}", "--prompt", "hi", "--dtype", "fp16"],
     "stderr": "argument --dtype: invalid choice: 'fp16'"},
    {"id": "generate-without-prompt", "argv": ["generate", "--model", "{run}"],
     "stderr": "the following arguments are required: --prompt"},
]  # fmt: skip

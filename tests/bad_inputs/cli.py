"""Bad-input rows for the `tuneforge` command itself: unknown commands and flags.

Plain data (format: README.md here); tests/test_bad_inputs.py runs and judges them.
"""

ROWS = [
    {"id": "cli-unknown-command", "argv": ["trian"], "stderr": "tuneforge: argument command: invalid choice: 'trian'"},
    {"id": "cli-unknown-global-flag", "argv": ["--bogus", "train", "x.yaml"],
     "stderr": "tuneforge: unrecognized arguments: --bogus"},
    {"id": "cli-no-command", "argv": ["-v"], "stderr": "tuneforge: the following arguments are required: command"},
]  # fmt: skip

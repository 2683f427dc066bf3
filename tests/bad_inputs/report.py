"""Bad-input rows for `tuneforge report` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

COPY = ("copy", "{run}", "r")

ROWS = [
    {"id": "report-not-a-run", "argv": ["report", "{tmp}"], "stderr": "{tmp}: no metrics.jsonl"},
    {"id": "report-a-file", "argv": ["report", "{tmp}/f"], "files": {"f": "x"}, "stderr": "{tmp}/f: no metrics.jsonl"},
    {"id": "report-corrupt-config-yaml", "argv": ["report", "{tmp}/r"],
     "setup": [COPY, ("overwrite", "r/config.yaml", 0, b"model: [oops\n")], "stderr": "{tmp}/r/config.yaml: damaged"},
    {"id": "report-summary-not-a-mapping", "argv": ["report", "{tmp}/r"],
     "setup": [COPY, ("remove", "r/summary.json"), ("write", "r/summary.json", "[1, 2]")],
     "stderr": "{tmp}/r/summary.json: expected a mapping, got list"},
    {"id": "report-metrics-damaged-line", "argv": ["report", "{tmp}/r"],
     "setup": [COPY, ("overwrite", "r/metrics.jsonl", 0, b"{oops")], "stderr": "{tmp}/r/metrics.jsonl:1: not valid JSON"},
    {"id": "report-metrics-binary", "argv": ["report", "{tmp}/r"],
     "setup": [COPY, ("overwrite", "r/metrics.jsonl", 0, b"\xff\xfe\xfd")], "stderr": "{tmp}/r/metrics.jsonl: not a UTF-8 text file"},
    {"id": "report-without-run-dir", "argv": ["report"], "stderr": "the following arguments are required: run_dir"},
]  # fmt: skip

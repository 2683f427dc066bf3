"""Broken inputs for `tuneforge feedback add|stats|export` and `tuneforge retrain` (issue 19 format).

Each row: argv (with {tmp}, {run}), optional files under {tmp}, the exit code and a substring of
the one-line error; the runner also checks that no traceback is printed.
"""

RECORD = (
    '{"id": "chatcmpl-1", "created": 1.0, "route": "/v1/chat/completions", "model": "m", '
    '"adapter": null, "request": {"messages": [{"role": "user", "content": "hi"}]}, '
    '"prompt": "hi", "completion": "yo", "finish_reason": "stop", "prompt_tokens": 1, '
    '"completion_tokens": 1, "latency_s": 0.1, "ttft_s": null, "status": 200, "error": null}\n'
)

ROWS = [
    {
        "id": "feedback-add-missing-file",
        "argv": ["feedback", "add", "{tmp}/nope.jsonl", "--db", "{tmp}/fb.db"],
        "exit": 2,
        "stderr": "nope.jsonl: cannot read",
    },
    {
        "id": "feedback-add-empty-file",
        "argv": ["feedback", "add", "{tmp}/empty.jsonl", "--db", "{tmp}/fb.db"],
        "files": {"empty.jsonl": ""},
        "exit": 2,
        "stderr": "has no rows",
    },
    {
        "id": "feedback-add-not-json",
        "argv": ["feedback", "add", "{tmp}/fb.jsonl", "--db", "{tmp}/fb.db"],
        "files": {"fb.jsonl": "{not json\n"},
        "exit": 2,
        "stderr": "fb.jsonl:1: not JSON",
    },
    {
        "id": "feedback-add-invalid-utf8",
        "argv": ["feedback", "add", "{tmp}/fb.jsonl", "--db", "{tmp}/fb.db"],
        "files": {"fb.jsonl": b'{"response_id": "\xff", "rating": 1}\n'},
        "exit": 2,
        "stderr": "fb.jsonl:1: not valid UTF-8",
    },
    {
        "id": "feedback-add-unknown-response",
        "argv": [
            "feedback",
            "add",
            "{tmp}/fb.jsonl",
            "--db",
            "{tmp}/fb.db",
            "--records",
            "{tmp}/rec.jsonl",
        ],  # fmt: skip
        "files": {
            "fb.jsonl": '{"response_id": "chatcmpl-nope", "rating": 1}\n',
            "rec.jsonl": RECORD,
        },
        "exit": 2,
        "stderr": "fb.jsonl:1: response_id: no response",
    },
    {
        "id": "feedback-add-bad-rating",
        "argv": ["feedback", "add", "{tmp}/fb.jsonl", "--db", "{tmp}/fb.db"],
        "files": {"fb.jsonl": '{"response_id": "chatcmpl-x", "rating": 9}\n'},
        "exit": 2,
        "stderr": "fb.jsonl:1: rating: 9 is not a star rating",
    },
    {
        "id": "feedback-add-bad-records",
        "argv": [
            "feedback",
            "add",
            "{tmp}/fb.jsonl",
            "--db",
            "{tmp}/fb.db",
            "--records",
            "{tmp}/rec.jsonl",
        ],  # fmt: skip
        "files": {"fb.jsonl": '{"response_id": "x", "rating": 1}\n', "rec.jsonl": '{"id": "x"}\n'},
        "exit": 2,
        "stderr": "rec.jsonl:1: response record: missing field",
    },
    {
        "id": "feedback-add-no-database",
        "argv": ["feedback", "add", "{tmp}/fb.jsonl", "--db", "{tmp}/missing.db"],
        "files": {"fb.jsonl": '{"response_id": "chatcmpl-x", "rating": 1}\n'},
        "exit": 2,
        "stderr": "no such database file",
    },
    {
        "id": "feedback-stats-no-database",
        "argv": ["feedback", "stats", "--db", "{tmp}/missing.db"],
        "exit": 2,
        "stderr": "no such database file",
    },
    {
        "id": "feedback-db-unknown-backend",
        "argv": ["feedback", "stats", "--db", "mysql://u@localhost/db"],
        "exit": 2,
        "stderr": "use sqlite or postgresql",
    },
    {
        "id": "feedback-db-unreachable-postgres",
        "argv": ["feedback", "stats", "--db", "postgresql+psycopg://u@/db?host=/nonexistent"],
        "exit": 2,
        "stderr": "cannot open the store",
    },
    {
        "id": "feedback-db-not-a-database",
        "argv": ["feedback", "stats", "--db", "{tmp}/junk.db"],
        "files": {"junk.db": "this is not an SQLite file, it is plain text" * 100},
        "exit": 2,
        "stderr": "cannot open the store",
    },
    {
        "id": "feedback-export-bad-since",
        "argv": [
            "feedback",
            "export",
            "--db",
            "{tmp}/fb.db",
            "--out",
            "{tmp}/out.jsonl",
            "--since",
            "yesterday",
        ],  # fmt: skip
        "exit": 2,
        "stderr": "--since",
    },
    {
        "id": "feedback-export-bad-min-rating",
        "argv": [
            "feedback",
            "export",
            "--db",
            "{tmp}/fb.db",
            "--out",
            "{tmp}/out.jsonl",
            "--min-rating",
            "4",
        ],  # fmt: skip
        "exit": 2,
        "stderr": "--min-rating",
    },
    {
        "id": "feedback-export-bad-pii",
        "argv": [
            "feedback",
            "export",
            "--db",
            "{tmp}/fb.db",
            "--out",
            "{tmp}/out.jsonl",
            "--pii",
            "hide",
        ],  # fmt: skip
        "exit": 2,
        "stderr": "--pii",
    },
    {
        "id": "retrain-not-a-run",
        "argv": ["retrain", "{tmp}", "--db", "{tmp}/fb.db"],
        "exit": 2,
        "stderr": "not a tuneforge run directory",
    },
    {
        "id": "retrain-bad-objective",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--objective", "ppo"],
        "exit": 2,
        "stderr": "--objective",
    },
    {
        "id": "retrain-bad-mix",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--mix", "new=0.3"],
        "exit": 2,
        "stderr": "--mix",
    },
    {
        "id": "retrain-mix-out-of-range",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--mix", "old=1.5"],
        "exit": 2,
        "stderr": "--mix",
    },
    {
        "id": "retrain-max-drop-unknown-metric",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--max-drop", "bleu=1"],
        "exit": 2,
        "stderr": "--max-drop",
    },
    {
        "id": "retrain-max-drop-not-a-number",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--max-drop", "accuracy=lots"],
        "exit": 2,
        "stderr": "--max-drop",
    },
    {
        "id": "retrain-max-drop-out-of-range",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--max-drop", "accuracy=150"],
        "exit": 2,
        "stderr": "--max-drop",
    },
    {
        "id": "retrain-max-drop-no-value",
        "argv": ["retrain", "{run}", "--db", "{tmp}/fb.db", "--max-drop", "accuracy"],
        "exit": 2,
        "stderr": "--max-drop",
    },
    {
        "id": "retrain-database-down",
        "argv": ["retrain", "{run}", "--db", "postgresql+psycopg://u@/db?host=/nonexistent"],
        "exit": 2,
        "stderr": "cannot open the store",
    },
]

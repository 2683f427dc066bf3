"""Broken inputs of `tuneforge augment` (issue 19's table): each exits 2 with a one-line reason
naming the file, row, op or language, and leaves no output file behind."""

_GOOD = '{"text": "The happy child reads a good book.", "label": "positive"}\n'

ROWS = [
    {
        "id": "augment-missing-file",
        "argv": ["augment", "{tmp}/nope.jsonl", "--out", "{tmp}/out.jsonl"],
        "exit": 2,
        "stderr": "nope.jsonl: file not found",
    },
    {
        "id": "augment-empty-file",
        "argv": ["augment", "{tmp}/empty.jsonl", "--out", "{tmp}/out.jsonl"],
        "files": {"empty.jsonl": ""},
        "exit": 2,
        "stderr": "empty.jsonl: the file has no rows",
    },
    {
        "id": "augment-row-without-text",
        "argv": ["augment", "{tmp}/rows.jsonl", "--out", "{tmp}/out.jsonl"],
        "files": {"rows.jsonl": _GOOD + '{"label": "negative"}\n'},
        "exit": 2,
        "stderr": "rows.jsonl:2: missing field 'text'",
    },
    {
        "id": "augment-unknown-op",
        "argv": [
            "augment",
            "{tmp}/rows.jsonl",
            "--ops",
            "swap,shuffle",
            "--out",
            "{tmp}/out.jsonl",
        ],
        "files": {"rows.jsonl": _GOOD},
        "exit": 2,
        "stderr": "unknown op 'shuffle'",
    },
    {
        "id": "augment-language-without-thesaurus",
        "argv": ["augment", "{tmp}/rows.jsonl", "--lang", "fr", "--out", "{tmp}/out.jsonl"],
        "files": {"rows.jsonl": _GOOD},
        "exit": 2,
        "stderr": "no thesaurus for language 'fr'",
    },
    {
        "id": "augment-text-in-a-language-without-thesaurus",
        "argv": ["augment", "{tmp}/rows.jsonl", "--ops", "synonym", "--out", "{tmp}/out.jsonl"],
        "files": {"rows.jsonl": _GOOD + '{"text": "これは日本語の文です", "label": "x"}\n'},
        "exit": 2,
        "stderr": "rows.jsonl:2: text is in ja",
    },
    {
        "id": "augment-bad-alpha",
        "argv": ["augment", "{tmp}/rows.jsonl", "--alpha", "0", "--out", "{tmp}/out.jsonl"],
        "files": {"rows.jsonl": _GOOD},
        "exit": 2,
        "stderr": "alpha must be in (0, 1]",
    },
    {
        "id": "augment-out-not-jsonl",
        "argv": ["augment", "{tmp}/rows.jsonl", "--out", "{tmp}/out.csv"],
        "files": {"rows.jsonl": _GOOD},
        "exit": 2,
        "stderr": "--out",
    },
]

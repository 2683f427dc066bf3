"""Bad-input rows for `tuneforge score` (format: README.md here).

Plain data; tests/test_bad_inputs.py runs and judges them.
"""

from bad_inputs import BINARY

TEXTS = {"p.txt": "a cat\nthe dog\n", "r.txt": "a cat\nthe dog\n"}
ARGS = ["score", "--predictions", "{tmp}/p.txt", "--references", "{tmp}/r.txt"]

ROWS = [
    {"id": "score-predictions-missing", "argv": ["score", "--predictions", "{tmp}/none.txt", "--references", "{tmp}/r.txt"],
     "files": TEXTS, "stderr": "{tmp}/none.txt: file not found"},
    {"id": "score-references-is-a-directory", "argv": ["score", "--predictions", "{tmp}/p.txt", "--references", "{tmp}/d"],
     "files": TEXTS, "setup": [("mkdir", "d")], "stderr": "{tmp}/d: is a directory"},
    {"id": "score-predictions-binary", "argv": ARGS, "files": {**TEXTS, "p.txt": BINARY},
     "stderr": "{tmp}/p.txt: not a UTF-8 text file"},
    {"id": "score-line-counts-differ", "argv": ARGS, "files": {**TEXTS, "r.txt": "a cat\n"},
     "stderr": "line counts differ: {tmp}/p.txt has 2 predictions, {tmp}/r.txt has 1 references"},
    {"id": "score-unknown-metric", "argv": [*ARGS, "--metrics", "bleu,meteor"], "files": TEXTS,
     "stderr": "--metrics: unknown metric(s) meteor"},
    {"id": "score-unknown-lang", "argv": [*ARGS, "--lang", "de"], "files": TEXTS,
     "stderr": "argument --lang: invalid choice: 'de'"},
    {"id": "score-without-references", "argv": ["score", "--predictions", "{tmp}/p.txt"], "files": TEXTS,
     "stderr": "the following arguments are required: --references"},
]  # fmt: skip

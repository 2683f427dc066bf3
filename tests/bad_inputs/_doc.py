"""Regenerate the broken-input tables of docs/reliability.md: `python tests/bad_inputs/_doc.py`.

Runs every row once through the CLI (as the test does) and writes what each printed between the
markers; tests/test_bad_inputs.py checks that the doc lists every row. Judges nothing itself.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, bad_inputs

from bad_inputs import (  # noqa: E402
    ROOT,
    ForkRunner,
    build_models,
    build_run,
    expand,
    leaf_commands,
    load_rows,
    prepare,
)

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


def command_of(argv: list[str], commands: list[tuple[str, ...]]) -> str:
    for cmd in sorted(commands, key=len, reverse=True):
        if tuple(argv[: len(cmd)]) == cmd:
            return " ".join(cmd)
    return "(tuneforge)"


def first_error_line(stderr: str, places: dict[str, str]) -> str:
    for line in stderr.splitlines():
        if line.startswith("error: "):
            for key, path in sorted(places.items(), key=lambda kv: -len(kv[1])):
                line = line.replace(path, key)
            return line.removeprefix("error: ")
    return "(no error line)"


def render(results: list[tuple[str, dict, int, str]]) -> str:
    """The per-command summary and the per-row table, as Markdown."""
    counts = Counter(cmd for cmd, *_ in results)
    clean = Counter(cmd for cmd, row, code, _ in results if code == row.get("exit", 2))
    out = [
        "| command | broken inputs tried | clear error, expected exit code |",
        "| --- | ---: | ---: |",
    ]
    out += [f"| `{cmd}` | {n} | {clean[cmd]} |" for cmd, n in counts.items()]
    out += ["", f"All {len(results)} rows:", "", "| row | command | exit | what the user reads |"]
    out.append("| --- | --- | ---: | --- |")
    for cmd, row, code, line in results:
        text = line.replace("|", "\\|")
        out.append(f"| `{row['id']}` | `{cmd}` | {code} | {text} |")
    return "\n".join(out) + "\n"


def main() -> None:
    from tuneforge.cli import build_parser

    commands = leaf_commands(build_parser())
    results = []
    runner = ForkRunner()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shared = build_models(root)
        shared["{run}"] = build_run(root, shared, runner)
        for i, (_, row) in enumerate(load_rows()):
            work = root / f"row-{i}"
            work.mkdir()
            places = {**shared, "{tmp}": str(work)}
            prepare(row, places)
            code, _, err = runner.run(expand(row["argv"], places), work, row.get("timeout", 120))
            cmd = command_of(row["argv"], commands)
            results.append((cmd, row, code, first_error_line(err, places)))
    runner.close()
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + render(results) + text[end:], encoding="utf-8")
    print(f"{DOC}: {len(results)} rows")


if __name__ == "__main__":
    main()

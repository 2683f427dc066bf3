"""The broken-input table (issue 19): every row of tests/bad_inputs/<group>.py through the real CLI.

Each row must end in its exit code (2 unless stated), one `error: ...` line naming what is wrong
(indented `file:line: reason` details may follow), no traceback, and nothing new or changed in
the output location or the shared fixtures. Rows run in children forked from a warm interpreter
(bad_inputs/_worker.py); a few rows also run as a genuine `python -m tuneforge.cli` subprocess
and must give the same result, and a stand-in program shows every way of ending ends alike.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from bad_inputs import (
    ID_PATTERN,
    PLACEHOLDERS,
    ROOT,
    ROW_KEYS,
    ForkRunner,
    build_models,
    build_run,
    expand,
    leaf_commands,
    load_rows,
    prepare,
    run_subprocess,
    snapshot,
)

ROWS = load_rows()
DOC = ROOT / "docs" / "reliability.md"


@pytest.fixture(scope="session")
def runner():
    fork = ForkRunner()
    yield fork
    fork.close()


@pytest.fixture(scope="session")
def shared(tmp_path_factory, runner):
    """The placeholders every row may use, built once; their files must never change."""
    root = tmp_path_factory.mktemp("bad-input-fixtures")
    places = build_models(root)
    places["{run}"] = build_run(root, places, runner)
    return places


def error_block(stderr: str) -> tuple[list[str], list[str]]:
    """(problems, block): the `error:` line and its indented detail lines, or what is wrong."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if len(starts) != 1:
        return [f"expected exactly one 'error: ' line, found {len(starts)}"], lines
    problems = []
    if starts[0] > 0:
        problems.append(f"stray stderr lines before the error: {lines[: starts[0]]}")
    block = lines[starts[0] :]
    stray = [line for line in block[1:] if not line.startswith("  ")]
    if stray:
        problems.append(f"lines after the error that are not indented details: {stray}")
    return problems, block


def check(row: dict, code: int, stderr: str, places: dict[str, str]) -> tuple[list[str], str]:
    """Every problem with one run of `row`, and its error block (paths as placeholders)."""
    problems = []
    if "Traceback" in stderr:
        problems.append("a traceback")
    if code != row.get("exit", 2):
        problems.append(f"exit code {code}, expected {row.get('exit', 2)}")
    shape, block = error_block(stderr)
    problems += shape
    text = "\n".join(block)
    for key, path in sorted(places.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(path, key)
    if row["stderr"] not in "\n".join(block) and row["stderr"] not in text:
        problems.append(f"stderr lacks {row['stderr']!r}")
    return problems, text


def run_row(row: dict, run, tmp_path: Path, shared: dict[str, str]) -> tuple[int, str, str, dict]:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    places = {**shared, "{tmp}": str(work)}
    prepare(row, places)
    before = snapshot(work)
    fixtures = {key: snapshot(Path(shared[key])) for key in shared}
    code, out, err = run(expand(row["argv"], places), work, row.get("timeout", 120))
    leftovers = _leftovers(row, before, snapshot(work))
    changed = [key for key in shared if snapshot(Path(shared[key])) != fixtures[key]]
    return code, err, places, {"left": leftovers, "fixtures changed": changed}


def _leftovers(row: dict, before: dict, after: dict) -> list[str]:
    """Files that are new or changed in {tmp}, minus what the row says a failure may leave."""
    allowed = row.get("leaves", [])
    diff = [p for p in after if before.get(p) != after[p]] + [p for p in before if p not in after]
    return [p for p in diff if not any(fnmatch.fnmatch(p, pattern) for pattern in allowed)]


@pytest.mark.parametrize("group,row", ROWS, ids=[f"{g}:{r['id']}" for g, r in ROWS])
def test_bad_input(group, row, runner, shared, tmp_path):
    code, err, places, outputs = run_row(row, runner.run, tmp_path, shared)
    problems, _ = check(row, code, err, places)
    problems += [f"{what}: {paths}" for what, paths in outputs.items() if paths]
    assert not problems, f"{row['id']}: {'; '.join(problems)}\nstderr:\n{err[-3000:]}"


#: Rows that also run as a genuine `python -m tuneforge.cli` subprocess (2-4 s each): an argparse
#: error, a ModelError after torch / transformers / peft loaded a run, a DataError from the data
#: pipeline, a FeedbackError from the SQL store. The exit paths themselves: test_fork_ends_like_...
CROSS_CHECKED = (
    "cli-unknown-command",
    "generate-run-adapter-base-mismatch",
    "data-check-csv-missing-column",
    "feedback-db-not-a-database",
)


@pytest.mark.parametrize("row_id", CROSS_CHECKED)
def test_forked_runs_match_a_real_subprocess(row_id, runner, shared, tmp_path):
    """The fork shortcut is honest: a genuine `python -m tuneforge.cli` gives the same result."""
    [row] = [row for _, row in ROWS if row["id"] == row_id]
    results = []
    for name, run in (("fork", runner.run), ("subprocess", run_subprocess)):
        code, err, places, _ = run_row(row, run, tmp_path / name, shared)
        problems, block = check(row, code, err, places)
        assert not problems, f"{name}: {problems}\n{err[-3000:]}"
        results.append((code, block))
    assert results[0] == results[1]


EXITS = Path(__file__).resolve().parent / "bad_inputs"  # _exits.py: ends as its argv[1] says


@pytest.mark.parametrize(
    "argv,code",
    [(["code"], 3), (["message"], 1), (["none"], 0), (["raise"], 1), (["interrupt"], -2),
     (["argparse", "--bogus"], 2), (["cwd"], 0)],
    ids=lambda v: v[0] if isinstance(v, list) else str(v),
)  # fmt: skip
def test_fork_ends_like_the_interpreter(argv, code, runner, tmp_path):
    """Exit status, stdout and stderr of a forked child equal a real `python -m` for every way a
    program ends; a traceback's frames differ (runpy vs the worker), its header and last line not."""
    seen = []
    for name, run in (("fork", runner.run), ("subprocess", run_subprocess)):
        work = tmp_path / name
        work.mkdir()
        got, out, err = run(argv, work, 60, module="_exits", path=[str(EXITS)])
        seen.append((got, out.replace(str(work), "{tmp}"), _frames_cut(err)))
    assert seen[0] == seen[1]
    got, out, err = seen[0]
    assert got == code and out.startswith(f"stdout of {argv[0]}\n")
    assert err[0] == f"stderr of {argv[0]}"
    last = {"message": "stopped: a message, not a code", "raise": "ValueError: boom",
            "interrupt": "KeyboardInterrupt", "argparse": "probe: error: unrecognized arguments: --bogus"}  # fmt: skip
    assert err[-1] == last.get(argv[0], err[0])
    assert ("Traceback (most recent call last):" in err) == (argv[0] in ("raise", "interrupt"))
    if argv[0] == "cwd":
        assert out.splitlines()[1] == "{tmp} True"


def _frames_cut(stderr: str) -> list[str]:
    """stderr's lines with a traceback's frame lines dropped (its header and last line kept)."""
    lines = stderr.splitlines()
    if "Traceback (most recent call last):" not in lines:
        return lines
    start = lines.index("Traceback (most recent call last):")
    return [*lines[: start + 1], lines[-1]]


def test_every_command_has_rows():
    from tuneforge.cli import build_parser

    commands = leaf_commands(build_parser())
    assert ("data", "check") in commands and ("train",) in commands  # the walk finds nested ones
    covered = {tuple(row["argv"][: len(cmd)]) for _, row in ROWS for cmd in commands}
    missing = [" ".join(cmd) for cmd in commands if cmd not in covered]
    assert not missing, (
        f"commands without bad-input rows (add tests/bad_inputs/<group>.py): {missing}"
    )


def test_rows_are_well_formed():
    ids = [row["id"] for _, row in ROWS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    for group, row in ROWS:
        assert ID_PATTERN.match(row["id"]), f"{group}: {row['id']!r} is not kebab-case"
        assert set(row) <= ROW_KEYS, f"{row['id']}: unknown keys {set(row) - ROW_KEYS}"
        assert row["argv"] and isinstance(row["stderr"], str) and row["stderr"], row["id"]
        braces = re.findall(r"\{[a-z_]+\}", " ".join(row["argv"]))
        assert set(braces) <= set(PLACEHOLDERS), f"{row['id']}: unknown placeholder {braces}"


def test_verbose_shows_the_traceback_and_the_default_never(runner, shared, tmp_path):
    row = {"setup": [("copy", "{model}", "m"), ("remove", "m/tokenizer.json")]}
    outputs = {}
    for flags in ([], ["-v"]):
        work = tmp_path / ("verbose" if flags else "plain")
        work.mkdir()
        prepare(row, {**shared, "{tmp}": str(work)})
        outputs[bool(flags)] = runner.run(
            [*flags, "generate", "--model", "m", "--prompt", "hi"], work
        )
    (code, _, plain), (vcode, _, verbose) = outputs[False], outputs[True]
    assert code == vcode == 2
    assert "Traceback" not in plain and plain.strip().startswith("error: m: no tokenizer")
    assert "Traceback (most recent call last)" in verbose and "ModelError" in verbose
    assert verbose.strip().splitlines()[-1] == plain.strip()  # the same one line, last


def test_the_reliability_doc_lists_every_row():
    """docs/reliability.md's table is generated from these rows (tests/bad_inputs/_doc.py)."""
    text = DOC.read_text(encoding="utf-8")
    documented = dict(re.findall(r"^\| `([a-z0-9-]+)` \| `[^`]+` \| (\d+) \|", text, re.M))
    rows = {row["id"]: str(row.get("exit", 2)) for _, row in ROWS}
    hint = "regenerate it: python tests/bad_inputs/_doc.py"
    assert set(rows) <= set(documented), (
        f"rows missing from {DOC.name} ({hint}): {set(rows) - set(documented)}"
    )
    assert set(documented) <= set(rows), f"{DOC.name} lists rows that no longer exist ({hint})"
    assert documented == rows, f"exit codes differ from {DOC.name} ({hint})"

"""A pre-imported `python -m tuneforge.cli` that forks once per bad-input row (tests only).

Reads one JSON request a line on stdin, forks, runs the CLI in the child exactly as
`python -m tuneforge.cli ARGV` would (own process, own fds, exit code), and answers with the
child's exit status. It saves the 2-4 s of interpreter start-up and imports per row; the
runner cross-checks a sample of rows against a genuine subprocess. It judges nothing itself.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys
import traceback

#: Imported once in the parent so that every forked row starts warm; missing ones are skipped
#: (a command another branch has not merged yet).
WARM = (
    "tuneforge.cli",
    "tuneforge.methods",
    "tuneforge.recipes.train",
    "tuneforge.recipes.cv",
    "tuneforge.recipes.compare",
    "tuneforge.loading",
    "tuneforge.evaluation.offline",
    "tuneforge.evaluation.runner",
    "tuneforge.evaluation.validation",
    "tuneforge.evaluation.score",
    "tuneforge.reporting.htmlreport",
    "tuneforge.data.pipeline",
    "transformers.models.llama.modeling_llama",
    "peft",
    "pyarrow.parquet",
    "gguf",
)


def _child(request: dict) -> None:
    """In the forked child: become `python -m tuneforge.cli ARGV`; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        signal.alarm(int(request.get("timeout", 120)))  # a row that hangs dies by SIGALRM
        sys.argv = [sys.argv[0], *request["argv"]]
        try:
            runpy.run_module("tuneforge.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()

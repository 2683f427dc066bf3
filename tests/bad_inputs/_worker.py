"""A pre-imported `python -m tuneforge.cli` that forks once per bad-input row (tests only).

Each child ends as `python -m MODULE ARGV` would: own process and fds, the working directory first
on sys.path, SystemExit / uncaught exceptions / KeyboardInterrupt ended as the interpreter ends
them (not atexit handlers or non-daemon threads; no row relies on them). It saves the 2-4 s of
start-up per row; tests/test_bad_inputs.py compares it with real subprocesses. Judges nothing.
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
    """In the forked child: become `python -m MODULE ARGV` (default tuneforge.cli); never returns."""
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
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        sys.path[1:1] = request.get("path", [])  # where PYTHONPATH entries go
        sys.argv = [sys.argv[0], *request["argv"]]
        try:
            module = request.get("module", "tuneforge.cli")
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = _exit_code(stop)
        except KeyboardInterrupt:
            traceback.print_exc()
            _die_by_sigint()
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _exit_code(stop: SystemExit) -> int:
    """The interpreter's rule: None is 0, an int is itself, anything else is printed and is 1."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _die_by_sigint() -> None:
    """An uncaught KeyboardInterrupt ends the interpreter by SIGINT (exit status -2), so here too."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


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

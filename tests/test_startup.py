"""A `tuneforge` process imports torch and transformers with the collector off and frozen, and
freezes what is alive before exit; `cli.main()` called in-process leaves the collector alone."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from tuneforge.cli import main

PROBE = """
import gc, json, sys
from tuneforge.cli.startup import run_process

seen = {}

def fake_main(argv):
    seen.update(frozen=gc.get_freeze_count(), enabled=gc.isenabled(), torch="torch" in sys.modules)
    return 3

code = run_process(fake_main, sys.argv[1:])
print(json.dumps({**seen, "code": code, "frozen_at_exit": gc.get_freeze_count()}))
"""


def _probe(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_a_model_command_starts_with_torch_imported_and_frozen():
    seen = _probe("-v", "eval", "--model", "x")
    assert seen["torch"] and seen["enabled"]
    assert seen["frozen"] > 100_000  # torch + transformers: hundreds of thousands of objects
    assert seen["code"] == 3  # the command's exit code comes back unchanged
    assert seen["frozen_at_exit"] >= seen["frozen"]


def test_other_commands_import_nothing_more_and_freeze_only_at_exit():
    seen = _probe("score", "--help")
    assert not seen["torch"] and seen["enabled"]
    assert seen["frozen"] == 0
    assert seen["frozen_at_exit"] > 0


def test_main_in_process_leaves_the_collector_alone(capsys):
    before = gc.get_freeze_count()
    assert main(["config"]) == 0
    assert gc.get_freeze_count() == before and gc.isenabled()

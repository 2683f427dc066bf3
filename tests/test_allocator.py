"""`tuneforge train` and `eval` re-execute themselves under tcmalloc (installed by `make install`)
unless told not to."""

import ctypes.util
import json
import os
import subprocess
import sys

from tuneforge.heap import SWITCH, heap_allocator, preload_env

from helpers import write_run_config, write_toy_messages

LIB = "libtcmalloc_minimal.so.4"


def test_preload_env_only_for_training_evaluation_and_planning_and_only_once():
    env = preload_env(["-v", "train", "run.yaml"], {"PATH": "/bin"}, LIB)
    assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin" and env[SWITCH] == "tcmalloc"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert preload_env(["eval", "--model", "x"], {}, LIB)["LD_PRELOAD"] == LIB  # evaluation too
    assert preload_env(["plan", "run.yaml"], {}, LIB)["LD_PRELOAD"] == LIB  # times train's heap
    assert preload_env(["data", "check", "x.jsonl"], {}, LIB) is None  # no heap churn there
    assert preload_env(["train", "run.yaml"], {}, None) is None  # tcmalloc not installed
    assert preload_env(["train", "run.yaml"], {SWITCH: "system"}, LIB) is None  # opted out
    assert preload_env(["train", "run.yaml"], env, LIB) is None  # already re-executed
    assert preload_env(["train", "run.yaml"], {"LD_PRELOAD": "/x/libjemalloc.so"}, LIB) is None
    assert preload_env([], {}, LIB) is None


def test_make_install_provides_tcmalloc():
    assert ctypes.util.find_library("tcmalloc_minimal"), (
        "make install installs libtcmalloc-minimal4"
    )


def _train(tmp_path, tiny_model_dir, name, **env):
    data = write_toy_messages(tmp_path / f"{name}.jsonl", n=16)
    out = tmp_path / name
    cfg = write_run_config(
        tmp_path / f"{name}.yaml", tiny_model_dir, data, out, train={"max_steps": 2}, eval={}
    )
    run_env = {k: v for k, v in os.environ.items() if k not in (SWITCH, "LD_PRELOAD")} | env
    code = "from tuneforge.cli.allocator import entry; entry()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", str(cfg)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tcmalloc: large alloc" not in proc.stderr
    return json.loads((out / "manifest.json").read_text())["fast_path"]["allocator"]


def test_training_runs_under_tcmalloc_and_can_opt_out(tmp_path, tiny_model_dir):
    assert heap_allocator() == "glibc"  # pytest itself was not preloaded
    assert _train(tmp_path, tiny_model_dir, "default") == "tcmalloc"
    assert _train(tmp_path, tiny_model_dir, "system", **{SWITCH: "system"}) == "glibc"


def test_a_plan_made_elsewhere_sizes_the_heap_train_will_run_on(monkeypatch):
    """`tuneforge plan` runs on glibc; the `train` it sizes runs on tcmalloc unless opted out."""
    from tuneforge import heap

    monkeypatch.setattr(heap, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    assert heap.training_heap({}) == "tcmalloc"
    assert heap.training_heap({SWITCH: "system"}) == "glibc"
    assert heap.training_heap({"LD_PRELOAD": "libjemalloc.so"}) == "glibc"
    monkeypatch.setattr(heap, "tcmalloc_library", lambda: None)
    assert heap.training_heap({}) == "glibc"

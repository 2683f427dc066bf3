"""R1: SIGKILL the trainer across an epoch boundary, mid-accumulation and during a checkpoint save,
stop it with SIGTERM, resume each time: the result is bit-identical to one uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kill_runner import (
    checkpoint_steps,
    comparable,
    finish,
    records,
    run_trainer,
    start_trainer,
    subprocess_env,
)
from tuneforge.train.checkpoint import load_checkpoint
from tuneforge.train.order import micro_batch_indices

from helpers import write_run_config, write_toy_messages

N_TRAIN, BATCH, ACCUM, EPOCHS = 14, 2, 2, 2  # 7 micro-batches an epoch: step 4 straddles epochs
TOTAL_STEPS = N_TRAIN // BATCH * EPOCHS // ACCUM  # 7


def _config(tmp: Path, model_dir: Path, name: str) -> Path:
    train = tmp / "train.jsonl"
    if not train.exists():
        write_toy_messages(train, n=N_TRAIN, seed=1)
        write_toy_messages(tmp / "val.jsonl", n=4, seed=2)
    return write_run_config(
        tmp / f"{name}.yaml",
        model_dir,
        train,
        tmp / name,
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},  # dropout: RNG must resume
        data={"validation": str(tmp / "val.jsonl")},
        train={
            "max_steps": None,
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "grad_accum": ACCUM,
            "lr": 1e-2,
            "scheduler": "cosine",
            "warmup_steps": 2,
            "seed": 3,
            "trace_rows": True,
        },
        eval={"every_steps": 3, "early_stopping": {"patience": 10}},
        checkpoint={"every_steps": 2, "keep_last": 2},
        log={"report": False},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """An uninterrupted baseline, and the same run killed and resumed five times."""
    tmp = tmp_path_factory.mktemp("resume")
    base_cfg, cfg = _config(tmp, tiny_model_dir, "base"), _config(tmp, tiny_model_dir, "run")
    run = tmp / "run"
    base = start_trainer(base_cfg)  # runs beside the chain (2 cores)
    links = {}
    # 1. SIGKILL inside step 4, between its epoch-0 and its epoch-1 micro-batch.
    links["epoch"] = (*run_trainer(cfg, "--kill-at-forward", "8"), checkpoint_steps(run))
    # 2. resume from step 2; SIGKILL mid-accumulation in step 5 (its 6th forward).
    links["accum"] = (
        *run_trainer(cfg, "--kill-at-forward", "6", resume=True),
        checkpoint_steps(run),
    )
    # 3. resume from step 4; SIGKILL in the middle of writing the step-6 checkpoint.
    links["save"] = (
        *run_trainer(cfg, "--kill-at-save-tick", "30000", resume=True),
        checkpoint_steps(run),
    )
    links["torn"] = [p.name for p in (run / "checkpoints").glob(".tmp-*")]
    # 4. resume from step 4; SIGTERM during step 5: it finishes the step, checkpoints, exits 143.
    links["term"] = (
        *run_trainer(cfg, "--signal-at-forward", "1:SIGTERM", resume=True),
        checkpoint_steps(run),
    )
    links["term_summary"] = (run / "summary.json").exists()
    # 5. resume from step 5 to the end.
    links["final"] = (*run_trainer(cfg, resume=True), checkpoint_steps(run))
    rc, log = finish(base)
    assert rc == 0, log[-3000:]
    return tmp / "base", run, links


def test_each_interruption_left_the_expected_state(runs):
    _, run, links = runs
    for name in ("epoch", "accum", "save"):
        rc, log, _ = links[name]
        assert rc == -9, f"{name}: {log[-2000:]}"
    assert links["epoch"][2] == [2]  # step 4's checkpoints never happened
    assert links["accum"][2] == [2, 4]
    assert links["save"][2] == [2, 4] and links["torn"] == [".tmp-step-000006"]
    rc, log, steps = links["term"]
    assert rc == 143, log[-2000:]
    assert "interrupted (exit 143)" in log and "resuming from" in log
    assert steps == [4, 5] and links["term_summary"] is False
    rc, log, steps = links["final"]
    assert rc == 0, log[-2000:]
    assert "step-000005 (step 5)" in log
    assert steps == [6, 7] and (run / "summary.json").is_file()


def _assert_same(a, b, path="trainer"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path  # NaN == NaN here


def test_resumed_weights_are_bit_identical(runs):
    base, run, _ = runs
    for rel in ["adapter/adapter_model.safetensors", "checkpoints/step-000007/model.safetensors"]:
        a, b = load_file(base / rel), load_file(run / rel)
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), f"{rel}: {key}"
    a = load_file(base / "checkpoints/step-000007/optimizer.safetensors")
    b = load_file(run / "checkpoints/step-000007/optimizer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    states = [load_checkpoint(r / "checkpoints/step-000007").state("trainer") for r in (base, run)]
    for state in states:
        state["counters"].pop("runtime_s")
    _assert_same(*states)  # early stopping, overfit monitor, best weights, loop counters
    assert states[0]["evaluator"]["stopper"]["best_step"] in (3, 6, 7)
    assert len(states[0]["evaluator"]["monitor"]["records"]) == 3
    trained = load_file(base / "adapter/adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())


def test_logged_series_and_summary_match(runs):
    base, run, _ = runs
    a, b = records(base), records(run)
    assert comparable(a) == comparable(b)  # loss, lr, grad norm, tokens, rows, evals
    train = [r for r in b if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))  # none twice
    lrs = [r["lr"] for r in train]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup then decay: the schedule continued
    sa = json.loads((base / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    for key in ("steps", "train_loss", "final_train_loss", "train_tokens", "eval", "best"):
        assert sa[key] == sb[key], key


def test_every_example_used_epochs_times_in_the_baseline_order(runs):
    base, run, _ = runs
    rows = [s for r in records(run) if "loss" in r for s in r["rows"]]
    assert rows == [s for r in records(base) if "loss" in r for s in r["rows"]]
    train = str(base.parent / "train.jsonl")
    source = micro_batch_indices(N_TRAIN, BATCH, seed=3, rank=0, world_size=1)
    expected = [f"{train}:{i + 1}" for _ in range(TOTAL_STEPS * ACCUM) for i in next(source)[1]]
    assert rows == expected
    assert {rows.count(s) for s in set(rows)} == {EPOCHS} and len(set(rows)) == N_TRAIN


def test_first_signal_only_asks_to_stop():
    import signal

    from tuneforge.train.guards import StopSignals

    previous = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop() == 0
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the loop checkpoints first
        assert stop() == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is previous


def test_second_sigint_exits_at_once_with_130():
    script = (
        "import os, signal, time\n"
        "from tuneforge.train.guards import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('first', stop(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "    print('not reached', flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=25,
        env=subprocess_env(),
    )
    assert out.returncode == 130
    assert out.stdout.split() == ["first", "2"]
    assert "SIGINT again: exiting now" in out.stderr

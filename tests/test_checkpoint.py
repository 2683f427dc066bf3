"""Checkpoint storage (R2): exact no-pickle encoding, atomic saves, verification, rotation, and
SIGKILL at random byte offsets of a save never leaving a torn checkpoint visible."""

import json
import math
import os
import random
import signal
import time

import pytest
import torch

from kill_runner import patch_saver
from tuneforge.errors import CheckpointError
from tuneforge.train.checkpoint import (
    Checkpointer,
    find_checkpoint,
    flatten,
    list_checkpoints,
    load_checkpoint,
    state_files,
    tensor_files,
    unflatten,
)
from tuneforge.train.optim import build_scheduler


def _payload(step: int, best_step: int = 3):
    """Deterministic content for the checkpoint of `step` (so a reload can be checked)."""
    shared = {
        "model": tensor_files("model", {"w": torch.full((64, 64), float(step))}),
        "trainer": state_files("trainer", {"step": step, "t": torch.arange(100) * step}),
    }
    per_rank = state_files("rng-rank000", {"seed": step})
    value = 0.1 if step == best_step else 1.0 + step
    return shared, per_rank, {"score": {"metric": "eval_loss", "mode": "min", "value": value}}


def _assert_content(path, step):
    ckpt = load_checkpoint(path)
    assert ckpt.step == step
    assert torch.equal(ckpt.tensors("model")["w"], torch.full((64, 64), float(step)))
    state = ckpt.state("trainer")
    assert state["step"] == step and torch.equal(state["t"], torch.arange(100) * step)


def test_flatten_roundtrip_is_exact():
    obj = {
        "a": (1, 2.5, None, "x"),
        "ints": {0: torch.tensor(3.0), 7: {"exp_avg": torch.randn(3, 2)}},
        "floats": [math.nan, math.inf, -math.inf, 0.1],
        "bf16": torch.randn(4, dtype=torch.bfloat16),
        "__odd": True,
    }
    tree, tensors = flatten(obj)
    json.dumps(tree, allow_nan=False)  # strict JSON: no NaN literals, no pickle
    back = unflatten(json.loads(json.dumps(tree)), tensors)
    assert back["a"] == (1, 2.5, None, "x") and isinstance(back["a"], tuple)
    assert set(back["ints"]) == {0, 7} and torch.equal(back["ints"][0], torch.tensor(3.0))
    assert torch.equal(back["ints"][7]["exp_avg"], obj["ints"][7]["exp_avg"])
    assert math.isnan(back["floats"][0]) and back["floats"][1:] == [math.inf, -math.inf, 0.1]
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], obj["bf16"])
    assert back["__odd"] is True
    with pytest.raises(TypeError, match="without pickle"):
        flatten({"f": object()})


def test_optimizer_and_scheduler_continue_bit_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, foreach=False)
        return layer, opt, build_scheduler(opt, total_steps=10, warmup_steps=2, schedule="cosine")

    def step(layer, opt, sched, i):
        torch.manual_seed(100 + i)
        layer(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    a, opt_a, sched_a = make()
    for i in range(3):
        step(a, opt_a, sched_a, i)
    ck = Checkpointer(tmp_path, keep_last=2)
    shared = {
        "model": tensor_files("model", dict(a.named_parameters())),
        "optimizer": state_files("optimizer", opt_a.state_dict()),
        "scheduler": state_files("scheduler", sched_a.state_dict()),
    }
    ckpt = load_checkpoint(ck.save(3, shared, {}, {}))
    b, opt_b, sched_b = make()
    with torch.no_grad():
        for name, p in b.named_parameters():
            p.copy_(ckpt.tensors("model")[name])
    opt_b.load_state_dict(ckpt.state("optimizer"))
    sched_b.load_state_dict(ckpt.state("scheduler"))
    assert sched_b.get_last_lr() == sched_a.get_last_lr()
    for i in range(3, 6):
        step(a, opt_a, sched_a, i)
        step(b, opt_b, sched_b, i)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert sched_a.get_last_lr() == sched_b.get_last_lr()


def test_save_is_atomic_verified_and_self_describing(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    shared, per_rank, meta = _payload(1)
    path = ck.save(1, shared, per_rank, {**meta, "identity": {"x": 1}})
    assert path.name == "step-000001" and not list(tmp_path.glob(".tmp-*"))
    meta_file = json.loads((path / "checkpoint.json").read_text())
    assert meta_file["identity"] == {"x": 1} and meta_file["step"] == 1
    assert set(meta_file["files"]) == {
        "model.safetensors",
        "trainer.json",
        "trainer.safetensors",
        "rng-rank000.json",
    }
    assert not [p for p in path.iterdir() if p.suffix in (".pt", ".bin", ".pkl")]
    _assert_content(path, 1)

    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is corrupt"):
        load_checkpoint(path)
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path)


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 7):
        ck.save(step, *_payload(step, best_step=2))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 5, 6]
    assert not list(tmp_path.glob(".trash-*"))
    ck1 = Checkpointer(tmp_path / "one", keep_last=1)
    for step in range(1, 4):
        ck1.save(step, *_payload(step, best_step=99))  # no best: scores rise with the step
    assert [s for s, _ in list_checkpoints(tmp_path / "one")] == [1, 3]  # step 1 scored best


def test_torn_saves_are_never_listed_and_get_cleaned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(4, *_payload(4))
    torn = tmp_path / ".tmp-step-000008"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / ".trash-step-000002-abcd").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert find_checkpoint(tmp_path, "auto").name == "step-000004"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, ".tmp-step-000008")
    ck.clean_stale()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000004"]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "nothing-here", "auto")


def _fork_and_save(root, kill_tick: int, steps: range) -> int:
    """Save `steps` in a forked child that SIGKILLs itself at write tick `kill_tick`."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            patch_saver(kill_tick)
            ck = Checkpointer(root, keep_last=2)
            for step in steps:
                ck.save(step, *_payload(step))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the saving child hung")


def test_sigkill_at_random_offsets_of_saves_never_exposes_a_torn_checkpoint(tmp_path, monkeypatch):
    steps = range(2, 7)
    with monkeypatch.context() as m:  # a dry run counts the ticks (bytes + dir ops) of the saves
        ticks = patch_saver(10**12, setattr=m.setattr)
        ck = Checkpointer(tmp_path / "dry", keep_last=2)
        boundaries = {}
        for step in steps:
            ck.save(step, *_payload(step))
            boundaries[step] = ticks["n"]
    total = boundaries[steps[-1]]
    offsets = sorted(random.Random(5).sample(range(total), 10))
    for trial, offset in enumerate(offsets):
        root = tmp_path / f"trial{trial}"
        Checkpointer(root, keep_last=2).save(1, *_payload(1))
        status = _fork_and_save(root, offset, steps)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, offset
        completed = max([s for s, b in boundaries.items() if b <= offset], default=1)
        listed = [s for s, _ in list_checkpoints(root)]
        newest = find_checkpoint(root, "auto")  # what --resume auto picks: never fails
        assert completed <= int(newest.name[5:]) <= completed + 1, (offset, listed)
        for step, path in list_checkpoints(root):  # every visible checkpoint is whole
            _assert_content(path, step)
        if completed >= 3:
            assert 3 in listed, (offset, listed)  # the best one survives rotation
        ck = Checkpointer(root, keep_last=2)  # the next run cleans up and saves again
        ck.clean_stale()
        ck.save(9, *_payload(9))
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
        _assert_content(find_checkpoint(root, "auto"), 9)

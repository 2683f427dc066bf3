"""R5: a NaN injected at step k is never hidden. `halt` exits 3 naming the step and its rows and
writes no checkpoint from it; `skip` leaves weights and optimizer state bitwise unchanged for
that step and halts after train.max_bad_steps bad steps in a row."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tuneforge.recipes.parts as parts
from tuneforge.cli import main
from tuneforge.errors import NonFiniteError
from tuneforge.train.checkpoint import Checkpointer
from tuneforge.train.guards import NonFiniteGuard, nonfinite_parts
from tuneforge.train.resume import TrainingState

from helpers import write_run_config, write_toy_messages


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({3, 4}): the embeddings output NaN in those training forwards (1-based)."""
    bad: set[int] = set()
    count = {"n": 0}
    original = parts.load_model

    def hook(module, args, output):
        if module.training:
            count["n"] += 1
            if count["n"] in bad:
                return output * float("nan")
        return None

    def load_model(*args, **kwargs):
        model = original(*args, **kwargs)
        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(parts, "load_model", load_model)
    return bad.update


def _config(tmp_path, model_dir, **train):
    data = write_toy_messages(tmp_path / "train.jsonl", n=24)
    return write_run_config(
        tmp_path / "run.yaml",
        model_dir,
        data,
        tmp_path / "run",
        data={"validation": None},
        train={"max_steps": 5, "batch_size": 4, **train},
        eval={"every_steps": None},
        checkpoint={"every_steps": 1, "keep_last": 10},
    )


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run, step, name):
    return load_file(run / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors")


def test_halt_names_the_step_and_rows_and_writes_no_checkpoint(
    tmp_path, tiny_model_dir, nan_at, capsys
):
    nan_at({3})
    assert main(["train", str(_config(tmp_path, tiny_model_dir)), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss nan" in err and "at step 3 (train.on_nonfinite: halt)" in err
    run = tmp_path / "run"
    bad = [r for r in _records(run) if "nonfinite" in r]
    assert len(bad) == 1 and bad[0]["step"] == 3 and bad[0]["action"] == "halt"
    assert bad[0]["nonfinite"]["loss"] == "nan" and len(bad[0]["rows"]) == 4
    assert all(f"{row}" in err for row in bad[0]["rows"])  # the rows, as file:line
    assert all(row.startswith(str(tmp_path / "train.jsonl") + ":") for row in bad[0]["rows"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    for step in (1, 2):
        assert all(torch.isfinite(t).all() for t in _ckpt(run, step, "model").values())
    assert not (run / "summary.json").exists()


def test_skip_leaves_weights_and_optimizer_state_bitwise_unchanged(
    tmp_path, tiny_model_dir, nan_at
):
    nan_at({3})
    cfg = _config(tmp_path, tiny_model_dir, on_nonfinite="skip")
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = tmp_path / "run"
    for name in ("model", "optimizer"):
        before, after, later = (_ckpt(run, s, name) for s in (2, 3, 4))
        assert all(torch.equal(before[k], after[k]) for k in before), name
        assert any(not torch.equal(after[k], later[k]) for k in after), name  # training went on
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # the bad step is logged, not hidden
    assert records[2]["action"] == "skip" and records[2]["loss"] is None
    assert all(r["loss"] > 0 for i, r in enumerate(records) if i != 2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["train_loss"] == pytest.approx(
        sum(r["loss"] for i, r in enumerate(records) if i != 2) / 4
    )


def test_skip_halts_after_max_bad_steps_in_a_row(tmp_path, tiny_model_dir, nan_at, capsys):
    nan_at({2, 3})
    cfg = _config(tmp_path, tiny_model_dir, on_nonfinite="skip", max_bad_steps=2)
    assert main(["train", str(cfg), "--quiet"]) == 3
    assert "2 bad steps in a row (train.max_bad_steps: 2)" in capsys.readouterr().err
    bad = [r for r in _records(tmp_path / "run") if "nonfinite" in r]
    assert [(r["step"], r["action"]) for r in bad] == [(2, "skip"), (3, "halt")]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_guard_parts_and_policy():
    assert nonfinite_parts(1.0, 2.0) == {}
    assert nonfinite_parts(float("nan"), float("inf")) == {"loss": "nan", "grad_norm": "inf"}
    with pytest.raises(ValueError, match="train.on_nonfinite"):
        NonFiniteGuard("ignore")
    guard = NonFiniteGuard("skip", max_bad_steps=3)
    guard.check(5, {"loss": "nan"}, ["a.jsonl:1"], in_a_row=2)  # skipped, no raise
    with pytest.raises(NonFiniteError, match="a.jsonl:1"):
        guard.check(6, {"loss": "nan"}, ["a.jsonl:1"], in_a_row=3)


def test_nan_weights_never_reach_a_checkpoint(tmp_path):
    layer = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(layer.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainingState(
        Checkpointer(tmp_path, keep_last=2),
        model=layer,
        optimizer=opt,
        scheduler=sched,
        callbacks={},
        meta={},
    )
    state.save(1, {"step": 1})
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="no checkpoint was written"):
        state.save(2, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]

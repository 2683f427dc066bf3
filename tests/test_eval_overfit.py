"""The overfitting monitor and early stopping on a tiny model that really overfits.

Training answers are always "red", validation answers always "blue": validation loss falls while
the model learns the answer format, then rises as it learns "red" — while training loss falls.
"""

from __future__ import annotations

import json
import random

import pytest
from safetensors.torch import load_file

from tuneforge.cli import main

from helpers import THINGS, write_run_config


def _rows(answer: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = f"Color of {rng.choice(THINGS)}?"
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return "".join(json.dumps(r) + "\n" for r in rows)


def _config(tmp, model_dir, name, max_steps=30, **sections):
    (tmp / "train.jsonl").write_text(_rows("red", 16, 0))
    (tmp / "val.jsonl").write_text(_rows("blue", 8, 1))
    return write_run_config(
        tmp / f"{name}.yaml",
        model_dir,
        tmp / "train.jsonl",
        tmp / name,
        method={"name": "full"},
        data={"validation": str(tmp / "val.jsonl")},
        train={
            "max_steps": max_steps,
            "batch_size": 4,
            "lr": 1e-2,
            "scheduler": "constant",
            "seed": 0,
        },
        log={"report": False},
        **sections,
    )


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("overfit")
    early = {"patience": 3, "metric": "eval_loss", "mode": "min"}
    cfg = _config(tmp, tiny_model_dir, "stopped", eval={"every_steps": 2, "early_stopping": early})
    return tmp, cfg


def test_overfitting_warns_in_metrics_and_progress_output(stopped_run, capfd):
    tmp, cfg = stopped_run
    assert main(["train", str(cfg)]) == 0
    err = capfd.readouterr().err
    evals = [r for r in _records(tmp / "stopped") if "eval_loss" in r]
    warned = [r for r in evals if "warning" in r]
    assert len(warned) == 1
    step = warned[0]["step"]
    # the three evaluations up to the warning: eval loss up, train loss down, each time
    last4 = [r for r in evals if r["step"] <= step][-4:]
    assert all(b["eval_loss"] > a["eval_loss"] for a, b in zip(last4, last4[1:], strict=False))
    assert all(b["train_loss"] < a["train_loss"] for a, b in zip(last4, last4[1:], strict=False))
    assert f"warning: possible overfitting at step {step}" in err


def test_early_stopping_restores_the_best_step(stopped_run, tiny_model_dir):
    tmp, _ = stopped_run
    summary = json.loads((tmp / "stopped" / "summary.json").read_text())
    best = summary["best"]["step"]
    assert summary["stopped_early"] and summary["steps"] == best + 3 * 2
    evals = {r["step"]: r["eval_loss"] for r in _records(tmp / "stopped") if "eval_loss" in r}
    assert best == min(evals, key=evals.get) and best < summary["steps"]
    # A run that simply ends at the best step holds the weights the stopped run restored.
    cfg = _config(tmp, tiny_model_dir, "upto", max_steps=best, eval={"every_steps": 2})
    assert main(["train", str(cfg), "--quiet"]) == 0
    restored = load_file(tmp / "stopped" / "model" / "model.safetensors")
    reference = load_file(tmp / "upto" / "model" / "model.safetensors")
    assert restored.keys() == reference.keys()
    for name, tensor in reference.items():
        assert restored[name].equal(tensor), name

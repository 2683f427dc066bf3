"""Retrain's promotion gates: loss (relative rise) and the label metrics the run evaluates
(absolute drop, `--max-drop METRIC=X`), by hand-made values and end to end on the tiny model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tuneforge.cli import main as cli
from tuneforge.config import load_config
from tuneforge.data.formats import load_examples
from tuneforge.data.pipeline import collate
from tuneforge.errors import FeedbackError
from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.validate import FeedbackItem
from tuneforge.loading import load_run
from tuneforge.models import resolve_dtype
from tuneforge.recipes.promotion import decide, gate_checks, gated_label_metrics, parse_max_drop
from tuneforge.recipes.train import run_training
from tuneforge.train.preference import answer_logps, tokenize_answer

from feedback_helpers import make_record
from helpers import COLORS, THINGS, write_run_config, write_toy_messages

ANSWER = {t: COLORS[i % len(COLORS)] for i, t in enumerate(THINGS)}
PARENT = {  # label metrics in percent, as evaluation reports them
    "original": {"loss": 1.0, "accuracy": 80.0, "examples": 50},
    "feedback": {"loss": 2.0, "accuracy": 50.0, "macro_f1": 40.0, "examples": 10},
}
CANDIDATE = {
    "original": {"loss": 1.02, "accuracy": 78.0, "examples": 50},
    "feedback": {"loss": 1.50, "accuracy": 60.0, "macro_f1": 37.0, "examples": 10},
}


def test_gate_checks_by_hand():
    checks = gate_checks(PARENT, CANDIDATE, 0.02)
    got = {(c["set"], c["metric"]): (c["parent"], c["candidate"], c["threshold"], c["passed"]) for c in checks}  # fmt: skip
    assert got == {
        ("original", "loss"): (1.0, 1.02, 0.02, True),  # 1.02 <= 1.0 * 1.02: at the limit
        ("original", "accuracy"): (80.0, 78.0, 2.0, True),  # a 2-point drop is allowed
        ("feedback", "loss"): (2.0, 1.5, 0.02, True),
        ("feedback", "accuracy"): (50.0, 60.0, 2.0, True),
        ("feedback", "macro_f1"): (40.0, 37.0, 2.0, False),  # 3 points > 2
    }
    assert {c["rule"] for c in checks if c["metric"] == "loss"} == {"relative rise"}
    ok, reason = decide(PARENT, CANDIDATE, 0.02)
    assert not ok and reason.startswith("worse on feedback macro_f1 (allowed absolute drop 2)")
    assert "original accuracy 80.0000 -> 78.0000" in reason
    assert decide(PARENT, CANDIDATE, 0.02, {"macro_f1": 3.0})[0]  # its own threshold
    assert not decide(PARENT, CANDIDATE, 0.02, {"macro_f1": 3.0, "accuracy": 1.5})[0]
    assert not decide(PARENT, CANDIDATE, 0.019, {"macro_f1": 5.0})[0]  # loss 2 % > 1.9 %
    # only the gated label metrics count: macro_f1 is reported but not gated here
    assert decide(PARENT, CANDIDATE, 0.02, label_metrics=["accuracy"])[0]
    assert [c["metric"] for c in gate_checks(PARENT, CANDIDATE, 0.02, label_metrics=[])] == ["loss", "loss"]  # fmt: skip
    # a metric only one side has (e.g. the feedback rows were not labelled) is not gated
    only_loss = {"original": {"loss": 1.0}, "feedback": {"loss": 2.0}}
    assert [c["metric"] for c in gate_checks(PARENT, {**CANDIDATE, **only_loss}, 0.02)] == ["loss", "loss"]  # fmt: skip


def test_gated_metrics_and_max_drop_parsing():
    assert gated_label_metrics(["loss", "accuracy"], {}) == ["accuracy"]
    assert gated_label_metrics(["loss"], {}) == []
    assert gated_label_metrics(["macro_f1", "loss"], {"accuracy": 0.1}) == ["accuracy", "macro_f1"]
    assert parse_max_drop(["accuracy=2.5", "macro_f1=0"]) == {"accuracy": 2.5, "macro_f1": 0.0}
    for bad in ("accuracy", "loss=1", "bleu=1", "accuracy=x", "accuracy=-1", "accuracy=101", "accuracy=nan"):  # fmt: skip
        with pytest.raises(FeedbackError, match="--max-drop"):
            parse_max_drop([bad])


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, tiny_model_dir, one_thread):
    """A tiny run whose eval.metrics names accuracy (the six colors are the classes)."""
    root = tmp_path_factory.mktemp("gates")
    data = write_toy_messages(root / "train.jsonl", n=96)
    cfg = write_run_config(root / "run.yaml", tiny_model_dir, data, root / "run",
                           train={"max_steps": 40}, eval={"every_steps": None, "metrics": ["loss", "accuracy"]},
                           data={"train": str(data), "validation": 0.25, "max_length": 64})  # fmt: skip
    run_training(load_config(cfg), show_progress=False)
    return root / "run"


def _accuracy_by_hand(run, examples, labels) -> float:
    """Percent of rows whose most likely color (summed answer log-probability) is the answer,
    computed apart from evaluation/."""
    loaded = load_run(run, resolve_dtype("auto", "cpu"))
    right = 0
    for ex in examples:
        prompt = ex.messages[:-1]
        items = [tokenize_answer(loaded.tokenizer, prompt, label) for label in labels]
        with torch.no_grad():
            scores = answer_logps(loaded.model, collate(items, loaded.tokenizer.pad_token_id))
        right += labels[int(scores.argmax())] == ex.messages[-1]["content"]
    return 100.0 * right / len(examples)


def test_accuracy_is_gated_on_both_sets_with_real_values(labelled_run, tmp_path, one_thread, capsys):  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(db)
    for i in range(24):
        thing = THINGS[i % len(THINGS)]
        rec = make_record(f"Color of {thing}?", "purple")
        store.write(rec)
        store.add_feedback(FeedbackItem(rec.id, -1, "thumbs", correction=ANSWER[thing]))
    # the loss gate opened wide and no accuracy drop allowed: accuracy alone decides
    argv = ["retrain", str(run), "--db", db, "--min-new", "5", "--steps", "6", "--quiet",
            "--max-regression", "1000", "--max-drop", "accuracy=0"]  # fmt: skip
    assert cli(argv) == 0
    attempt = run / "retrain" / "attempt-0001"
    record = json.loads((attempt / "decision.json").read_text())
    [row] = store.retrain_runs()
    assert row["metrics"] == record["metrics"] and row["decision"] == record["decision"]
    gates = {(g["set"], g["metric"]): g for g in record["metrics"]["gates"]}
    # macro_f1 is computed alongside but gated only when eval.metrics or --max-drop names it
    assert set(gates) == {("original", "loss"), ("original", "accuracy"),
                          ("feedback", "loss"), ("feedback", "accuracy")}  # fmt: skip
    for (name, metric), g in gates.items():
        assert g["parent"] == record["metrics"]["parent"][name][metric]
        assert g["candidate"] == record["metrics"]["candidate"][name][metric]
    assert gates["original", "accuracy"]["threshold"] == 0.0
    assert all(g["passed"] for (_, m), g in gates.items() if m == "loss")
    for name, path in (("original", "original-heldout.jsonl"), ("feedback", "feedback-heldout.jsonl")):  # fmt: skip
        rows = load_examples(attempt / "data" / path).examples
        labels = sorted({ex.messages[-1]["content"] for ex in load_examples(attempt / "data" / "original-heldout.jsonl").examples})  # fmt: skip
        for who, where in (("parent", run), ("candidate", attempt / "candidate")):
            want = _accuracy_by_hand(where, rows, labels)
            assert gates[name, "accuracy"][who] == pytest.approx(want), (name, who)
    acc = gates["original", "accuracy"], gates["feedback", "accuracy"]
    promote = all(g["candidate"] >= g["parent"] for g in acc)
    assert record["decision"] == ("promoted" if promote else "rejected")
    assert (run / "promoted").exists() == promote
    assert capsys.readouterr().out.startswith(record["decision"] + ":")
    store.close()

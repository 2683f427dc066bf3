"""scripts/feedback_demo.py on the tiny model with small counts: every phase runs, the run it is
given stays untouched, and demo.json / demo.md hold the real before/after numbers and decision.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tuneforge.data.formats import load_examples
from tuneforge.evaluation.runner import evaluate_examples
from tuneforge.feedback.store import FeedbackStore
from tuneforge.loading import load_reference

from helpers import write_toy_messages

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "feedback_demo.py"


def _demo():
    spec = importlib.util.spec_from_file_location("feedback_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_end_to_end_on_the_tiny_model(parent_copy, tmp_path, one_thread, capsys):
    run = parent_copy  # the shared 30-step tiny run (feedback_helpers.parent_run), a copy
    test = write_toy_messages(tmp_path / "test.jsonl", n=30, seed=7)
    before_files = sorted(p.name for p in run.iterdir())
    demo = _demo()
    out = tmp_path / "demo"
    argv = ["--run", str(run), "--data", str(test), "--serve", "16", "--eval", "10",
            "--steps", "3", "--out", str(out), "--quiet"]  # fmt: skip
    result = demo.run_demo(demo.parse_args(argv))
    printed = capsys.readouterr().out.splitlines()
    assert [line[:5] for line in printed] == [f"[{n}/5 " for n in range(1, 6)]
    assert sorted(p.name for p in run.iterdir()) == before_files  # untouched
    assert json.loads((out / "demo.json").read_text()) == result
    store = FeedbackStore(f"sqlite:///{out / 'feedback.db'}")
    feedback = store.feedback()
    assert result["feedback_rows"] == len(feedback) == 16
    ups = [f for f in feedback if f["rating"] == 1]
    assert result["served_accuracy"] == pytest.approx(len(ups) / 16)
    assert all(f["correction"] is None for f in ups)
    answers = {r["id"]: r["completion"] for r in store.responses()}
    assert all(f["correction"] and f["correction"] != answers[f["response_id"]] for f in feedback if f["rating"] == -1)  # fmt: skip
    [attempt] = store.retrain_runs()
    store.close()
    assert attempt["decision"] == result["decision"] in ("promoted", "rejected")
    assert result["gates"] == attempt["metrics"]["gates"]
    assert {g["metric"] for g in result["gates"]} == {"loss", "accuracy"}
    # before / candidate accuracy recomputed apart from the script, on the held-out rows
    held = load_examples(test).examples[16:26]
    labels = sorted({ex.messages[-1]["content"] for ex in load_examples(test).examples})

    def acc(run):
        loaded = load_reference(run)
        return evaluate_examples(loaded.model, loaded.tokenizer, held, ["accuracy"], labels=labels)["accuracy"]  # fmt: skip

    assert result["heldout_accuracy_before"] == pytest.approx(acc(run))
    candidate = out / "run" / "retrain" / f"attempt-{attempt['id']:04d}" / "candidate"
    assert result["candidate_accuracy"] == pytest.approx(acc(candidate))
    promoted = result["decision"] == "promoted"
    assert result["heldout_accuracy_after"] == result["candidate_accuracy" if promoted else "heldout_accuracy_before"]  # fmt: skip
    assert (out / "run" / "promoted").exists() == promoted
    table = (out / "demo.md").read_text()
    assert f"| decision | {result['decision']} |" in table
    assert (
        f"| held-out accuracy before (10 rows) | {result['heldout_accuracy_before']:.1f} % |"
        in table
    )
    with pytest.raises(SystemExit, match="exists"):
        demo.run_demo(demo.parse_args(argv))

"""Retrain on the tiny model: feedback in the store -> candidate -> evaluation -> promotion decision.

Runs on SQLite and PostgreSQL; checks the lineage rows, the pointer file, a rejection (an absurd
learning rate) that leaves the pointer alone, the skip below --min-new, and DPO from the store.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.validate import FeedbackItem
from tuneforge.recipes.retrain import RetrainJob, decide, promoted_dir, run_retrain
from tuneforge.train.rundir import file_sha256

from feedback_helpers import make_record
from helpers import COLORS, THINGS

ANSWER = {t: COLORS[i % len(COLORS)] for i, t in enumerate(THINGS)}


def _feed(store: FeedbackStore, n: int, start: int = 0) -> list[int]:
    """n served answers that were wrong, each with a thumbs-down and the right answer."""
    ids = []
    for i in range(start, start + n):
        thing = THINGS[i % len(THINGS)]
        rec = make_record(f"Color of {thing}?", "purple")
        store.write(rec)
        item = FeedbackItem(rec.id, -1, "thumbs", correction=ANSWER[thing], tags=["wrong"])
        ids.append(store.add_feedback(item)[0]["id"])
    return ids


def test_sft_retrain_promotes_and_records_lineage(parent_copy, db_url, one_thread):
    store = FeedbackStore(db_url)
    ids = _feed(store, 24)
    job = RetrainJob(
        parent_copy, db_url, min_new=10, steps=12, max_regression=0.05, show_progress=False
    )
    out = run_retrain(job)
    assert out.decision == "promoted", out.reason
    [row] = store.retrain_runs()
    assert row["decision"] == "promoted" and row["parent_path"] == str(parent_copy.resolve())
    assert row["parent_id"] is None and row["objective"] == "sft"
    assert set(row["feedback_ids"]) < set(ids) and row["feedback_ids"]  # some held out
    data = out.attempt_dir / "data"
    assert row["data_hashes"]["train"] == file_sha256(data / "train-sft.jsonl")
    assert row["metrics"] == json.loads((out.attempt_dir / "decision.json").read_text())["metrics"]
    ok, _ = decide(row["metrics"]["parent"], row["metrics"]["candidate"], 0.05)
    assert ok
    m = row["metrics"]
    assert m["candidate"]["feedback"]["loss"] < m["parent"]["feedback"]["loss"]
    assert promoted_dir(parent_copy) == (out.attempt_dir / "candidate").resolve()
    assert (
        parent_copy / "promoted"
    ).read_text().strip() == f"retrain/attempt-{row['id']:04d}/candidate"
    [export] = [e for e in store.exports() if e["id"] == row["dataset_id"]]
    assert export["feedback_ids"] == row["feedback_ids"]
    # nothing new since: the next run does nothing and records nothing
    again = run_retrain(job)
    assert again.decision == "skipped" and len(store.retrain_runs()) == 1
    # new feedback: the next attempt's parent is the promoted one
    _feed(store, 12, start=24)
    bad = RetrainJob(
        parent_copy, db_url, min_new=10, steps=6, overrides=["train.lr=3.0"], show_progress=False
    )
    rejected = run_retrain(bad)
    assert rejected.decision == "rejected" and "worse on" in rejected.reason
    runs = store.retrain_runs()
    assert runs[1]["parent_id"] == runs[0]["id"] and runs[1]["decision"] == "rejected"
    assert promoted_dir(parent_copy) == (out.attempt_dir / "candidate").resolve()  # unchanged
    store.close()


def test_dpo_retrain_from_the_store(parent_copy, tmp_path, one_thread):
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    store = FeedbackStore(db)
    _feed(store, 16)
    job = RetrainJob(parent_copy, db, min_new=5, objective="dpo", steps=4, show_progress=False)
    out = run_retrain(job)
    assert out.decision in ("promoted", "rejected")
    [row] = store.retrain_runs()
    assert row["objective"] == "dpo" and row["decision"] == out.decision
    assert (out.attempt_dir / "candidate" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out.attempt_dir / "candidate" / "adapter" / "reference").exists()
    pairs = [
        json.loads(x)
        for x in (out.attempt_dir / "data" / "train-pairs.jsonl").read_text().splitlines()
    ]
    assert pairs and all(p["rejected"] == "purple" for p in pairs)
    store.close()


def test_cli_skips_with_exit_0_and_fails_cleanly_without_a_database(
    parent_copy, tmp_path, one_thread
):
    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "tuneforge.cli", *argv],
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    db = tmp_path / "fb.db"
    r = cli("retrain", str(parent_copy), "--db", str(db), "--quiet")
    assert r.returncode == 2 and "no such database file" in r.stderr and not db.exists()
    FeedbackStore(db).close()
    r = cli("retrain", str(parent_copy), "--db", str(db), "--min-new", "5", "--quiet")
    assert r.returncode == 0 and "skipped: 0 new feedback rows" in r.stdout
    r = cli(
        "retrain", str(parent_copy), "--db", "postgresql+psycopg://nobody@/nope?host=/nonexistent"
    )
    assert r.returncode == 2 and "cannot open the store" in r.stderr and "Traceback" not in r.stderr

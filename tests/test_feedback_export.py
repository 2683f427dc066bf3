"""Feedback -> training rows: SFT messages, preference pairs, KTO rows, PII filter, lineage.

The export is checked row by row against hand-written expectations, and read back by the
training data loader.
"""

from __future__ import annotations

import json

import pytest

from tuneforge.data.formats import load_examples
from tuneforge.errors import FeedbackError
from tuneforge.feedback.export import (
    build_export,
    export_feedback,
    find_pii,
    parse_since,
    redact,
)
from tuneforge.feedback.store import FeedbackStore
from tuneforge.feedback.validate import FeedbackItem

from feedback_helpers import make_record


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("mail me at jane.doe+x@example.co.uk please", ["email"]),
        ("card 4111 1111 1111 1111 exp 12/30", ["card"]),
        ("card 4111-1111-1111-1112", []),  # fails the Luhn check
        ("call +1 (415) 555-2671 now", ["phone"]),
        ("call 020 7946 0958", ["phone"]),
        ("手机 13812345678", ["phone"]),
        ("order 12345 shipped in 2024, 3.14159", []),
        ("version 1.2.3.4 and isbn-less text", []),
    ],
)
def test_pii_filter(text, kinds):
    assert find_pii(text) == kinds


def test_redact():
    assert redact("a@b.io or +44 20 7946 0958, 4111111111111111") == "[EMAIL] or [PHONE], [CARD]"


def _fb(fid, rec, score, correction=None):
    return {"id": fid, "score": score, "correction": correction, "response": {
        "request": rec.request, "completion": rec.completion, "status": rec.status}}  # fmt: skip


def test_rows_pairs_and_kto_by_hand():
    good = make_record("Color of sky?", "blue")
    bad = make_record("Color of sky?", "green")
    wrong = make_record("Color of snow?", "black")
    pii = make_record("My mail is x@y.com, color of rose?", "pink")
    rows = [_fb(1, good, 1.0), _fb(2, bad, 0.0), _fb(3, wrong, 0.0, "white"), _fb(4, pii, 1.0)]
    out = build_export(rows, min_score=0.75, pii="drop")
    sky = [{"role": "user", "content": "Color of sky?"}]
    snow = [{"role": "user", "content": "Color of snow?"}]
    assert out.sft == [
        {"messages": [*sky, {"role": "assistant", "content": "blue"}], "feedback_ids": [1]},
        {"messages": [*snow, {"role": "assistant", "content": "white"}], "feedback_ids": [3]},
    ]
    assert out.pairs == [
        {"prompt": snow, "chosen": "white", "rejected": "black", "feedback_ids": [3]},
        {"prompt": sky, "chosen": "blue", "rejected": "green", "feedback_ids": [1, 2]},
    ]
    assert [(r["completion"], r["label"]) for r in out.kto] == [
        ("blue", True), ("green", False), ("white", True), ("black", False)]  # fmt: skip
    assert out.dropped["pii_email"] == 2  # the SFT row and the KTO row of feedback 4
    redacted = build_export(rows, pii="redact")
    assert redacted.sft[-1]["messages"][0]["content"] == "My mail is [EMAIL], color of rose?"


def test_export_files_load_as_training_data_and_are_recorded(db_url, tmp_path):
    store = FeedbackStore(db_url)
    recs = [make_record(f"Color of {t}?", a) for t, a in [("sky", "blue"), ("snow", "black")]]
    for r in recs:
        store.write(r)
    store.add_feedback(FeedbackItem(recs[0].id, 5, "stars"))
    store.add_feedback(FeedbackItem(recs[1].id, -1, "thumbs", correction="white"))
    out = export_feedback(
        store, tmp_path / "sft.jsonl", pairs=tmp_path / "pairs.jsonl", min_score=0.75
    )
    assert out["sft"]["rows"] == 2 and out["pairs"]["rows"] == 1
    examples = load_examples(tmp_path / "sft.jsonl").examples
    assert [ex.messages[-1]["content"] for ex in examples] == ["blue", "white"]
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert (pair["chosen"], pair["rejected"]) == ("white", "black")
    recorded = store.exports()
    assert [e["kind"] for e in recorded] == ["sft", "pairs"]
    assert (
        recorded[0]["sha256"] == out["sft"]["sha256"]
        and recorded[0]["feedback_ids"] == out["sft"]["feedback_ids"]
    )
    assert recorded[0]["filters"]["min_score"] == 0.75
    store.close()


def test_parse_since():
    assert parse_since("7d", now=1000000.0) == 1000000.0 - 7 * 86400
    assert parse_since("90m", now=10000.0) == 10000.0 - 5400
    assert parse_since("2026-01-01") == 1767225600.0
    assert parse_since("1700000000") == 1700000000.0
    assert parse_since(None) == 0.0
    with pytest.raises(FeedbackError, match="--since"):
        parse_since("last tuesday")


def test_cli_add_stats_export(tmp_path, capsys):
    from tuneforge.cli import main

    recs = [make_record(f"Color of {t}?", "purple") for t in ("sky", "snow")]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    rows = [
        {"response_id": recs[0].id, "rating": -1, "correction": "blue", "idempotency_key": "a"},
        {"response_id": recs[1].id, "rating": 5, "tags": ["ok"]},
    ]
    (tmp_path / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp_path / "fb.db")
    assert main(["feedback", "add", str(tmp_path / "fb.jsonl"), "--db", db, "--records", str(tmp_path / "records.jsonl")]) == 0  # fmt: skip
    assert "added 2 feedback rows; imported 2 response records" in capsys.readouterr().out
    assert main(["feedback", "add", str(tmp_path / "fb.jsonl"), "--db", db]) == 0
    assert "added 1 feedback rows (1 already stored)" in capsys.readouterr().out  # key "a" replayed
    assert main(["feedback", "stats", "--db", db, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["requests"], stats["feedback"], stats["corrections"]) == (2, 3, 1)
    assert stats["top_tags"] == [["ok", 2]]
    out = tmp_path / "sft.jsonl"
    assert main(["feedback", "export", "--db", db, "--out", str(out), "--pairs", str(tmp_path / "p.jsonl")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "sft: 3 rows" in printed and "pairs: 1 rows" in printed  # blue over purple
    answers = [json.loads(x)["messages"][-1]["content"] for x in out.read_text().splitlines()]
    assert answers == ["blue", "purple", "purple"]
    store = FeedbackStore(db)
    assert {f["source"] for f in store.feedback()} == {"file"}
    store.close()

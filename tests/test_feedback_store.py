"""The feedback store on SQLite and on a real PostgreSQL: rows, idempotency, migrations, outages.

The same test code runs against both databases (the `db_url` fixture); nothing is mocked.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
import sqlalchemy as sa

from tuneforge.errors import FeedbackError, StoreUnavailable
from tuneforge.feedback.store import FeedbackStore, upgrade
from tuneforge.feedback.validate import FeedbackItem, FieldError, parse_feedback

from feedback_helpers import make_record

HOSTILE = [
    "'); DROP TABLE feedback; --",
    "1 OR 1=1; DELETE FROM responses WHERE '' = '",
    '<script>alert("x")</script><img src=x onerror=alert(1)>',
    "Robert'); -- \\ \" ` $1 %s {0}",
    "这本书很好 😀 \u202e reversed",
]


@pytest.fixture
def store(db_url):
    s = FeedbackStore(db_url)
    yield s
    s.close()


def test_records_and_feedback_round_trip(store):
    rec = make_record("What is 2+2?", "5")
    store.write(rec)
    store.write(rec)  # a repeated record (a retried write) is stored once
    assert store.get_response(rec.id)["completion"] == "5"
    assert store.get_response(rec.id)["request"] == rec.request
    item = FeedbackItem(rec.id, -1, "thumbs", correction="4", tags=["math"], comment="wrong")
    row, created = store.add_feedback(item)
    assert created and row["score"] == 0.0 and row["tags"] == ["math"]
    [got] = store.feedback()
    assert got["correction"] == "4" and got["response"]["prompt"] == rec.prompt
    assert got["source"] == "api" and got["id"] == row["id"]
    assert len(store.responses()) == 1


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_stored_verbatim(store, text):
    rec = make_record(text, text)
    store.write(rec)
    row, _ = store.add_feedback(FeedbackItem(rec.id, 1, "thumbs", correction=text, comment=text))
    [got] = store.feedback()
    assert got["correction"] == text and got["comment"] == text
    assert got["response"]["completion"] == text
    assert sorted(store.tables()) == sorted(
        ["alembic_version", "exported_datasets", "feedback", "responses", "retrain_runs"]
    )


def test_served_text_with_invalid_unicode_is_kept_readable(store):
    rec = make_record("bad \ud800 surrogate", "nul \x00 byte")
    store.write(rec)
    got = store.get_response(rec.id)
    assert got["prompt"].startswith("<|im_start|>user\nbad \ufffd surrogate")
    assert got["completion"] == "nul \ufffd byte"


def test_idempotency_key_returns_the_same_row(store):
    rec = make_record()
    store.write(rec)
    item = FeedbackItem(rec.id, 5, "stars", idempotency_key="k-1")
    first, created = store.add_feedback(item)
    again, created_again = store.add_feedback(item)
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(FieldError) as err:
        store.add_feedback(FeedbackItem(rec.id, 1, "stars", idempotency_key="k-1"))
    assert err.value.status == 409 and err.value.field == "idempotency_key"
    assert len(store.feedback()) == 1


def test_concurrent_retries_with_one_key_store_one_row(store):
    rec = make_record()
    store.write(rec)
    item = FeedbackItem(rec.id, 1, "thumbs", idempotency_key="same")
    ids, errors = [], []

    def post() -> None:
        try:
            ids.append(store.add_feedback(item)[0]["id"])
        except Exception as e:  # noqa: BLE001 (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(ids) == 8 and len(set(ids)) == 1
    assert len(store.feedback()) == 1


def test_unknown_response_is_refused(store):
    with pytest.raises(FieldError) as err:
        store.add_feedback(FeedbackItem("chatcmpl-nope", 1, "thumbs"))
    assert err.value.status == 404 and err.value.field == "response_id"
    assert store.feedback() == []


def test_lineage_rows(store):
    rec = make_record()
    store.write(rec)
    fid = store.add_feedback(FeedbackItem(rec.id, 1, "thumbs"))[0]["id"]
    ds = store.record_export("sft", "/x/sft.jsonl", "ab" * 32, [fid], {"min_rating": 0.75})
    first = store.start_retrain(parent_path="/run", objective="sft", dataset_id=ds,
                                data_hashes={"sft": "ab" * 32}, feedback_ids=[fid])  # fmt: skip
    store.finish_retrain(first, decision="promoted", reason="better", metrics={"loss": 1.0})
    second = store.start_retrain(parent_id=first, parent_path="/run/a1", objective="sft",
                                 data_hashes={}, feedback_ids=[])  # fmt: skip
    runs = store.retrain_runs()
    assert [r["id"] for r in runs] == [first, second]
    assert runs[0]["decision"] == "promoted" and runs[0]["metrics"] == {"loss": 1.0}
    assert runs[0]["feedback_ids"] == [fid] and runs[1]["parent_id"] == first
    assert store.exports()[0]["feedback_ids"] == [fid]


def test_old_schema_upgrades_with_rows_intact(db_url):
    engine = sa.create_engine(db_url)
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO responses VALUES ('chatcmpl-old', 1.5, '/v1/chat/completions', 'm',"
                " NULL, '{}', 'p', 'c', 'stop', 1, 1, 0.1, NULL, 200, NULL)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO feedback (response_id, created, rating, scale, score, correction,"
                " tags, comment, idempotency_key) VALUES ('chatcmpl-old', 2.5, 4, 'stars', 0.75,"
                " 'fixed', '[\"t\"]', 'ok', 'old-key')"
            )
        )
        assert "retrain_runs" not in sa.inspect(conn).get_table_names()
    engine.dispose()
    store = FeedbackStore(db_url)  # upgrades to head
    [row] = store.feedback()
    assert (row["rating"], row["correction"], row["tags"], row["comment"]) == (
        4,
        "fixed",
        ["t"],
        "ok",
    )
    assert row["source"] == "api" and row["response"]["id"] == "chatcmpl-old"
    # the old row's key still deduplicates a retry after the upgrade
    again, created = store.add_feedback(
        FeedbackItem(
            "chatcmpl-old",
            4,
            "stars",
            correction="fixed",
            tags=["t"],
            comment="ok",
            idempotency_key="old-key",
        )  # fmt: skip
    )
    assert not created and again["id"] == row["id"]
    assert "retrain_runs" in store.tables()
    store.close()


def test_models_match_the_migrations(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tuneforge.feedback.models import Base

    store = FeedbackStore(db_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    store.close()
    assert diff == []


def test_locked_sqlite_is_unavailable_not_dropped(tmp_path):
    path = tmp_path / "fb.db"
    store = FeedbackStore(path, busy_timeout_s=0.2, spool=tmp_path / "spool.jsonl")
    rec = make_record()
    store.write(rec)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreUnavailable, match="locked"):
        store.add_feedback(FeedbackItem(rec.id, 1, "thumbs"))
    late = make_record("later")
    store.write(late)  # serving keeps going: the record waits in the spool
    assert (tmp_path / "spool.jsonl").is_file()
    locker.execute("ROLLBACK")
    locker.close()
    store.write(make_record("after"))  # drains the spool first
    assert not (tmp_path / "spool.jsonl").exists()
    assert store.get_response(late.id) is not None and len(store.responses()) == 3
    assert store.add_feedback(FeedbackItem(rec.id, 1, "thumbs"))[1]


def test_postgres_down_is_unavailable(pg_cluster):
    name = pg_cluster.create_database()
    store = FeedbackStore(pg_cluster.url(name), busy_timeout_s=2)
    rec = make_record()
    store.write(rec)
    pg_cluster.psql(f"DROP DATABASE {name} WITH (FORCE);")
    with pytest.raises(StoreUnavailable, match="feedback store"):
        store.add_feedback(FeedbackItem(rec.id, 1, "thumbs"))
    store.close()
    with pytest.raises(StoreUnavailable, match="cannot open the store"):
        FeedbackStore(pg_cluster.url(name), busy_timeout_s=2)


def test_bad_urls_are_user_errors(tmp_path):
    with pytest.raises(FeedbackError, match="use sqlite or postgresql"):
        FeedbackStore("mysql://x@localhost/db")


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"rating": 1}, 400, "response_id"),
        ({"response_id": "x", "rating": "1"}, 400, "rating"),
        ({"response_id": "x", "rating": True}, 400, "rating"),
        ({"response_id": "x", "rating": 7}, 400, "rating"),
        ({"response_id": "x", "rating": 3, "scale": "thumbs"}, 400, "rating"),
        ({"response_id": "x", "rating": 1, "scale": "likes"}, 400, "scale"),
        ({"response_id": "x", "rating": 1, "tags": "a"}, 400, "tags"),
        ({"response_id": "x", "rating": 1, "tags": [1]}, 400, "tags[0]"),
        ({"response_id": "x", "rating": 1, "comment": 5}, 400, "comment"),
        ({"response_id": "x", "rating": 1, "correction": "x" * 2**20}, 413, "correction"),
        ({"response_id": "x", "rating": 1, "comment": "a\ud800"}, 400, "comment"),
        ({"response_id": "x", "rating": 1, "correction": "a\x00b"}, 400, "correction"),
        ({"response_id": "x", "rating": 1, "score": 1}, 400, "score"),
        (["not", "an", "object"], 400, None),
    ],
)
def test_parse_feedback_names_the_field(body, status, field):
    with pytest.raises(FieldError) as err:
        parse_feedback(body)
    assert (err.value.status, err.value.field) == (status, field)
    assert field is None or err.value.message.startswith(field)


def test_parse_feedback_scales():
    assert parse_feedback({"response_id": "x", "rating": -1}).score == 0.0
    assert parse_feedback({"response_id": "x", "rating": 1}).scale == "thumbs"
    assert parse_feedback({"response_id": "x", "rating": 4}).score == 0.75
    assert parse_feedback({"response_id": "x", "rating": 1, "scale": "stars"}).score == 0.0
    keyed = parse_feedback({"response_id": "x", "rating": 1}, key="hdr")
    assert keyed.idempotency_key == "hdr"

"""`POST /v1/feedback` and `/dashboard` over HTTP, on SQLite and PostgreSQL: keys, idempotency,
field-named 4xx, hostile input, 503 while the database is locked; and the stats / drift maths.
"""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
from fastapi.testclient import TestClient

from tuneforge.feedback.drift import DriftReference, drift_report, psi
from tuneforge.feedback.stats import percentile, rating_alert, summarize
from tuneforge.feedback.store import FeedbackStore
from tuneforge.serve.auth import ApiKeys

from feedback_helpers import KEY, feedback_app, make_record

AUTH = {"Authorization": f"Bearer {KEY}"}
XSS = "<script>alert('pwned')</script>"


@pytest.fixture
def served(db_url):
    store = FeedbackStore(db_url)
    rec = make_record(model=f"m{XSS}")
    store.write(rec)
    client = TestClient(feedback_app(store, ApiKeys([KEY]), training_texts=["Color of sky?"] * 5))
    yield client, store, rec
    store.close()


def test_needs_the_key_and_stores_nothing_without_it(served):
    client, store, rec = served
    r = client.post("/v1/feedback", json={"response_id": rec.id, "rating": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/dashboard").status_code == 401
    assert store.feedback() == []


def test_post_then_retry_returns_the_same_row(served):
    client, store, rec = served
    body = {"response_id": rec.id, "rating": 4, "correction": "blue!", "tags": ["color"]}
    first = client.post("/v1/feedback", json=body, headers={**AUTH, "Idempotency-Key": "abc"})
    again = client.post("/v1/feedback", json=body, headers={**AUTH, "Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.json()["idempotent_replay"]
    assert first.json()["score"] == 0.75 and first.json()["scale"] == "stars"
    other = client.post("/v1/feedback", json={**body, "rating": 2}, headers={**AUTH, "Idempotency-Key": "abc"})  # fmt: skip
    assert other.status_code == 409 and other.json()["error"]["param"] == "idempotency_key"
    assert [f["correction"] for f in store.feedback()] == ["blue!"]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"response_id": "chatcmpl-unknown", "rating": 1}, 404, "response_id"),
        ({"response_id": "RID", "rating": "good"}, 400, "rating"),
        ({"response_id": "RID", "rating": 1, "tags": {"a": 1}}, 400, "tags"),
        ({"response_id": "RID", "rating": 1, "correction": "x" * 2**20}, 413, "correction"),
        ({"response_id": "RID", "rating": 1, "comment": "\ud800"}, 400, "comment"),
    ],
)
def test_bad_feedback_is_4xx_naming_the_field(served, body, status, param):
    client, store, rec = served
    body = {k: rec.id if v == "RID" else v for k, v in body.items()}
    r = client.post("/v1/feedback", content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param)
    assert store.feedback() == []


def test_bodies_that_are_not_json_objects(served):
    client, store, rec = served
    for raw, status, words in [
        (b'{"response_id": "\xff\xfe", "rating": 1}', 400, "UTF-8"),
        (b"{not json", 400, "not JSON"),
        (b"x" * (3 * 2**20), 413, "over the limit"),
    ]:
        r = client.post("/v1/feedback", content=raw, headers=AUTH)
        assert r.status_code == status and words in r.json()["error"]["message"]
    assert store.feedback() == []


def test_hostile_text_stored_verbatim_and_escaped_on_the_dashboard(served):
    client, store, rec = served
    sql = "'); DROP TABLE feedback; --"
    body = {"response_id": rec.id, "rating": -1, "comment": XSS, "correction": sql, "tags": [XSS]}
    assert client.post("/v1/feedback", json=body, headers=AUTH).status_code == 201
    [row] = store.feedback()
    assert row["comment"] == XSS and row["correction"] == sql and row["tags"] == [XSS]
    page = client.get("/dashboard", headers=AUTH)
    assert page.status_code == 200 and "<script" not in page.text.lower()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.text.count("data:image/png;base64,") == 3
    assert "Rule: drift fires when" in page.text and "mean score of the last 50" in page.text


def test_locked_database_is_503_then_the_retry_lands_once(tmp_path):
    path = tmp_path / "fb.db"
    store = FeedbackStore(path, busy_timeout_s=0.2)
    rec = make_record()
    store.write(rec)
    client = TestClient(feedback_app(store, ApiKeys([KEY])))
    body = {"response_id": rec.id, "rating": 1}
    headers = {**AUTH, "Idempotency-Key": "retry-me"}
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    r = client.post("/v1/feedback", json=body, headers=headers)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "store_unavailable"
    assert client.get("/dashboard", headers=AUTH).status_code == 503
    locker.execute("ROLLBACK")
    locker.close()
    assert client.post("/v1/feedback", json=body, headers=headers).status_code == 201
    assert client.post("/v1/feedback", json=body, headers=headers).status_code == 200
    assert len(store.feedback()) == 1


def test_summary_numbers_by_hand():
    t0 = 1_000_000.0
    responses = [
        {**make_record(created=t0 + i, latency_s=lat).to_dict(), "status": st}
        for i, (lat, st) in enumerate([(0.1, 200), (0.2, 200), (0.3, 200), (0.4, 500)])
    ]
    fb = [
        {"id": 1, "created": t0, "score": 1.0, "tags": ["a", "b"], "correction": None,
         "response": {"model": "m", "adapter": "x"}},
        {"id": 2, "created": t0 + 3, "score": 0.0, "tags": ["a"], "correction": "c",
         "response": {"model": "m", "adapter": None}},
    ]  # fmt: skip
    s = summarize(responses, fb, buckets=3)
    assert (s["requests"], s["errors"], s["corrections"]) == (4, 1, 1)
    assert s["latency_p50_s"] == pytest.approx(0.2) and s["latency_p95_s"] == pytest.approx(0.29)
    assert s["top_tags"] == [("a", 2), ("b", 1)] and s["mean_score"] == 0.5
    assert [b["requests"] for b in s["traffic"]] == [1, 1, 2]
    assert s["traffic"][2]["errors"] == 1 and s["alerts"]["errors"]["fired"]
    assert set(s["ratings"]) == {"m", "m/x"}
    assert math.isnan(percentile([], 50))


def test_rating_alert_rule():
    assert not rating_alert([1.0] * 99)["fired"]  # too few ratings
    assert rating_alert([1.0] * 50 + [0.8] * 50)["fired"]  # 1.0 -> 0.8: a drop of 0.2
    assert not rating_alert([1.0] * 50 + [0.95] * 50)["fired"]


def test_drift_measures():
    train = [f"Color of {t}?" for t in ("sky", "grass", "snow", "rose", "fox")] * 4
    ref = DriftReference.from_texts(train)
    same = drift_report(ref, train)
    assert same["far_share"] == 0.0 and same["length_psi"] == pytest.approx(0.0, abs=1e-9)
    assert not same["alert"]["fired"] and same["zh_share"]["served"] == 0.0
    far = drift_report(ref, ["这本书很好，我很喜欢。"] * 10)
    assert far["far_share"] == 1.0 and far["zh_share"]["served"] == 1.0 and far["alert"]["fired"]
    assert psi([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(0.0, abs=1e-9)

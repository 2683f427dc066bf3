"""The loop end to end on the tiny model through serve's real app: requests -> feedback ->
export -> retrain -> promotion -> reload -> the server answers from the promoted adapter.

Not collected yet (no test_ prefix): it needs `tuneforge.serve.app` from the serve branch.
After merging serve, rename it to tests/test_feedback_loop.py (checked against serve 91a729f).
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from tuneforge.feedback.routes import feedback_router
from tuneforge.feedback.store import FeedbackStore
from tuneforge.loading import load_run
from tuneforge.models import resolve_dtype
from tuneforge.recipes.retrain import RetrainJob, promoted_dir, run_retrain
from tuneforge.serve.app import create_app
from tuneforge.serve.auth import ApiKeys
from tuneforge.serve.engines.hf import TransformersEngine

from helpers import COLORS, THINGS

KEY = "loop-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ANSWER = {t: COLORS[i % len(COLORS)] for i, t in enumerate(THINGS)}


def _chat(client, thing: str):
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"Color of {thing}?"}], "max_tokens": 4}  # fmt: skip
    r = client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_serve_feedback_retrain_promote_reload(parent_copy, db_url, one_thread):
    store = FeedbackStore(db_url, spool=parent_copy / "serve" / "spool.jsonl")
    keys = ApiKeys([KEY])
    engine = TransformersEngine(
        load_run(parent_copy, resolve_dtype("auto", "cpu")), "tiny", parent_copy
    )
    app = create_app(engine, keys=keys, sink=store, routers=[feedback_router(store, keys)])
    client = TestClient(app)
    for i in range(16):
        thing = THINGS[i % len(THINGS)]
        rid = _chat(client, thing)["id"]
        body = {"response_id": rid, "rating": -1, "correction": ANSWER[thing]}
        r = client.post("/v1/feedback", headers={**AUTH, "Idempotency-Key": f"k{i}"}, json=body)
        assert r.status_code == 201, r.text
    assert client.post("/v1/feedback", json={}).status_code == 401
    assert client.get("/dashboard", headers=AUTH).status_code == 200
    assert len(store.responses()) == 16 and len(store.feedback()) == 16
    job = RetrainJob(
        parent_copy, db_url, min_new=10, steps=12, max_regression=0.05, show_progress=False
    )
    out = run_retrain(job)
    assert out.decision == "promoted", out.reason
    assert app.state.reload(str(promoted_dir(parent_copy))) == "candidate"
    after = _chat(client, "sky")
    assert store.get_response(after["id"]) is not None  # the new adapter's answer is recorded too
    assert len(store.responses()) == 17
    store.close()

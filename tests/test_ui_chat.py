"""The page's chat and feedback proxy, without a browser: token and CSRF, target confinement,
the serve subprocess (fresh 0600 key file, reuse, switch, stop), the streamed relay, ratings
into the real SQLite store, the server's 4xx message for an unknown response id, the dashboard,
and the served key absent from everything the browser gets.

The server is tests/ui_serve_stub.py (the real key check, feedback router and store, no model);
the real `tuneforge serve` behind the page is exercised by test_ui_browser.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from test_ui import TOKEN, fake_finished_run
from tuneforge.feedback import FeedbackStore
from tuneforge.serve.auth import hash_key
from tuneforge.ui.app import create_app
from tuneforge.ui.chat import ChatServer, chat_targets, process_start, store_path
from tuneforge.ui.workspace import Workspace

STUB = [sys.executable, str(Path(__file__).with_name("ui_serve_stub.py"))]


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    run = fake_finished_run(root, "runs/a", [2.0, 1.0], 1.5)
    fake_finished_run(root, "runs/b", [2.0, 1.5], 1.7)
    (run / "export-merged").mkdir()
    (run / "export-merged" / "config.json").write_text("{}")
    (run / "export-gguf").mkdir()
    for name in ("a-q4_k_m.gguf", "a-lora-adapter.gguf"):
        (run / "export-gguf" / name).write_bytes(b"GGUF")
    unfinished = root / "runs" / "c"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("model: {name: m}\n")
    (unfinished / "metrics.jsonl").write_text("")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text('{"text": "x"}\n')
    outside = tmp_path / "outside"
    fake_finished_run(outside, "run", [1.0], 1.0)
    os.symlink(outside / "run", root / "runs" / "link-out")
    return root


@pytest.fixture
def page(ws):
    """(app, client) with the session cookie; leaving it stops the chat server (lifespan)."""
    app = create_app(ws, TOKEN, supervise=False, serve_argv=STUB)
    try:
        with TestClient(app, base_url="http://127.0.0.1:7860") as client:
            client.get(f"/?token={TOKEN}")
            yield app, client
    finally:
        app.state.queue.close()


def post(app, client, path: str, body: dict, **kw):
    headers = {"X-CSRF-Token": app.state.keys.csrf}
    return client.post(path, content=json.dumps(body), headers=headers, **kw)


def sse(text: str) -> list[dict]:
    lines = [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]
    return [json.loads(ln) for ln in lines if ln != "[DONE]"]


def test_targets_are_finished_runs_and_their_exports(ws):
    assert chat_targets(Workspace(ws)) == [
        "runs/a",
        "runs/a/export-gguf/a-q4_k_m.gguf",
        "runs/a/export-merged",
        "runs/b",
    ]


def test_without_token_or_csrf_nothing_reaches_the_server(ws):
    app = create_app(ws, TOKEN, supervise=False, serve_argv=STUB)
    try:
        anon = TestClient(app, base_url="http://127.0.0.1:7860")
        for path in ("/chat", "/feedback", "/chat/status", "/feedback/dashboard?target=runs/a"):
            assert anon.get(path).status_code == 401, path
        body = json.dumps({"target": "runs/a", "messages": [{"role": "user", "content": "hi"}]})
        headers = {"X-CSRF-Token": app.state.keys.csrf}
        for path in ("/chat/start", "/chat/completions", "/chat/feedback", "/chat/stop"):
            assert anon.post(path, content=body, headers=headers).status_code == 401, path
        anon.get(f"/?token={TOKEN}")  # now a session, but no CSRF token
        for path in ("/chat/start", "/chat/completions", "/chat/feedback", "/chat/stop"):
            response = anon.post(path, content=body)
            assert response.status_code == 403 and "CSRF" in response.json()["error"], path
            wrong = anon.post(path, content=body, headers={"X-CSRF-Token": "0" * 64})
            assert wrong.status_code == 403, path
        assert app.state.chat.current is None and not app.state.chat.keys_file.exists()
    finally:
        app.state.queue.close()


@pytest.mark.parametrize(
    "target",
    [
        "../outside/run",
        "/etc",
        "runs/link-out",
        "runs/%2e%2e/%2e%2e/outside/run",
        ".tuneforge-ui",
        "runs/c",  # a run that has not finished
        "data/train.jsonl",  # in the workspace, but not a run or an export
        "runs/a/export-gguf/a-lora-adapter.gguf",
    ],
)
def test_target_picking_refuses_paths_outside_the_workspace(page, target):
    app, client = page
    for path in ("/chat/start", "/chat/completions", "/chat/feedback"):
        body = {"target": target, "messages": [{"role": "user", "content": "hi"}]}
        response = post(app, client, path, body)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"].startswith("refused: "), response.text
    assert client.get("/chat", params={"target": target}).status_code == 400
    assert client.get("/feedback/dashboard", params={"target": target}).status_code == 400
    assert app.state.chat.current is None  # nothing was started


def test_chat_stream_rating_store_and_lifecycle(page, ws):
    app, client = page
    chat: ChatServer = app.state.chat
    started = time.monotonic()
    response = post(app, client, "/chat/start", {"target": "runs/a"})
    start_s = time.monotonic() - started
    assert response.json() == {"state": "ready", "target": "runs/a", "model": "a"}, response.text
    served = chat.current
    # the server: 127.0.0.1, a fresh key that only its hash in a 0600 file tells
    args = served.proc.args
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--db") + 1] == f"sqlite:///{ws / 'runs/a/serve/feedback.sqlite'}"
    mode = stat.S_IMODE(chat.keys_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    key_text = chat.keys_file.read_text()
    assert served.key not in key_text and f"sha256:{hash_key(served.key)}" in key_text

    # a streamed answer, two turns: the history is the page's, the id each answer's own
    seen: list[str] = []
    messages = [{"role": "user", "content": "Color of sky?"}]
    for turn in ("first", "second"):  # `turn` is the user's next message
        body = {"target": "runs/a", "messages": messages, "max_tokens": 8}
        with client.stream("POST", "/chat/completions", content=json.dumps(body),
                           headers={"X-CSRF-Token": app.state.keys.csrf}) as stream:  # fmt: skip
            assert stream.status_code == 200 and stream.headers["content-type"].startswith(
                "text/event-stream"
            )
            raw = "".join(stream.iter_text())
        seen.append(raw)
        chunks = sse(raw)
        ids = {c["id"] for c in chunks}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert len(ids) == 1 and text == "echo: " + messages[-1]["content"], turn
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": turn}]
    rid = ids.pop()
    assert chat.current is served  # the same target reuses the running server

    # a rating (with a correction) is stored; a retry with the same key is not stored twice
    rating = {"target": "runs/a", "response_id": rid, "rating": 1, "correction": "blue",
              "idempotency_key": "k-1"}  # fmt: skip
    first = post(app, client, "/chat/feedback", rating)
    assert first.status_code == 201, first.text
    assert post(app, client, "/chat/feedback", rating).json()["idempotent_replay"] is True
    store = FeedbackStore(f"sqlite:///{store_path(Workspace(ws), 'runs/a')}", create=False)
    try:
        rows = store.feedback()
        assert [(r["response_id"], r["rating"], r["correction"]) for r in rows] == [
            (rid, 1, "blue")
        ]
        served_row = store.get_response(rid)  # the second answer, to the whole history
        assert served_row["completion"] == "echo: first"
        assert [m["content"] for m in served_row["request"]["messages"]] == [
            "Color of sky?",
            "echo: Color of sky?",
            "first",
        ]
    finally:
        store.close()

    # an unknown response id: the server's own 4xx message comes back
    unknown = post(
        app,
        client,
        "/chat/feedback",
        {**rating, "response_id": "chatcmpl-nope", "idempotency_key": "k-3"},
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "response_id: no response 'chatcmpl-nope'"
    bad = post(app, client, "/chat/feedback", {**rating, "rating": 3, "idempotency_key": "k-2"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("rating: 3")

    # the feedback view: the dashboard from the same store, its images allowed
    page_html = client.get("/feedback").text
    assert 'src="/feedback/dashboard?target=runs/a"' in page_html
    dash = client.get("/feedback/dashboard", params={"target": "runs/a"})
    assert dash.status_code == 200 and "1 ratings" in dash.text and "blue" in dash.text
    assert "img-src data:" in dash.headers["content-security-policy"]
    assert dash.text.count("src='data:image/png;base64,") == 3

    # the key never reaches the browser: no page, answer or status holds it or its hash
    bodies = [client.get(p).text for p in ("/chat", "/chat?target=runs/a", "/feedback")]
    bodies += [dash.text, first.text, unknown.text, response.text, *seen]
    bodies.append(client.get("/chat/status").text)
    for body in bodies:
        assert served.key not in body and hash_key(served.key) not in body

    # another target: the old server is stopped first, the new one gets a new key
    old_proc, old_key = served.proc, served.key
    assert post(app, client, "/chat/start", {"target": "runs/b"}).json()["model"] == "b"
    assert old_proc.poll() is not None and chat.current.key != old_key
    assert f"sha256:{hash_key(old_key)}" not in chat.keys_file.read_text()
    print(f"\nstub server start {start_s:.2f} s")


def test_the_server_stops_with_the_page_and_a_leftover_is_reaped(ws):
    app = create_app(ws, TOKEN, supervise=False, serve_argv=STUB)
    try:
        with TestClient(app, base_url="http://127.0.0.1:7860") as client:
            client.get(f"/?token={TOKEN}")
            post(app, client, "/chat/start", {"target": "runs/a/export-merged"})
            proc = app.state.chat.current.proc
            assert proc.poll() is None
        assert proc.poll() is not None  # the page's shutdown stopped it
        assert not app.state.chat.keys_file.exists() and not app.state.chat.state_file.exists()
    finally:
        app.state.queue.close()

    # a page killed hard leaves serve.json: the next page ends that process (pid + start time)
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    chat = ChatServer(Workspace(ws))
    chat.state_file.write_text(
        json.dumps({"pid": leftover.pid, "pid_start": process_start(leftover.pid)})
    )
    chat.reap_stale()
    assert leftover.wait(timeout=10) == -15
    # a reused pid (another start time) is left alone
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    chat.state_file.write_text(json.dumps({"pid": other.pid, "pid_start": "1"}))
    chat.reap_stale()
    time.sleep(0.2)
    assert other.poll() is None
    other.kill()
    other.wait()


def test_a_server_that_fails_to_start_is_reported(ws):
    failing = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(2)"]
    app = create_app(ws, TOKEN, supervise=False, serve_argv=failing)
    try:
        with TestClient(app, base_url="http://127.0.0.1:7860") as client:
            client.get(f"/?token={TOKEN}")
            response = post(app, client, "/chat/start", {"target": "runs/a"})
            assert response.status_code == 502
            assert "exited with 2" in response.json()["error"]
            assert "no model here" in response.json()["error"]
            assert app.state.chat.status()["state"] == "stopped"
            assert not app.state.chat.keys_file.exists()
    finally:
        app.state.queue.close()

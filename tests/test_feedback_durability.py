"""R11: acknowledged feedback survives a SIGKILL of the server, on SQLite and on PostgreSQL.

A bounded loop POSTs feedback to the feedback app in a subprocess (router + store, as
`serve --db` mounts them, without a model), SIGKILLs it at random moments, restarts it and
retries unacknowledged posts with the same idempotency key: every 2xx row is there exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tuneforge.feedback.store import FeedbackStore

from feedback_helpers import KEY

HERE = Path(__file__).parent
POSTS, KILLS, DEADLINE_S = 40, 3, 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(url: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    proc = subprocess.Popen([sys.executable, str(HERE / "feedback_helpers.py"), url, str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/dashboard", timeout=2).status_code == 401:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    raise AssertionError("the feedback server did not start")


def test_acknowledged_feedback_survives_sigkill(db_url):
    FeedbackStore(db_url).close()  # create the schema once, before the server races to
    port, rng = _free_port(), random.Random(0)
    proc = _start(db_url, port)
    acked: dict[str, int] = {}
    kills, restarts, i, start = 0, 0, 0, time.monotonic()
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        # Keep posting until every armed kill was felt (a fast machine can finish the posts
        # before the last kill's timer fires).
        while (i < POSTS or restarts < KILLS) and time.monotonic() - start < DEADLINE_S:
            # One kill at a time: the next is armed once the previous one was felt.
            due = kills < KILLS and kills == restarts and i >= (8, 20, 31)[kills]
            if due and proc.poll() is None:
                victim = proc  # kill during the next posts, at a random moment
                threading.Timer(rng.uniform(0.0, 0.3), lambda p=victim: p.send_signal(signal.SIGKILL)).start()  # fmt: skip
                kills += 1
            key = f"key-{i}"
            body = {"response_id": "chatcmpl-seed", "rating": 1, "comment": f"post {i}"}
            try:
                r = client.post(
                    "/v1/feedback", json=body, headers={**headers, "Idempotency-Key": key}
                )
            except httpx.HTTPError:
                proc.wait(timeout=30)
                proc = _start(db_url, port)
                restarts += 1
                continue  # retry the same key
            if r.status_code == 503:
                time.sleep(0.2)
                continue
            assert r.status_code in (200, 201), r.text
            acked[key] = r.json()["id"]
            i += 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert i >= POSTS and kills == KILLS and restarts == KILLS  # each kill was felt
    store = FeedbackStore(db_url)
    rows = store.feedback()
    store.close()
    by_key = {}
    for row in rows:
        assert row["idempotency_key"] not in by_key  # never twice
        by_key[row["idempotency_key"]] = row
    assert set(acked) <= set(by_key)
    assert all(
        by_key[k]["id"] == acked[k] and by_key[k]["comment"] == f"post {k[4:]}" for k in acked
    )
    # Every acknowledged post is stored once; the only other row a kill may leave is the last
    # post, committed but not acknowledged when the loop ended (none lost, none invented).
    assert set(by_key) <= {f"key-{n}" for n in range(i + 1)} and len(acked) == i

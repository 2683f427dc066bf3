"""`tuneforge serve` as a process: SIGTERM while streams are running lets them finish and exits 0;
the API key never reaches the logs; records land in RUN_DIR/serve/records.jsonl.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve_helpers import KEY, free_port, train_tiny_run
from tuneforge.serve.records import JsonlRecordSink


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, one_thread):
    return train_tiny_run(tmp_path_factory.mktemp("shutdown"), tiny_model_dir, "run")


def start_server(run_dir: Path, tmp: Path, port: int) -> subprocess.Popen:
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key\n{KEY}\n")
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", str(run_dir), "--port", str(port),
         "--api-key-file", str(keys), "--dtype", "fp32", "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_sigterm_lets_running_streams_finish_and_exits_0(run_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(run_dir, tmp_path, port)
    try:
        wait_healthy(url, proc)
        results: dict[int, list[str]] = {}
        first_chunk = threading.Barrier(4)

        def stream(i: int) -> None:
            body = {
                "model": "run",
                "messages": [{"role": "user", "content": f"Color of sky? {i}"}],
                "max_tokens": 200,
                "temperature": 0,
                "stream": True,
            }
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers,
                              timeout=60) as r:  # fmt: skip
                lines = []
                for line in r.iter_lines():
                    if line and not lines:
                        first_chunk.wait(timeout=30)
                    if line:
                        lines.append(line)
                results[i] = lines

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        first_chunk.wait(timeout=30)  # all three are streaming now
        sigterm_at = time.time()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = proc.stdout.read()
    assert sorted(results) == [0, 1, 2]
    for lines in results.values():
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "' in lines[-2]
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    assert KEY not in logs and "Shutting down" in logs
    # With the feedback package installed (it is, in this project) records go to its store
    # beside the run; without it, to the append-only JSONL.
    store_file = run_dir / "serve" / "feedback.sqlite"
    if store_file.is_file():
        from tuneforge.feedback import FeedbackStore

        store = FeedbackStore(f"sqlite:///{store_file}")
        records = [(r["status"], r["created"]) for r in store.responses()]
        store.close()
    else:
        jsonl = JsonlRecordSink(run_dir / "serve" / "records.jsonl").read()
        records = [(r.status, r.created) for r in jsonl]
    assert sorted(status for status, _ in records) == [200, 200, 200]
    assert all(created > sigterm_at for _, created in records)  # still generating at SIGTERM

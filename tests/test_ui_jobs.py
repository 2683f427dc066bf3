"""The page's job queue with real processes: CLI jobs one at a time with their exit codes, the live
metrics tail over server-sent events (a new line within 2 s), and a tiny training run that
survives a restart of the page, is cancelled into a checkpoint and resumed to the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from tuneforge.ui.app import create_app
from tuneforge.ui.jobs import Job, JobQueue, process_start
from tuneforge.ui.tail import read_new
from tuneforge.ui.workspace import Workspace

from helpers import write_toy_messages

TOKEN = "t0k3n-for-the-job-tests-0123456789"


def wait_for(predicate, timeout: float, tick=None, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_jobs_run_one_at_a_time_and_record_their_exit(tmp_path):
    queue = JobQueue(Workspace(tmp_path), max_running=1)
    try:
        bad = queue.submit("train", "runs/bad", ["config", "missing.yaml"])
        ok = queue.submit("train", "runs/ok", ["config"])
        queue.tick()
        assert (bad.state, ok.state) == ("running", "queued")  # one at a time
        assert process_start(bad.pid) == bad.pid_start
        wait_for(lambda: not bad.active and not ok.active, 180, queue.tick, "both jobs to end")
        assert (bad.state, bad.rc) == ("failed", 2)
        assert "error: missing.yaml: config file not found" in queue.log_tail(bad)
        assert (ok.state, ok.rc) == ("finished", 0)
        assert "log.report" in queue.log_tail(ok)  # `tuneforge config` printed the reference
        assert bad.started <= bad.ended <= ok.started
        saved = json.loads((tmp_path / ".tuneforge-ui" / "queue.json").read_text())
        assert [(j["id"], j["state"], j["rc"]) for j in saved] == [
            (bad.id, "failed", 2),
            (ok.id, "finished", 0),
        ]
    finally:
        queue.close()


def test_read_new_takes_complete_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_new(path, 0) == ([], 0, False)
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    records, offset, cut = read_new(path, 0)
    assert records == [{"step": 1}, {"step": 2}] and offset == 24 and not cut
    assert read_new(path, offset) == ([], 24, False)  # the torn line waits for its newline
    with path.open("a") as fh:
        fh.write('p": 3}\n')
    assert read_new(path, offset) == ([{"step": 3}], 36, False)
    path.write_text('{"step": 1}\n')  # replaced by a shorter file: the reader starts over
    assert read_new(path, 36) == ([], 0, True)


def test_sse_shows_a_new_line_within_two_seconds_and_ends_with_the_job(tmp_path):
    run = tmp_path / "runs" / "live"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("output: {dir: runs/live}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    stand_in = subprocess.Popen(["sleep", "60"])  # a live process in the role of the trainer
    app = create_app(tmp_path, TOKEN)
    queue = app.state.queue
    job = Job(id="j1", kind="train", run="runs/live", argv=["train", "x.yaml"], state="running")
    job.pid, job.pid_start = stand_in.pid, process_start(stand_in.pid)
    queue.jobs.append(job)
    written: dict[int, float] = {}

    def writer():
        for step in (2, 3, 4):
            time.sleep(1.0)
            with (run / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({"step": step, "loss": 2.0 - step / 10}) + "\n")
            written[step] = time.monotonic()
        time.sleep(0.5)
        stand_in.kill()
        stand_in.wait()

    arrived: dict[int, float] = {}
    events = []
    try:
        with TestClient(app) as client:
            client.get(f"/?token={TOKEN}")
            thread = threading.Thread(target=writer)
            thread.start()
            with client.stream("GET", "/run/events", params={"dir": "runs/live"}) as stream:
                event = None
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        events.append(event)
                        if event == "metrics":
                            for record in data:
                                arrived[record["step"]] = time.monotonic()
                        if event == "done":
                            final = data
                            break
            thread.join()
    finally:
        queue.close()
        if stand_in.poll() is None:
            stand_in.kill()
    assert sorted(arrived) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        assert arrived[step] - written[step] < 2.0, (step, arrived[step] - written[step])
    assert events[0] == "metrics" and events[-1] == "done"
    assert final["state"] == "lost" and not final["active"]  # killed without an exit code


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.fixture
def train_ws(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    (tmp_path / "data").mkdir()
    write_toy_messages(tmp_path / "data" / "train.jsonl", n=48)
    return tmp_path


def test_a_run_survives_a_page_restart_is_cancelled_into_a_checkpoint_and_resumed(train_ws):
    form = {
        "method.name": "lora",
        "method:lora:method.r": "4",
        "model.name": "models/tiny",
        "model.dtype": "fp32",
        "data.train": "data/train.jsonl",
        "data.validation": "0.125",
        "data.max_length": "64",
        "train.max_steps": "30",
        "train.batch_size": "4",
        "train.lr": "0.005",
        "train.num_threads": "1",
        "eval.every_steps": "10",
        "checkpoint.every_steps": "null",
        "checkpoint.at_epoch_end": "false",  # the only checkpoint is the one SIGTERM makes
        "output.dir": "runs/live",
        "config_name": "live",
        "action": "launch",
    }
    app = create_app(train_ws, TOKEN)
    with TestClient(app) as client:
        client.get(f"/?token={TOKEN}")
        form["_csrf"] = app.state.keys.csrf
        assert client.post("/new", data=form, follow_redirects=False).status_code == 303
        job = app.state.queue.jobs[0]
        metrics = train_ws / "runs" / "live" / "metrics.jsonl"
        wait_for(
            lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2,
            240,
            what="the first metrics lines",
        )
        (trainer,) = _children(job.pid)
        os.kill(trainer, signal.SIGSTOP)  # hold the trainer mid-run, whatever this machine's speed
    app.state.queue.close()  # the page stops; the job does not

    app = create_app(train_ws, TOKEN)  # a new page process on the same workspace
    try:
        with TestClient(app) as client:
            client.get(f"/?token={TOKEN}")
            queue = app.state.queue
            job = queue.jobs[0]
            assert job.state == "running" and process_start(job.pid) == job.pid_start
            assert "Cancel (checkpoint and stop)" in client.get("/run?dir=runs/live").text
            cancel = {"_csrf": app.state.keys.csrf, "dir": "runs/live"}
            assert (
                client.post("/run/cancel", data=cancel, follow_redirects=False).status_code == 303
            )
            os.kill(trainer, signal.SIGCONT)  # it now sees the SIGTERM at its next step
            wait_for(lambda: not job.active, 120, what="the cancelled job to end")
            assert (job.state, job.rc) == ("cancelled", 143)
            run = train_ws / "runs" / "live"
            assert not (run / "summary.json").exists()
            (checkpoint,) = sorted((run / "checkpoints").glob("step-*"))
            stopped_at = int(checkpoint.name.split("-")[1])
            assert 0 < stopped_at < 30
            page = client.get("/run?dir=runs/live").text
            assert f"Resume from {checkpoint.name}" in page
            assert (
                client.post("/run/resume", data=cancel, follow_redirects=False).status_code == 303
            )
            again = queue.jobs[-1]
            assert again.argv == ["train", "configs/live.yaml", "--quiet", "--resume", "auto"]
            wait_for(lambda: not again.active, 240, what="the resumed run to finish")
            assert (again.state, again.rc) == ("finished", 0), queue.log_tail(again)
            summary = json.loads((run / "summary.json").read_text())
            assert summary["steps"] == 30
            manifest = json.loads((run / "manifest.json").read_text())
            assert manifest["fast_path"]["allocator"] == "tcmalloc"  # as `tuneforge train` runs
            records = [json.loads(x) for x in metrics.read_text().splitlines()]
            assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))
            # the finished run streams every record and ends; its page shows the report link
            with client.stream("GET", "/run/events", params={"dir": "runs/live"}) as stream:
                body = "".join(stream.iter_text())
            assert body.rstrip().endswith('"has_report": true}')
            assert "event: done" in body
            html = client.get("/runs").text
            assert '<span class="state finished">finished</span>' in html
            report = client.get("/run/report?dir=runs/live")
            assert report.status_code == 200 and "<html" in report.text.lower()
            saved = yaml.safe_load((train_ws / "configs" / "live.yaml").read_text())
            assert saved["train"]["max_steps"] == 30
    finally:
        app.state.queue.close()

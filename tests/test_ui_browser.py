"""The web page in a real browser: Playwright driving Debian's Chromium (`apt-get install chromium`,
never a downloaded browser) against `tuneforge ui` started as a user would start it.

Token refused / accepted, a wrong value named inline by its key, the fixed config launched on a
tiny model, the loss curve growing while it runs, the report, the picker refusing `../`; then a
chat with the finished run through the page's own `tuneforge serve`, a streamed answer rated with
a correction, and the rating read back from the run's feedback store.
Screenshots go to $TUNEFORGE_UI_SHOTS (docs/ui/ when refreshing the docs), else a temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_toy_messages

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SRC = Path(__file__).resolve().parent.parent / "src"
#: True once the loss chart's point count or the run's state differs from [points, state].
CHANGED = """([points, state]) =>
    +(document.querySelector('#chart-loss').dataset.points || 0) !== points
    || document.querySelector('#state').innerText !== state"""
ui_state: dict[str, int] = {}  # what the test leaves for the fixture's teardown to check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui_server(tmp_path, tiny_model_dir):
    """`tuneforge ui` on a workspace with a tiny model and toy data; yields (url with token, ws)."""
    ws = tmp_path / "ws"
    shutil.copytree(tiny_model_dir, ws / "models" / "tiny")
    (ws / "data").mkdir()
    write_toy_messages(ws / "data" / "train.jsonl", n=48)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "ui", "--workspace", str(ws), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = None
    deadline = time.monotonic() + 180
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r"open (http://127\.0\.0\.1:\d+/\?token=\S+)", line)
        url = found.group(1) if found else None
    assert url is not None, "tuneforge ui did not print its URL"
    base = url.split("/?")[0]
    while time.monotonic() < deadline:  # uvicorn binds a moment after the print
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield url, base, ws
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    pid = ui_state.pop("serve_pid", None)
    if pid is not None:  # the page's chat server stopped with the page
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def fill(page, values: dict[str, str]) -> None:
    for name, value in values.items():
        field = page.locator(f'[name="{name}"]')
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)


def test_the_whole_loop_in_chromium(ui_server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is needed: apt-get install -y chromium"
    url, base, ws = ui_server
    shots = Path(os.environ.get("TUNEFORGE_UI_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 860})

        # without the token: refused
        response = page.goto(base + "/runs")
        assert response.status == 401 and "token" in page.content()
        # with it: in, and the token is gone from the address bar
        response = page.goto(url)
        assert response.status == 200 and page.url == base + "/runs"

        # a wrong value is named inline by its key
        page.goto(base + "/new")
        config = {
            "model.name": "models/tiny",
            "model.dtype": "fp32",
            "method.name": "lora",
            "method:lora:method.r": "4",
            "data.train": "data/train.jsonl",
            "data.validation": "0.125",
            "data.max_length": "64",
            "train.max_steps": "120",
            "train.batch_size": "4",
            "train.lr": "fast",
            "train.num_threads": "1",
            "eval.every_steps": "40",
            "checkpoint.every_steps": "null",
            "output.dir": "runs/browser",
            "config_name": "browser",
        }
        fill(page, config)
        page.click("#launch")
        error = page.locator('.error[data-key="train.lr"]')
        assert error.inner_text().startswith("train.lr: Input should be a valid number")
        page.locator("#f-train\\.lr").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "new-run-error.png"))

        # the data picker browses the workspace and refuses to leave it
        page.click('button.browse[data-target="f-data.train"]')
        page.wait_for_selector("#picker-list li")
        assert "train.jsonl" in page.locator("#picker-list").inner_text()
        traversal = page.request.get(base + "/api/files?dir=../")
        assert traversal.status == 400 and "refused" in traversal.json()["error"]
        assert page.request.get(base + "/api/files?dir=/etc").status == 400

        # fixed: the run launches and its loss curve grows while it runs
        fill(page, {"train.lr": "0.005"})
        page.click("#launch")
        page.wait_for_url(re.compile(r"/run\?dir=runs/browser"))
        chart = page.locator("#chart-loss")
        seen: list[int] = []
        while len(set(seen)) < 3:
            state = page.locator("#state").inner_text()
            if state in ("finished", "failed"):
                break
            points = int(chart.get_attribute("data-points") or 0)
            if state == "running" and points > 0:
                seen.append(points)
            # the next look when the curve or the state changes, not after a fixed wait
            page.wait_for_function(CHANGED, arg=[points, state], timeout=300_000)
        assert len(set(seen)) >= 2 and seen == sorted(seen), f"points seen while running: {seen}"
        page.screenshot(path=str(shots / "run-live.png"))
        page.wait_for_selector("#state.finished", timeout=300_000)
        page.wait_for_selector("#summary")
        # after the reload the finished run's curve is rebuilt from the whole file
        page.wait_for_function("+document.querySelector('#chart-loss').dataset.points >= 120")
        page.screenshot(path=str(shots / "run-finished.png"), full_page=True)

        # the report opens
        page.click("#report")
        page.wait_for_load_state()
        assert "/run/report" in page.url and page.locator("img").count() >= 1
        page.screenshot(path=str(shots / "report.png"))

        # the other pages render for this run
        for name, path, shows in [
            ("runs", "/runs", "#runs .state.finished"),
            ("data", "/data?config=configs/browser.yaml", "#example mark"),
            ("compare", "/compare?runs=runs/browser", "#compare-table"),
            ("export", "/export?dir=runs/browser", "h2"),
        ]:
            assert page.goto(base + path).status == 200, path
            page.wait_for_selector(shows)
            if name == "compare":
                page.wait_for_function("+document.querySelector('#cmp-loss').dataset.points >= 120")
            page.screenshot(path=str(shots / f"{name}.png"))

        chat_and_rate(page, base, ws, shots)
        ui_state["serve_pid"] = json.loads((ws / ".tuneforge-ui" / "serve.json").read_text())["pid"]
        browser.close()


def chat_and_rate(page, base: str, ws: Path, shots: Path) -> None:
    """Chat with the finished run through the page's `tuneforge serve`, rate the answer, and
    find the rating in the run's feedback store (real SQLite, read back with FeedbackStore)."""
    from tuneforge.feedback import FeedbackStore

    page.goto(base + "/chat?target=runs/browser")
    started = time.monotonic()
    page.click("#chat-start")
    page.wait_for_selector("#chat-status.ready", timeout=300_000)
    start_s = time.monotonic() - started
    assert page.locator("#chat-model").inner_text() == "browser"
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "Color of sky?")
    started = time.monotonic()
    page.click("#chat-send")
    answer = page.locator(".turn.assistant").first
    page.wait_for_selector(".turn.assistant .rate:not([hidden])", timeout=60_000)
    answer_s = time.monotonic() - started
    rid, text = answer.get_attribute("data-response-id"), answer.locator(".text").inner_text()
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", rid or "") and text, (rid, text)
    answer.locator(".correction").fill("blue")
    answer.locator(".thumb.up").click()
    page.wait_for_selector(".rate-result.stored, .rate-result.failed")
    assert answer.locator(".rate-result").inner_text().startswith("stored (feedback #1")
    page.screenshot(path=str(shots / "chat.png"))

    store = FeedbackStore(f"sqlite:///{ws / 'runs/browser/serve/feedback.sqlite'}", create=False)
    try:
        rows = [
            (f["response_id"], f["rating"], f["scale"], f["correction"]) for f in store.feedback()
        ]
        assert rows == [(rid, 1, "thumbs", "blue")]
        served = store.get_response(rid)
        assert served["request"]["messages"] == [{"role": "user", "content": "Color of sky?"}]
        assert served["request"]["max_tokens"] == 8 and served["completion"]
    finally:
        store.close()

    page.goto(base + "/feedback?target=runs/browser")
    dashboard = page.frame_locator("#dashboard")
    dashboard.locator("text=Latest feedback").wait_for(timeout=60_000)
    assert "1 ratings, 1 corrections" in dashboard.locator("body").inner_text()
    assert dashboard.locator("img").count() == 3
    page.screenshot(path=str(shots / "feedback.png"), full_page=True)
    print(f"\nchat: serve ready {start_s:.1f} s after Start, answer in {answer_s:.2f} s")

"""Limits and bad input: a burst beyond the queue gets 429 (never 5xx) and the server keeps serving,
a client that leaves mid-stream stops its generation, the timeout answers 503, hand-written bad
requests get OpenAI error JSON naming the field, and a bounded schemathesis run finds no 5xx.

The engine here is the tiny base model slowed by a forward hook, so that queues really fill.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from serve_helpers import AUTH, KEY, LiveServer, openai_client
from tuneforge.serve.app import create_app
from tuneforge.serve.auth import ApiKeys
from tuneforge.serve.engines.hf import TransformersEngine
from tuneforge.serve.limits import Limits
from tuneforge.serve.records import JsonlRecordSink

LONG = {"max_tokens": 48, "temperature": 0}


class SlowForward:
    """A forward pre-hook that counts model calls and makes each take `delay_s` longer."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.calls = delay_s, 0

    def __call__(self, module, args, kwargs) -> None:
        self.calls += 1
        time.sleep(self.delay_s)


def slow_app(model_dir, tmp, delay_s: float, limits: Limits, **batching):
    engine = TransformersEngine.open(model_dir, name="tiny", dtype="fp32", **batching)
    hook = SlowForward(delay_s)
    engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    sink = JsonlRecordSink(tmp / "records.jsonl")
    app = create_app(engine, keys=ApiKeys([KEY]), sink=sink, limits=limits)
    app.state.hook = hook
    return app


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def busy(tiny_model_dir, tmp_path_factory, one_thread):
    """One request at a time, one waiting: anything more is turned away."""
    limits = Limits(max_tokens_cap=64, request_timeout_s=60)
    app = slow_app(
        tiny_model_dir, tmp_path_factory.mktemp("busy"), 0.01, limits, max_batch=1, max_queue=1
    )
    with LiveServer(app) as live:
        live.app = app
        yield live


def long_chat(client, content: str = "Color of sky?", **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **(LONG | kw)
    )


def test_the_prompt_used_here_runs_to_max_tokens(busy):
    resp = long_chat(openai_client(busy))
    assert resp.usage.completion_tokens == LONG["max_tokens"]  # the load below depends on it


def test_a_burst_beyond_the_queue_gets_429_and_the_server_keeps_serving(busy):
    start = threading.Barrier(10)

    def one(i: int) -> str:
        client = openai_client(busy)
        start.wait()
        try:
            long_chat(client, max_tokens=24)
            return "ok"
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] == "1"
            assert e.body["type"] == "rate_limit_error"
            return "429"

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(one, range(10)))  # anything else (a 5xx) raises here
    assert outcomes.count("429") >= 5 and outcomes.count("ok") >= 1, outcomes
    assert long_chat(openai_client(busy)).choices[0].finish_reason == "length"


def test_a_client_that_leaves_mid_stream_stops_its_generation(busy):
    hook, sink = busy.app.state.hook, busy.app.state.sink
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Color of sky?"}]}
    with httpx.stream(
        "POST",
        busy.url + "/v1/chat/completions",
        json=body | LONG | {"max_tokens": 64, "stream": True},
        headers=AUTH,
        timeout=30,
    ) as r:
        for line in r.iter_lines():  # past the role chunk, up to the first text
            if '"content": "' in line and '"content": ""' not in line:
                break
        calls_at_leave = hook.calls
    wait_for(lambda: any(rec.status == 499 for rec in sink.read()))
    settled = hook.calls
    time.sleep(0.5)
    assert hook.calls == settled  # nothing runs for the departed client
    assert settled - calls_at_leave < 40  # it stopped long before its 64 tokens
    gone = [rec for rec in sink.read() if rec.status == 499]
    assert gone[-1].finish_reason == "cancelled"


def test_a_request_over_its_time_gets_503_and_is_cancelled(tiny_model_dir, tmp_path):
    limits = Limits(max_tokens_cap=64, request_timeout_s=0.4)
    app = slow_app(tiny_model_dir, tmp_path, 0.05, limits, max_batch=2, max_queue=4)
    with LiveServer(app) as live:
        client = openai_client(live)
        with pytest.raises(openai.InternalServerError) as err:
            long_chat(client)
        assert err.value.status_code == 503 and err.value.body["code"] == "timeout"
        assert err.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.APIError, match="did not finish"):
            list(long_chat(client, stream=True))
        calls = app.state.hook.calls
        time.sleep(0.3)
        assert app.state.hook.calls - calls <= 1  # the timed-out jobs were dropped
        statuses = [rec.status for rec in app.state.sink.read()]
    assert statuses == [503, 503]


# ---- hand-written bad requests ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_app(tiny_model_dir, tmp_path_factory, one_thread):
    engine = TransformersEngine.open(tiny_model_dir, name="tiny", dtype="fp32", max_batch=4)
    sink = JsonlRecordSink(tmp_path_factory.mktemp("fast") / "records.jsonl")
    limits = Limits(max_tokens_cap=8, max_body_bytes=64 * 1024)
    return create_app(engine, keys=ApiKeys([KEY]), sink=sink, limits=limits)


@pytest.fixture(scope="module")
def http(fast_app):
    with TestClient(fast_app, base_url="http://127.0.0.1") as c:
        yield c


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize(
    "change, param",
    [
        ({"model": 5}, "model"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"seed": 2**70}, "seed"),
    ],
)
def test_a_bad_field_is_named_in_a_400(http, change, param):
    r = http.post("/v1/chat/completions", json=GOOD | change, headers=AUTH)
    assert_openai_error(r, 400, param)


def test_bad_bodies_get_json_errors(http):
    post = lambda content, **h: http.post(  # noqa: E731
        "/v1/chat/completions",
        content=content,
        headers=AUTH | {"content-type": "application/json"} | h,
    )
    assert "not valid JSON" in assert_openai_error(post(b'{"model": '), 400)["message"]
    assert_openai_error(post(b'{"model": "\xff\xfe"}'), 400)
    assert_openai_error(post(b"[]"), 400)
    assert_openai_error(post(b"x" * (10 << 20)), 413)  # declared Content-Length
    chunked = (b"y" * 65536 for _ in range(160))  # 10 MB without a Content-Length
    assert_openai_error(post(chunked), 413)
    assert_openai_error(
        http.post("/v1/chat/completions", json=GOOD | {"model": "nope"}, headers=AUTH), 404, "model"
    )
    assert_openai_error(http.get("/v1/chat/completions", headers=AUTH), 405)
    assert_openai_error(http.get("/v1/nothing", headers=AUTH), 404)
    ok = http.post("/v1/chat/completions", json=GOOD | {"frobnicate": 1}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_without_the_key_nothing_happens(http, fast_app):
    sink = fast_app.state.sink
    before = len(sink.read())
    for headers in (
        {},
        {"Authorization": "Bearer wrong-but-long-enough-key"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ):
        r = http.post("/v1/chat/completions", json=GOOD, headers=headers)
        error = assert_openai_error(r, 401)
        assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert "wrong-but" not in r.text and KEY not in r.text
    assert_openai_error(http.post("/v1/chat/completions", content=b"{bad"), 401)  # key before body
    assert_openai_error(http.get("/v1/models"), 401)
    assert_openai_error(http.get("/openapi.json"), 401)
    assert_openai_error(http.get("/v1/anything"), 401)  # no route list for strangers
    assert len(sink.read()) == before  # no record, no generation
    assert http.get("/health").status_code == 200


# ---- schemathesis against the app's own OpenAPI schema --------------------------------------------


def test_fuzzed_requests_never_get_a_5xx(fast_app, http):
    """Every operation of /openapi.json, 20 generated cases each (bounded, in-process)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fast_app, headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    seen: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def no_server_error(case) -> None:
            response = case.call(headers=AUTH)
            seen.append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                error = json.loads(response.text)["error"]
                assert error["message"] and error["type"]

        no_server_error()
    assert 200 in seen and any(400 <= s < 500 for s in seen)

"""The vllm engine on CPU: tuneforge's app in front of an OpenAI-compatible upstream that gets token
ids. The upstream stand-in is tuneforge's own transformers server on the tiny random model, so every
answer through the vllm engine is checked against the direct server and `tuneforge generate`.

Also: the child-process command lines, what vLLM cannot serve, the child's start/health/stop on a
stand-in child, and (GPU only, bench/gpu_check.sh) a real vLLM against the transformers engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from serve_helpers import (
    AUTH,
    KEY,
    LiveServer,
    chat,
    free_port,
    keyed_app,
    metric_value,
    openai_client,
    reference_models,
    two_distinct_runs,
)
from tuneforge.data.templates import render_prompt
from tuneforge.errors import ServeError, UsageError
from tuneforge.loading import generate, load_reference, run_base_dir
from tuneforge.serve.app import create_app
from tuneforge.serve.auth import ApiKeys
from tuneforge.serve.engines import QueueFull, SamplingParams
from tuneforge.serve.engines.base import Failed, Finished, Job
from tuneforge.serve.engines.hf import TransformersEngine
from tuneforge.serve.engines.vllm import VllmEngine
from tuneforge.serve.engines.vllm_launch import (
    BASE_NAME,
    VllmChild,
    child_command,
    start_child,
    vllm_inputs,
)
from tuneforge.serve.engines.vllm_upstream import (
    MIN_TOP_P,
    StreamReader,
    request_body,
    upstream_url,
)
from tuneforge.serve.records import JsonlRecordSink

UPSTREAM_KEY = "upstream-key-0123456789abcdef"
PROMPTS = [
    "Color of sky?",
    "apple fox Color of rose?",
    "hi",
    "What is two plus two? Tell me now.",
    "book night snow Color of grass?",
    "x",
]


class Delay:
    """A forward pre-hook on the stand-in: counts model calls, each `delay_s` slower (0: off)."""

    def __init__(self) -> None:
        self.delay_s, self.calls = 0.0, 0

    def __call__(self, module, args, kwargs) -> None:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)


def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def standin_app(run_a: Path, run_b: Path | None, sink_path: Path, name: str | None = None):
    """tuneforge's transformers server, which takes token-id prompts as vLLM's does."""
    adapters = [("tiny-b", run_b)] if run_b else []
    engine = TransformersEngine.open(
        run_a, name=name, adapters=adapters, dtype="fp32", max_batch=8, max_queue=32, wait_s=0.05
    )
    hook = Delay()
    engine.model.register_forward_pre_hook(hook, with_kwargs=True)
    app, sink = keyed_app(engine, sink_path, key=UPSTREAM_KEY)
    return app, engine, hook, sink


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, one_thread):
    return two_distinct_runs(tmp_path_factory.mktemp("vllm-runs"), tiny_model_dir)


@pytest.fixture(scope="module")
def refs(runs):
    return reference_models(runs)


@pytest.fixture(scope="module")
def standin(runs, tmp_path_factory):
    app, engine, hook, sink = standin_app(*runs, tmp_path_factory.mktemp("up") / "records.jsonl")
    with LiveServer(app) as live:
        live.engine, live.hook, live.sink = engine, hook, sink
        yield live


@pytest.fixture(scope="module")
def front(runs, standin, tmp_path_factory):
    a, b = runs
    engine = VllmEngine.open(
        a,
        adapters=[("tiny-b", b)],
        upstream=standin.url + "/v1",
        upstream_key=UPSTREAM_KEY,
        max_batch=4,
        max_queue=8,
    )
    app, sink = keyed_app(engine, tmp_path_factory.mktemp("front") / "records.jsonl")
    with LiveServer(app) as live:
        live.engine, live.sink = engine, sink
        yield live


@pytest.fixture(scope="module")
def client(front):
    return openai_client(front)


@pytest.fixture(scope="module")
def direct(standin):
    return openai_client(standin, key=UPSTREAM_KEY)


# ---- answers through the vllm engine -----------------------------------------------------------


def test_the_names_and_the_keys_are_tuneforges(front, client):
    assert [m.id for m in client.models.list().data] == ["tiny-a", "tiny-b"]
    assert front.engine.kind == "vllm" and front.engine.context_length == 256
    assert httpx.get(front.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(front, key="wrong-key-abcdefghijklmnop"), "tiny-a", "hi")
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(front.url + "/v1/chat/completions", json=body).status_code == 401


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_greedy_chat_equals_generate_and_the_direct_server(client, direct, refs, model):
    loaded = refs[model]
    resp = chat(client, model, PROMPTS[0])
    same = chat(direct, model, PROMPTS[0])
    assert resp.choices[0].message.content == generate(loaded, PROMPTS[0], max_new_tokens=24)
    assert resp.choices[0].message.content == same.choices[0].message.content
    ids = render_prompt(loaded.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    assert resp.usage.prompt_tokens == len(ids) == same.usage.prompt_tokens
    assert resp.usage.completion_tokens == same.usage.completion_tokens > 0
    assert resp.choices[0].finish_reason == same.choices[0].finish_reason
    assert resp.id.startswith("chatcmpl-") and resp.id != same.id


def test_the_adapters_answer_differently_by_name(client, refs):
    a, b = (chat(client, m, PROMPTS[1]).choices[0].message.content for m in ("tiny-a", "tiny-b"))
    assert a == generate(refs["tiny-a"], PROMPTS[1], max_new_tokens=24)
    assert b == generate(refs["tiny-b"], PROMPTS[1], max_new_tokens=24)
    assert a != b


def test_a_stream_joins_to_the_whole_answer_with_the_upstream_usage(client, direct):
    whole = chat(client, "tiny-b", PROMPTS[3])
    kw = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = list(chat(client, "tiny-b", PROMPTS[3], **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    direct_usage = list(chat(direct, "tiny-b", PROMPTS[3], **kw))[-1].usage
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == direct_usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == direct_usage.prompt_tokens


def test_text_completions_stops_and_seeds_reach_the_upstream(client, direct):
    kw = {"model": "tiny-b", "prompt": "Color of", "max_tokens": 8, "temperature": 0}
    resp, same = client.completions.create(**kw), direct.completions.create(**kw)
    assert resp.choices[0].text == same.choices[0].text
    assert resp.usage.prompt_tokens == same.usage.prompt_tokens and resp.id.startswith("cmpl-")
    streamed = client.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == same.choices[0].text
    full = chat(client, "tiny-a", PROMPTS[4], max_tokens=40).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = chat(client, "tiny-a", PROMPTS[4], max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 16}
    one = chat(client, "tiny-a", PROMPTS[2], **seeded).choices[0].message.content
    assert one == chat(direct, "tiny-a", PROMPTS[2], **seeded).choices[0].message.content
    other = chat(client, "tiny-a", PROMPTS[2], **seeded | {"seed": 99}).choices[0].message.content
    assert one != other  # the seed really travelled


def test_our_completions_route_takes_token_id_prompts(standin, refs):
    tok = refs["tiny-b"].tokenizer
    ids = tok("Color of")["input_ids"]
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    url = standin.url + "/v1/completions"
    base = {"model": "tiny-b", "max_tokens": 8, "temperature": 0}
    by_text = httpx.post(url, json=base | {"prompt": "Color of"}, headers=headers).json()
    by_ids = httpx.post(url, json=base | {"prompt": ids}, headers=headers).json()
    nested = httpx.post(url, json=base | {"prompt": [ids]}, headers=headers).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert nested["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    record = next(r for r in standin.sink.read() if r.id == by_ids["id"])
    assert record.prompt == tok.decode(ids) and record.request["prompt"] == ids
    bad = httpx.post(url, json=base | {"prompt": [5, 300]}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert "300" in bad.json()["error"]["message"]
    for prompt in ([[]], [[1], [2]], [-1], [True]):
        refused = httpx.post(url, json=base | {"prompt": prompt}, headers=headers)
        assert refused.status_code == 400, prompt


def test_parallel_requests_reach_the_upstream_together(client, front, standin):
    sequential = [
        chat(client, "tiny-a", p, max_tokens=32).choices[0].message.content for p in PROMPTS
    ]
    before = httpx.get(
        standin.url + "/metrics", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}
    )

    def streamed(prompt: str) -> str:
        chunks = chat(client, "tiny-a", prompt, max_tokens=32, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        parallel = list(pool.map(streamed, PROMPTS))
    assert parallel == sequential
    after = httpx.get(standin.url + "/metrics", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
    name, one = "tuneforge_batch_size_count", 'tuneforge_batch_size_bucket{le="1.0"}'
    batches = metric_value(after.text, name) - metric_value(before.text, name)
    singles = metric_value(after.text, one) - metric_value(before.text, one)
    assert singles < batches  # the upstream ran several of them in one batch: none was serialised
    ours = httpx.get(front.url + "/metrics", headers=AUTH).text
    assert metric_value(ours, "tuneforge_batch_size_count") > metric_value(ours, one)


def test_a_client_that_leaves_cancels_the_upstream_request(front, standin):
    body = {
        "model": "tiny-a",
        "messages": [{"role": "user", "content": PROMPTS[4]}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": True,
    }
    upstream_before, front_before = len(standin.sink.read()), len(front.sink.read())
    standin.hook.delay_s = 0.3  # 40 tokens would take 12 s
    try:
        with httpx.stream(
            "POST", front.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"
                ):
                    break  # the first text: leave now
        wait_for(lambda: [x.status for x in standin.sink.read()[upstream_before:]] == [499])
        calls = standin.hook.calls
        time.sleep(1.0)
        assert standin.hook.calls - calls <= 1  # the upstream stopped generating
    finally:
        standin.hook.delay_s = 0.0
    cancelled = standin.sink.read()[upstream_before]
    assert cancelled.route == "/v1/completions" and cancelled.finish_reason == "cancelled"
    wait_for(lambda: [x.status for x in front.sink.read()[front_before:]] == [499])
    wait_for(lambda: front.engine.queue_depth() == 0 and not standin.engine.batcher.running)


def test_every_answer_is_recorded_under_its_response_id(client, front, refs, runs):
    resp = chat(client, "tiny-b", PROMPTS[5])
    record = next(r for r in front.sink.read() if r.id == resp.id)
    ids = render_prompt(refs["tiny-b"].tokenizer, [{"role": "user", "content": PROMPTS[5]}])
    assert record.model == "tiny-b" and record.adapter == str(runs[1])
    assert record.prompt == refs["tiny-b"].tokenizer.decode(ids)
    assert record.completion == resp.choices[0].message.content
    assert (record.status, record.error) == (200, None)
    assert record.prompt_tokens == resp.usage.prompt_tokens == len(ids)
    assert record.completion_tokens == resp.usage.completion_tokens
    assert 0 < record.ttft_s <= record.latency_s


def test_an_upstream_that_goes_down_is_a_503_and_the_server_keeps_serving(runs, standin, tmp_path):
    a, _ = runs
    app, *_ = standin_app(a, None, tmp_path / "gone.jsonl", name="tiny-gone")
    with LiveServer(app) as gone:
        gone_engine = VllmEngine.open(
            a, name="tiny-gone", upstream=gone.url, upstream_key=UPSTREAM_KEY
        )
    live_engine = VllmEngine.open(a, upstream=standin.url, upstream_key=UPSTREAM_KEY)
    sink = JsonlRecordSink(tmp_path / "front.jsonl")
    app = create_app([gone_engine, live_engine], keys=ApiKeys([KEY]), sink=sink)
    with LiveServer(app) as server:
        body = {"model": "tiny-gone", "messages": [{"role": "user", "content": "hi"}]}
        for stream in (False, True):
            r = httpx.post(
                server.url + "/v1/chat/completions", json=body | {"stream": stream}, headers=AUTH
            )
            text = r.text
            assert "Traceback" not in text and "127.0.0.1" not in text
            if stream:  # the status line went out before the failure: an SSE error event
                error = json.loads(text.split("data: ")[2])["error"]
            else:
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                error = r.json()["error"]
            assert error["type"] == "server_error" and "unavailable" in error["message"]
        ok = chat(openai_client(server), "tiny-a", PROMPTS[0])
        assert ok.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [r.status for r in sink.read()][:2] == [503, 503]


def test_the_cli_fronts_an_upstream_and_stops_cleanly(runs, standin, refs, tmp_path):
    """`tuneforge serve RUN --engine vllm --upstream URL` as a process: it answers, then exits 0."""
    (tmp_path / "keys").write_text(KEY + "\n")
    (tmp_path / "upstream-key").write_text("# the stand-in's\n" + UPSTREAM_KEY + "\n")
    port = free_port()
    cmd = [
        sys.executable, "-m", "tuneforge.cli", "serve", str(runs[0]), "--engine", "vllm",
        "--upstream", standin.url, "--upstream-key-file", str(tmp_path / "upstream-key"),
        "--api-key-file", str(tmp_path / "keys"), "--port", str(port),
        "--db", f"sqlite:///{tmp_path / 'feedback.sqlite'}",  # not beside the shared run
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s=90)
        body = {"model": "tiny-a", "messages": [{"role": "user", "content": PROMPTS[0]}]}
        r = httpx.post(url + "/v1/chat/completions", json=body | {"max_tokens": 24, "temperature": 0},
                       headers=AUTH, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        expected = generate(refs["tiny-a"], PROMPTS[0], max_new_tokens=24)
        assert r.json()["choices"][0]["message"]["content"] == expected
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0, log.read_text()[-3000:]
    assert "vllm engine" in log.read_text() and "Traceback" not in log.read_text()


def test_a_full_engine_answers_queue_full(runs, standin):
    engine = VllmEngine.open(
        runs[0], upstream=standin.url, upstream_key=UPSTREAM_KEY, max_batch=1, max_queue=1
    )
    events: list = []
    ids = engine.render_chat("tiny-a", [{"role": "user", "content": "hi"}])[1]
    jobs = [Job("tiny-a", ids, SamplingParams(40, 0.0), events.append) for _ in range(3)]
    standin.hook.delay_s = 0.2
    try:
        engine.submit(jobs[0])
        engine.submit(jobs[1])
        with pytest.raises(QueueFull):
            engine.submit(jobs[2])
        for job in jobs[:2]:
            job.cancel()
        wait_for(lambda: not engine._in_flight)
        engine.submit(jobs[2])  # room again once the two are gone
        jobs[2].cancel()
    finally:
        standin.hook.delay_s = 0.0
        engine.shutdown(5)
    assert not any(isinstance(e, Finished) for e in events)


def test_opening_names_what_is_wrong_with_the_upstream(runs, standin):
    a, b = runs
    with pytest.raises(ServeError, match=r"--upstream http://127.0.0.1:1: cannot reach"):
        VllmEngine.open(a, upstream="http://127.0.0.1:1")
    with pytest.raises(ServeError, match="answered 401.*--upstream-key-file"):
        VllmEngine.open(a, upstream=standin.url, upstream_key="not-the-key-0123456789")
    with pytest.raises(ServeError, match=r"does not serve 'legal'.*--lora-modules legal="):
        VllmEngine.open(a, adapters=[("legal", b)], upstream=standin.url, upstream_key=UPSTREAM_KEY)
    with pytest.raises(UsageError, match="expected http://HOST:PORT"):
        upstream_url("ftp://x")
    assert upstream_url("http://lb:8000/v1/") == "http://lb:8000"


# ---- pure pieces -------------------------------------------------------------------------------


def test_the_request_body_pins_what_vllm_would_default():
    body = request_body("m", [1, 2], SamplingParams(7, 0.0, 0.0, ("\n",), 2**64 - 1), {3, 2})
    assert body["prompt"] == [1, 2] and body["max_tokens"] == 7 and body["stream"] is True
    assert body["top_p"] == MIN_TOP_P and body["temperature"] == 0.0 and body["stop"] == ["\n"]
    assert body["seed"] == (2**64 - 1) % 2**63 and body["stop_token_ids"] == [2, 3]
    assert (body["top_k"], body["repetition_penalty"], body["min_p"]) == (-1, 1.0, 0.0)
    assert body["stream_options"] == {"include_usage": True}
    assert "seed" not in request_body("m", [1], SamplingParams(1), ())


def _read(lines: list[str]) -> tuple[list[str], StreamReader]:
    reader = StreamReader(prompt_tokens=5)
    return [reader.feed(line) for line in lines], reader


def _chunk(text: str, finish=None, usage=None) -> str:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    return "data: " + json.dumps(body | ({"usage": usage} if usage else {}))


def test_the_stream_reader_maps_vllm_chunks_to_events():
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    texts, reader = _read(
        [_chunk("He"), "", ": keep-alive", _chunk("llo", "length"),
         'data: {"choices": [], "usage": ' + json.dumps(usage) + "}", "data: [DONE]"]
    )  # fmt: skip
    assert texts == ["He", "", "", "llo", "", ""]
    assert reader.result() == Finished("length", "Hello", 5, 3)
    assert _read([_chunk("a", "stop"), "data: [DONE]"])[1].result() == Finished("stop", "a", 5, 1)
    for lines, words in [
        ([_chunk("a", "abort"), "data: [DONE]"], "finish_reason 'abort'"),
        ([_chunk("a")], "closed the stream"),
        (['data: {"error": {"message": "CUDA out of memory"}}'], "CUDA out of memory"),
    ]:
        failed = _read(lines)[1].result()
        assert isinstance(failed, Failed) and failed.status == 502 and words in failed.message


# ---- what vLLM is started on -------------------------------------------------------------------


def test_the_child_command_for_a_merged_dir(tiny_model_dir):
    inputs = vllm_inputs(str(tiny_model_dir), [], "tiny")
    cmd = child_command(
        inputs, port=8123, max_num_seqs=16, dtype="bf16", extra_args=["--enforce-eager"]
    )
    assert cmd == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir), "--tokenizer", str(tiny_model_dir),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "8123",
        "--dtype", "bfloat16", "--max-num-seqs", "16", "--enforce-eager",
    ]  # fmt: skip


def test_the_child_command_for_a_base_and_lora_runs(runs, tiny_model_dir):
    a, b = runs
    inputs = vllm_inputs(str(a), [("tiny-b", str(b))], "tiny-a")
    assert [(s.name, s.upstream, s.adapter_dir) for s in inputs.served] == [
        ("tiny-a", "tiny-a", a / "adapter"),
        ("tiny-b", "tiny-b", b / "adapter"),
    ]
    base = run_base_dir(a)  # the manifest's base: the tiny model the runs were trained on
    assert base.resolve() == tiny_model_dir.resolve()
    cmd = child_command(inputs, port=9000, max_num_seqs=8)
    assert cmd == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base), "--tokenizer", str(a / "tokenizer"),
        "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", "9000",
        "--dtype", "auto", "--max-num-seqs", "8",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"tiny-a={a / 'adapter'}", f"tiny-b={b / 'adapter'}",
    ]  # fmt: skip


def test_what_vllm_cannot_serve_is_refused_with_what_to_do(runs, tmp_path):
    a, _ = runs
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ServeError, match=r"is a GGUF file.*--format merged"):
        vllm_inputs(str(gguf), [], "m")
    for patch, kind in [({"peft_type": "IA3"}, "IA3"), ({"use_dora": True}, "DoRA")]:
        run = tmp_path / kind
        shutil.copytree(a, run)
        config = run / "adapter" / "adapter_config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | patch))
        with pytest.raises(
            ServeError,
            match=rf"the adapter of {run} is {kind}; vLLM attaches plain LoRA.*--format merged",
        ):
            vllm_inputs(str(run), [], "x")
        with pytest.raises(
            ServeError, match=rf"--adapter x={run}: the adapter of {run} is {kind};"
        ):
            vllm_inputs(str(a), [("x", str(run))], "a")


def test_without_vllm_installed_the_error_says_how_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec("vllm") is None, as without it
    with pytest.raises(ServeError) as err:
        VllmEngine.open(tiny_model_dir, name="tiny")
    assert "pip install 'tuneforge[vllm]'" in str(err.value) and "--upstream" in str(err.value)
    if importlib.util.find_spec("vllm") is None:  # the dev venv: the same without the patch
        monkeypatch.delitem(sys.modules, "vllm")
        with pytest.raises(ServeError, match=r"pip install 'tuneforge\[vllm\]'"):
            VllmEngine.open(tiny_model_dir, name="tiny")


def test_a_child_that_dies_or_hangs_is_reported_with_its_last_lines(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    dies = [
        sys.executable,
        "-c",
        "import sys; print('loading', flush=True); sys.exit('CUDA out of memory')",
    ]
    with pytest.raises(ServeError, match=r"exited with code 1 before it was ready") as err:
        start_child(dies, url, "k" * 20, device="cpu", timeout_s=30)
    assert "  loading\n  CUDA out of memory" in str(err.value)
    hangs = [sys.executable, "-c", "import time; print('compiling', flush=True); time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(ServeError, match=r"did not answer .*/health within 1 s.*\n  compiling"):
        start_child(hangs, url, "k" * 20, device="cpu", timeout_s=1)
    assert time.monotonic() - started < 15


def test_a_child_that_ignores_sigterm_is_killed(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    child = VllmChild([sys.executable, "-c", code], dict(os.environ))
    wait_for(lambda: list(child.tail) == ["up"])
    child.stop(timeout_s=0.5)
    assert child.proc.returncode == -signal.SIGKILL


def test_the_child_mode_starts_serves_and_stops_its_server(
    tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    """The whole child lifecycle, with tuneforge's own server standing in for vLLM's."""
    import tuneforge.serve.engines.vllm as vllm_engine

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)  # the child writes its records beside the model
    seen = {}

    def standin_command(inputs, *, port, max_num_seqs, dtype, extra_args):
        seen.update(name=inputs.base_name, port=port, max_num_seqs=max_num_seqs)
        return [
            sys.executable, "-m", "tuneforge.cli", "serve", str(inputs.model_dir),
            "--name", inputs.base_name, "--port", str(port), "--dtype", "fp32", "--threads", "1",
        ]  # fmt: skip

    monkeypatch.setattr(vllm_engine, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_engine, "child_command", standin_command)
    engine = VllmEngine.open(model, name="tiny", max_batch=3, start_timeout_s=120)
    try:
        assert seen == {
            "name": "tiny",
            "port": int(engine.url.rsplit(":", 1)[1]),
            "max_num_seqs": 3,
        }
        events: list = []
        done = threading.Event()
        prompt, ids = engine.render_chat("tiny", [{"role": "user", "content": PROMPTS[0]}])

        def emit(event) -> None:
            events.append(event)
            if isinstance(event, Finished | Failed):
                done.set()

        engine.submit(Job("tiny", ids, SamplingParams(16, 0.0), emit))
        assert done.wait(60)
        expected = generate(load_reference(model, dtype="fp32"), PROMPTS[0], max_new_tokens=16)
        assert isinstance(events[-1], Finished) and events[-1].text == expected
    finally:
        engine.shutdown(5)
    assert engine.child.proc.returncode == 0  # stopped by SIGTERM, cleanly


# ---- a real vLLM (bench/gpu_check.sh) ----------------------------------------------------------

NO_VLLM = (
    "needs the vllm package and a CUDA GPU (pip install 'tuneforge[vllm]'; bench/gpu_check.sh)"
)
HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_real_vllm_answers_a_merged_export_as_the_transformers_engine(tmp_path, tiny_tokenizer):
    from conftest import build_tiny_llama

    model_dir = tmp_path / "merged"  # what `export --format merged` writes: an HF dir + tokenizer
    model = build_tiny_llama(len(tiny_tokenizer), hidden_size=128, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=256)  # fmt: skip
    model.config.eos_token_id = model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    (tmp_path / "keys").write_text(KEY + "\n")
    port = free_port()
    cmd = [
        sys.executable, "-m", "tuneforge.cli", "serve", str(model_dir), "--engine", "vllm",
        "--name", "tiny", "--dtype", "fp32", "--port", str(port), "--api-key-file",
        str(tmp_path / "keys"), "--vllm-args=--enforce-eager --gpu-memory-utilization 0.2",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 400
        while True:
            assert server.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "tuneforge serve --engine vllm did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        loaded = load_reference(model_dir, dtype="fp32", device="cuda")
        for prompt in PROMPTS[:4]:
            body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 16, "temperature": 0}  # fmt: skip
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            assert answer == generate(loaded, prompt, max_new_tokens=16), prompt
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=90)
    assert server.returncode == 0, log.read_text()[-4000:]


def test_the_child_dies_with_a_killed_parent(tmp_path):
    """A tuneforge killed by SIGKILL cannot stop its vLLM child; Linux does (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    parent_code = (
        "import os, sys, time\n"
        "from tuneforge.serve.engines.vllm_launch import VllmChild\n"
        "child = VllmChild([sys.executable, '-c', 'import time; time.sleep(120)'], dict(os.environ))\n"
        "print(child.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        pid = int(parent.stdout.readline())
        stat = Path(f"/proc/{pid}/stat")
        # the wrapper has become the sleeping child (exec): the same pid, now running `sleep`
        wait_for(lambda: "time.sleep(120)" in Path(f"/proc/{pid}/cmdline").read_text())
        assert stat.read_text().split()[2] in "RS"
    finally:
        parent.kill()
        parent.wait()

    def gone() -> bool:
        try:
            return stat.read_text().split()[2] in "ZX"  # dead (a zombie until init reaps it)
        except (FileNotFoundError, ProcessLookupError):
            return True

    wait_for(gone)

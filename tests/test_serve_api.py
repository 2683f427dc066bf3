"""The server through the official openai client on 127.0.0.1: chat, streaming, completions, models,
adapters chosen by name, records, errors as the client's own exception types, batching.

Every expected text is computed independently with `tuneforge.loading` / transformers generate.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from serve_helpers import (
    AUTH,
    LiveServer,
    chat,
    keyed_app,
    metric_value,
    openai_client,
    reference_models,
    two_distinct_runs,
)
from tuneforge.data.templates import render_prompt
from tuneforge.loading import generate
from tuneforge.serve.engines.hf import TransformersEngine

PROMPTS = [
    "Color of sky?",
    "apple fox Color of rose?",
    "hi",
    "What is two plus two? Tell me now.",
    "book night snow Color of grass?",
    "x",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, one_thread):
    return two_distinct_runs(tmp_path_factory.mktemp("serve-runs"), tiny_model_dir)


@pytest.fixture(scope="module")
def refs(runs):
    return reference_models(runs)


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    a, b = runs
    engine = TransformersEngine.open(
        a, adapters=[("tiny-b", b)], dtype="fp32", max_batch=8, max_queue=32, wait_s=0.05
    )
    app, sink = keyed_app(engine, tmp_path_factory.mktemp("records") / "records.jsonl")
    with LiveServer(app) as live:
        live.sink, live.app = sink, app
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def reference_tokens(loaded, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with transformers' own generate, stopping at the tokenizer's EOS."""
    tok = loaded.tokenizer
    x = torch.tensor([ids])
    out = loaded.model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, x.shape[1] :].tolist()


def test_models_lists_the_run_and_each_adapter(client):
    assert [m.id for m in client.models.list().data] == ["tiny-a", "tiny-b"]
    assert client.models.retrieve("tiny-b").id == "tiny-b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_greedy_chat_equals_tuneforge_generate(client, refs, model):
    loaded = refs[model]
    resp = chat(client, model, PROMPTS[0])
    assert resp.choices[0].message.content == generate(loaded, PROMPTS[0], max_new_tokens=24)
    ids = render_prompt(loaded.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    produced = reference_tokens(loaded, ids, 24)
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(produced)
    stopped = produced[-1] == loaded.tokenizer.eos_token_id
    assert resp.choices[0].finish_reason == ("stop" if stopped else "length")
    assert resp.id.startswith("chatcmpl-") and len(resp.id) == len("chatcmpl-") + 32


def test_the_adapter_is_chosen_by_model_name(client, refs):
    a, b = (chat(client, m, PROMPTS[1]).choices[0].message.content for m in ("tiny-a", "tiny-b"))
    assert a == generate(refs["tiny-a"], PROMPTS[1], max_new_tokens=24)
    assert b == generate(refs["tiny-b"], PROMPTS[1], max_new_tokens=24)
    assert a != b  # the two adapters really answer differently


def test_stream_chunks_join_to_the_whole_answer(client):
    whole = chat(client, "tiny-b", PROMPTS[3])
    stream = chat(client, "tiny-b", PROMPTS[3], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body | {"stream": True}, headers=AUTH
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_text_completion_has_no_chat_template(client, refs):
    loaded = refs["tiny-b"]
    resp = client.completions.create(model="tiny-b", prompt="Color of", max_tokens=8, temperature=0)
    ids = loaded.tokenizer("Color of")["input_ids"]
    produced = reference_tokens(loaded, ids, 8)
    expected = loaded.tokenizer.decode(produced, skip_special_tokens=True)
    assert resp.choices[0].text == expected
    assert resp.usage.prompt_tokens == len(ids) and resp.id.startswith("cmpl-")
    streamed = client.completions.create(
        model="tiny-b", prompt="Color of", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_a_stop_string_cuts_the_answer(client):
    full = chat(client, "tiny-a", PROMPTS[4], max_tokens=40).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = chat(client, "tiny-a", PROMPTS[4], max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = chat(client, "tiny-a", PROMPTS[4], max_tokens=40, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]


def test_a_seed_makes_sampling_repeatable(client):
    kw = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 16}
    one, two = (chat(client, "tiny-a", PROMPTS[2], **kw).choices[0].message.content for _ in "12")
    assert one == two


def test_parallel_streams_equal_their_sequential_answers(client, server):
    sequential = [
        chat(client, "tiny-a", p, max_tokens=32).choices[0].message.content for p in PROMPTS
    ]
    before = httpx.get(server.url + "/metrics", headers=AUTH).text

    def streamed(prompt: str) -> str:
        chunks = chat(client, "tiny-a", prompt, max_tokens=32, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        parallel = list(pool.map(streamed, PROMPTS))
    assert parallel == sequential
    after = httpx.get(server.url + "/metrics", headers=AUTH).text
    batches = metric_value(after, "tuneforge_batch_size_count") - metric_value(
        before, "tuneforge_batch_size_count"
    )
    singles = metric_value(after, 'tuneforge_batch_size_bucket{le="1.0"}') - metric_value(
        before, 'tuneforge_batch_size_bucket{le="1.0"}'
    )
    assert batches < len(PROMPTS) and singles < batches  # at least one batch held several


def test_errors_are_the_clients_own_exception_types(server, client):
    with pytest.raises(openai.AuthenticationError) as err:
        openai_client(server, key="wrong-key-abcdefghijklmnop").models.list()
    assert "wrong-key" not in err.value.response.text
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, "no-such-model", "hi")
    assert err.value.body["param"] == "model"
    for kw, param in [
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 3}, "n"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "tiny-a", "hi", **kw)
        assert (
            err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
        )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-a", messages=[])
    assert err.value.body["param"] == "messages"


def test_a_prompt_over_the_context_is_refused_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "tiny-a", "Color of sky? " * 60, max_tokens=8)
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, "tiny-a", "Color of sky? " * 14, max_tokens=64)  # fits alone, not with 64
    assert err.value.body["param"] == "max_tokens"


def test_every_answer_is_recorded_under_its_response_id(client, server, refs, runs):
    resp = chat(client, "tiny-b", PROMPTS[5])
    record = next(r for r in server.sink.read() if r.id == resp.id)
    ids = render_prompt(refs["tiny-b"].tokenizer, [{"role": "user", "content": PROMPTS[5]}])
    assert record.model == "tiny-b" and record.adapter == str(runs[1])
    assert record.prompt == refs["tiny-b"].tokenizer.decode(ids)
    assert record.completion == resp.choices[0].message.content
    assert (record.status, record.error, record.finish_reason) == (
        200,
        None,
        resp.choices[0].finish_reason,
    )
    assert record.prompt_tokens == resp.usage.prompt_tokens
    assert record.completion_tokens == resp.usage.completion_tokens
    assert record.request["messages"][0]["content"] == PROMPTS[5]
    assert 0 < record.ttft_s <= record.latency_s
    with pytest.raises(openai.NotFoundError):
        chat(client, "ghost", "hi")
    refused = [r for r in server.sink.read() if r.model == "ghost"]
    assert refused and refused[-1].status == 404 and refused[-1].completion == ""


def test_reload_swaps_an_adapter_without_a_restart(client, server, refs, runs):
    a, b = runs
    before = chat(client, "tiny-a", PROMPTS[0]).choices[0].message.content
    assert server.app.state.reload(str(b), name="tiny-a") == "tiny-a"
    swapped = chat(client, "tiny-a", PROMPTS[0]).choices[0].message.content
    assert swapped == generate(refs["tiny-b"], PROMPTS[0], max_new_tokens=24) != before
    server.app.state.reload(str(a), name="tiny-a")
    assert chat(client, "tiny-a", PROMPTS[0]).choices[0].message.content == before


def test_health_needs_no_key_and_metrics_do(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/metrics").status_code == 401
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert metric_value(text, 'tuneforge_requests_total{route="/health",status="200"}') >= 1
    assert metric_value(text, 'tuneforge_completion_tokens_total{model="tiny-a"}') > 0
    assert "tuneforge_time_to_first_token_seconds_bucket" in text

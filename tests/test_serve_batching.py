"""Continuous batching: the scheduler admits newcomers between decode steps (within its batch, token
and lane limits, calls after a drain); through a live server on 127.0.0.1, requests that join a
running batch finish before it and answer exactly as alone, a client that leaves frees its row at
once, and rows of different LoRA adapters share one forward pass with each its own answer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from serve_helpers import (
    AUTH,
    LiveServer,
    keyed_app,
    openai_client,
    two_distinct_runs,
)
from tuneforge.data.templates import render_prompt
from tuneforge.loading import load_reference
from tuneforge.serve.engines.base import Finished, Job, SamplingParams
from tuneforge.serve.engines.hf import TransformersEngine
from tuneforge.serve.engines.scheduler import Scheduler

LONG_PROMPT = "Color of sky?"  # the tiny model runs it to max_tokens (test_serve_limits checks)
SHORT_PROMPTS = ["hi", "x", "apple fox Color of rose?", "What is two plus two?", "book night"]


def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# ---- the scheduler with a stand-in model ----------------------------------------------------


class FakeStepper:
    """Each row makes one token per step (its first at join) and ends after max_tokens."""

    def __init__(self, lanes: dict[str, int] | None = None, step_s: float = 0.005) -> None:
        self.lanes, self.step_s = lanes or {}, step_s
        self.rows: list[list] = []  # [job, produced]
        self.steps: list[list[str]] = []  # the models of the rows of each step

    def lane(self, job: Job) -> int:
        return self.lanes.get(job.model, 0)

    def joinable(self) -> bool:
        return True

    def join(self, jobs: list[Job]) -> None:
        new = [[job, 0] for job in jobs]
        self.rows += new
        self._advance(new)

    def step(self) -> None:
        self.rows = [r for r in self.rows if not r[0].cancelled.is_set()]
        self.steps.append([r[0].model for r in self.rows])
        time.sleep(self.step_s)
        self._advance(self.rows)

    def clear(self) -> None:
        self.rows = []

    def _advance(self, rows: list[list]) -> None:
        for row in rows:
            job = row[0]
            row[1] += 1
            job.delta("t")
            if row[1] >= job.params.max_tokens:
                job.finish(Finished("length", "t" * row[1], len(job.prompt_ids), row[1]))
        self.rows = [r for r in self.rows if not r[0].done]


class Log:
    """Events of every job, and the order in which jobs finished."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.deltas: dict[str, int] = {}

    def job(self, name: str, max_tokens: int, model: str | None = None) -> Job:
        def emit(event) -> None:
            if isinstance(event, Finished):
                self.finished.append(name)
            else:
                self.deltas[name] = self.deltas.get(name, 0) + 1

        return Job(model or name, [1, 2], SamplingParams(max_tokens=max_tokens), emit)


def scheduler(stepper: FakeStepper, sizes: list[int], **limits) -> Scheduler:
    limits = {"max_batch": 8, "max_queue": 16, "wait_s": 0.05} | limits
    s = Scheduler(stepper, on_batch=sizes.append, **limits)
    s.start()
    return s


def test_newcomers_join_the_running_batch_and_leave_when_done():
    stepper, sizes, log = FakeStepper(), [], Log()
    s = scheduler(stepper, sizes)
    s.submit(log.job("long", 40))
    wait_for(lambda: len(stepper.steps) >= 3)
    for name in ("s1", "s2"):
        s.submit(log.job(name, 3))
    s.shutdown(timeout_s=20)
    assert log.finished == ["s1", "s2", "long"]
    assert sizes[0] == 1 and sizes[-1] == 3  # the two joined the running one
    joined = [i for i, models in enumerate(stepper.steps) if len(models) == 3]
    assert joined and stepper.steps[joined[-1] + 1] == ["long"]  # and left it when done
    assert log.deltas == {"long": 40, "s1": 3, "s2": 3}


def test_the_batch_and_token_limits_hold_newcomers_back():
    # a reserves 2 prompt + 5 tokens, b 2 + 20, c 2 + 5: c fits only once a has left
    for limits in ({"max_batch": 2}, {"max_batch_tokens": 30}):
        stepper, sizes, log = FakeStepper(), [], Log()
        s = scheduler(stepper, sizes, **limits)
        for name, tokens in (("a", 5), ("b", 20), ("c", 5)):
            s.submit(log.job(name, tokens))
        s.shutdown(timeout_s=20)
        assert sizes == [2, 2] and max(len(m) for m in stepper.steps) == 2, limits
        assert log.finished == ["a", "c", "b"], limits


def test_another_lane_at_the_head_drains_the_batch_first():
    stepper, sizes, log = FakeStepper(lanes={"a": 0, "b": 1}), [], Log()
    s = scheduler(stepper, sizes)
    for name, model in (("a1", "a"), ("b1", "b"), ("a2", "a")):
        s.submit(log.job(name, 4, model))
    s.shutdown(timeout_s=20)
    assert sizes == [1, 1, 1] and log.finished == ["a1", "b1", "a2"]  # first come, first served
    assert all(len(set(models)) == 1 for models in stepper.steps)  # lanes never share a step


def test_cancelled_rows_leave_and_calls_wait_for_the_batch_to_drain():
    stepper, sizes, log = FakeStepper(), [], Log()
    s = scheduler(stepper, sizes)
    gone, stays = log.job("gone", 1000), log.job("stays", 30)
    s.submit(gone)
    s.submit(stays)
    wait_for(lambda: len(stepper.steps) >= 2)
    gone.cancel()
    wait_for(lambda: [j.model for j in s.running] == ["stays"], timeout_s=5)
    seen_rows = s.call(lambda: len(stepper.rows) + len(s.running))
    assert seen_rows == 0 and log.finished == ["stays"]  # the call ran after the drain
    waiting = log.job("waiting", 5)
    waiting.cancel()  # its client left before it was admitted
    s.submit(waiting)
    s.shutdown(timeout_s=20)
    assert "waiting" not in log.deltas and log.deltas["gone"] < 100


# ---- a live server on the tiny model ---------------------------------------------------------


class SlowForward:
    """A forward pre-hook that makes each model call take `delay_s` longer."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def __call__(self, module, args, kwargs) -> None:
        time.sleep(self.delay_s)


def reference(model, ids: list[int], tok, max_new_tokens: int) -> tuple[str, int]:
    """(text, completion tokens) of transformers' own greedy generate, alone, with the EOS."""
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    produced = out[0, x.shape[1] :].tolist()
    return tok.decode(produced, skip_special_tokens=True), len(produced)


def served(engine: TransformersEngine, tmp, delay_s: float):
    """The app around `engine`, slowed by `delay_s` per forward; batch sizes kept in app.state."""
    app, _ = keyed_app(engine, tmp / "records.jsonl")
    observe, sizes = engine.on_batch, []
    engine.on_batch = lambda n: (sizes.append(n), observe(n))
    app.state.sizes = sizes
    engine.model.register_forward_pre_hook(SlowForward(delay_s), with_kwargs=True)
    return app


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory, one_thread):
    engine = TransformersEngine.open(
        tiny_model_dir, name="tiny", dtype="fp32", max_batch=8, max_queue=16
    )
    tok = engine._served["tiny"].tokenizer

    def expect(prompt: str, max_tokens: int) -> tuple[str, int]:
        return reference(engine.model, engine.render_chat("tiny", user(prompt))[1], tok, max_tokens)

    refs = {p: expect(p, 6) for p in SHORT_PROMPTS} | {LONG_PROMPT: expect(LONG_PROMPT, 48)}
    refs["long64"] = expect(LONG_PROMPT, 64)
    app = served(engine, tmp_path_factory.mktemp("tiny"), delay_s=0.03)
    with LiveServer(app) as live:
        live.engine, live.refs, live.app = engine, refs, app
        yield live


def test_requests_that_arrive_mid_flight_join_and_finish_first(tiny):
    client, refs, finished_at = openai_client(tiny), tiny.refs, {}
    started = threading.Event()

    def long_one() -> tuple[str, int]:
        stream = client.chat.completions.create(
            model="tiny", messages=user(LONG_PROMPT), max_tokens=48, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                started.set()
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            usage = chunk.usage or usage
        finished_at["long"] = time.monotonic()
        return text, usage.completion_tokens

    def short_one(prompt: str) -> tuple[str, int]:
        resp = client.chat.completions.create(
            model="tiny", messages=user(prompt), max_tokens=6, temperature=0
        )
        finished_at[prompt] = time.monotonic()
        return resp.choices[0].message.content, resp.usage.completion_tokens

    with ThreadPoolExecutor(6) as pool:
        long_future = pool.submit(long_one)
        assert started.wait(30), "the long request produced nothing"
        shorts = list(pool.map(short_one, SHORT_PROMPTS))
        long_answer = long_future.result(timeout=120)
    assert long_answer == refs[LONG_PROMPT] and long_answer[1] == 48
    assert shorts == [refs[p] for p in SHORT_PROMPTS]  # token for token what each gives alone
    assert all(finished_at[p] < finished_at["long"] for p in SHORT_PROMPTS)
    assert max(tiny.app.state.sizes) > 1  # they joined the running batch, not waited for it
    metrics = httpx.get(tiny.url + "/metrics", headers=AUTH).text
    count = _sample(metrics, "tuneforge_batch_size_count")
    assert count - _sample(metrics, 'tuneforge_batch_size_bucket{le="1.0"}') >= 1


def test_a_client_that_leaves_mid_stream_frees_its_row(tiny):
    engine, sink = tiny.engine, tiny.app.state.sink
    body = {"model": "tiny", "messages": user(LONG_PROMPT), "max_tokens": 64, "temperature": 0}
    stays: dict = {}

    def stay() -> None:
        client = openai_client(tiny)
        resp = client.chat.completions.create(**body)
        stays["answer"] = (resp.choices[0].message.content, resp.usage.completion_tokens)

    thread = threading.Thread(target=stay)
    thread.start()
    wait_for(lambda: len(engine.batch.rows) == 1)  # the one that stays is running
    with httpx.stream(
        "POST", tiny.url + "/v1/chat/completions", json=body | {"stream": True},
        headers=AUTH, timeout=30,
    ) as r:  # fmt: skip
        for line in r.iter_lines():  # up to the first text, then leave (break closes it)
            if '"content": "' in line and '"content": ""' not in line:
                assert len(engine.batcher.running) == 2  # it joined the one that stays
                break
    wait_for(lambda: any(rec.status == 499 for rec in sink.read()))
    wait_for(lambda: len(engine.batch.rows) == len(engine.batcher.running) == 1, timeout_s=5)
    assert "answer" not in stays  # its row left while the other was still generating
    thread.join(timeout=120)
    assert stays["answer"] == tiny.refs["long64"]  # the one left behind is unharmed


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


# ---- several LoRA adapters in one batch ------------------------------------------------------


def test_rows_of_different_adapters_share_a_step_and_keep_their_own_answers(
    tiny_model_dir, tmp_path, one_thread
):
    a, b = two_distinct_runs(tmp_path, tiny_model_dir)
    asks = [("tiny-a", "Color of sky?"), ("tiny-b", "Color of sky?"), ("tiny-a", "hi"),
            ("tiny-b", "book night")]  # fmt: skip
    refs = {}
    for name, run in (("tiny-a", a), ("tiny-b", b)):
        loaded = load_reference(run, dtype="fp32")
        for model, prompt in asks:
            if model == name:
                ids = render_prompt(loaded.tokenizer, user(prompt))
                refs[model, prompt] = reference(loaded.model, ids, loaded.tokenizer, 12)
    engine = TransformersEngine.open(
        a, adapters=[("tiny-b", b)], dtype="fp32", max_batch=8, wait_s=0.3
    )
    adapters_seen: list[list] = []
    forward = engine.batch.forward
    engine.batch.forward = lambda *args: (adapters_seen.append(list(args[4])), forward(*args))[1]
    app = served(engine, tmp_path, delay_s=0.0)
    together = threading.Barrier(len(asks))

    def ask(model_prompt: tuple[str, str]) -> tuple[str, int]:
        client = openai_client(app_server)
        together.wait()
        resp = client.chat.completions.create(
            model=model_prompt[0], messages=user(model_prompt[1]), max_tokens=12, temperature=0
        )
        return resp.choices[0].message.content, resp.usage.completion_tokens

    with LiveServer(app) as app_server, ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    assert answers == [refs[ask] for ask in asks]
    assert answers[0] != answers[1]  # the two adapters really answer differently
    assert max(app.state.sizes) == 4  # all four in one batch: adapters did not split it
    mixed = [names for names in adapters_seen if len(set(names)) == 2]
    assert mixed and len(mixed[0]) == 4

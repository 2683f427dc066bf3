"""One generation request from submission to record: hands the job to its engine, waits for its
events on the event loop (with the timeout and the client's disconnect in view), answers as one
JSON body or as SSE chunks ending in `data: [DONE]`, then writes the ResponseRecord.

Validating the request and rendering the prompt is routes.py's; generating is the engine's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from tuneforge.serve.apierrors import APIError, error_body
from tuneforge.serve.engines.base import (
    Delta,
    Engine,
    Failed,
    Finished,
    Job,
    QueueFull,
    SamplingParams,
)
from tuneforge.serve.limits import Limits
from tuneforge.serve.metrics import ServeMetrics
from tuneforge.serve.records import RecordSink, ResponseRecord

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting request looks at its deadline and its client
CLIENT_CLOSED = 499  # the status recorded for a client that left (nginx's convention)


@dataclass
class Call:
    """Everything one request carries through its life; `chunk` builds its stream chunks."""

    route: str
    rid: str
    model: str
    body: dict
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    engine: Engine
    request: Request
    started: float  # time.perf_counter() when the request arrived
    chunk: Callable[[str, str | None], dict]  # (text delta, finish reason) -> stream chunk
    usage_in_stream: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    ttft_s: float | None = None
    job: Job | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Runner:
    """Runs calls against engines and records them; one per app."""

    def __init__(self, sink: RecordSink, limits: Limits, metrics: ServeMetrics) -> None:
        self.sink, self.limits, self.metrics = sink, limits, metrics

    def submit(self, call: Call) -> None:
        """Queue the job now, so that a full queue is a 429 before any response starts."""
        loop = asyncio.get_running_loop()

        def emit(event: Any) -> None:  # from the engine's worker thread
            try:
                loop.call_soon_threadsafe(call.events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        call.job = Job(call.model, call.prompt_ids, call.params, emit)
        try:
            call.engine.submit(call.job)
        except QueueFull as e:
            wait = str(self.limits.retry_after_s)
            raise APIError(
                429,
                f"The server is busy ({e}); retry after {wait} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": wait},
            ) from e

    async def next_event(self, call: Call) -> Any:
        """The job's next event; a Failed event on timeout or when the client has gone."""
        deadline = call.started + self.limits.request_timeout_s
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                call.job.cancel()
                return Failed("timeout")
            try:
                event = await asyncio.wait_for(call.events.get(), timeout=min(POLL_S, remaining))
            except TimeoutError:
                if await call.request.is_disconnected():
                    call.job.cancel()
                    return Failed("disconnected")
                continue
            if call.ttft_s is None and isinstance(event, Delta | Finished):
                call.ttft_s = time.perf_counter() - call.started
                self.metrics.ttft.labels(call.route).observe(call.ttft_s)
            return event

    async def complete(self, call: Call) -> Finished:
        """Wait for the whole completion (non-streamed requests)."""
        while True:
            event = await self.next_event(call)
            if isinstance(event, Finished):
                await self.record(call, event, 200, None)
                return event
            if isinstance(event, Failed):
                status, message = self._failure(event)
                await self.record(call, None, status, message)
                error = APIError(status, message, code=_code(event), headers=self._retry())
                error.recorded = True
                raise error

    def stream(self, call: Call) -> StreamingResponse:
        return StreamingResponse(
            self._sse(call),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(self, call: Call) -> AsyncIterator[str]:
        finished = False
        try:
            yield _sse(call.chunk("", None))  # the role (chat) / an empty first piece
            while True:
                event = await self.next_event(call)
                if isinstance(event, Delta):
                    yield _sse(call.chunk(event.text, None))
                    continue
                if isinstance(event, Finished):
                    yield _sse(call.chunk("", event.finish_reason))
                    if call.usage_in_stream:
                        yield _sse(_usage_chunk(call, event))
                    finished = True
                    await self.record(call, event, 200, None)
                else:
                    status, message = self._failure(event)
                    finished = True
                    await self.record(call, None, status, message)
                    if status == CLIENT_CLOSED:
                        return
                    yield _sse(error_body(status, message, code=_code(event)))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # cancelled by a disconnect the server noticed first
                call.job.cancel()
                with anyio.CancelScope(shield=True):
                    await self.record(call, None, CLIENT_CLOSED, "client disconnected")

    def _failure(self, event: Failed) -> tuple[int, str]:
        if event.message == "timeout":
            limit = self.limits.request_timeout_s
            return 503, f"The request did not finish within {limit:g} s; retry later."
        if event.message == "disconnected":
            return CLIENT_CLOSED, "client disconnected"
        return event.status, event.message

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.limits.retry_after_s)}

    async def record(self, call: Call, done: Finished | None, status: int, error: str | None):
        if done is not None:
            self.metrics.prompt_tokens.labels(call.model).inc(done.prompt_tokens)
            self.metrics.completion_tokens.labels(call.model).inc(done.completion_tokens)
        record = ResponseRecord(
            id=call.rid,
            created=time.time(),
            route=call.route,
            model=call.model,
            adapter=_adapter(call),
            request=call.body,
            prompt=call.prompt,
            completion=done.text if done else "",
            finish_reason=done.finish_reason
            if done
            else ("cancelled" if status == 499 else "error"),
            prompt_tokens=len(call.prompt_ids),
            completion_tokens=done.completion_tokens if done else 0,
            latency_s=time.perf_counter() - call.started,
            ttft_s=call.ttft_s,
            status=status,
            error=error,
        )
        await self.write(record)

    async def write(self, record: ResponseRecord) -> None:
        try:
            await anyio.to_thread.run_sync(self.sink.write, record)
        except Exception:  # a broken sink must not turn an answer into an error
            log.exception("could not write the record of %s", record.id)


def _adapter(call: Call) -> str | None:
    try:
        return call.engine.adapter_of(call.model)
    except KeyError:
        return None


def _code(event: Failed) -> str:
    return {"timeout": "timeout", "disconnected": "client_closed"}.get(
        event.message, "engine_error"
    )


def _usage_chunk(call: Call, done: Finished) -> dict:
    chunk = call.chunk("", None)
    chunk["choices"] = []
    chunk["usage"] = {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }
    return chunk


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

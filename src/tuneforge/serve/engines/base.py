"""What every engine shares: a Job (prompt ids, sampling, an event callback), its events, and the
Batcher: a bounded queue and one worker thread that runs requests that arrive together as a batch.

How a batch is generated is the engine's business (hf.py, llamacpp.py); HTTP is app.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    text: str  # the whole completion (the deltas joined)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 503  # what the client gets; 502 when an upstream server refused or broke


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """A ValueError naming the first id outside 0..vocab_size-1 (a token-id prompt's check)."""
    for i, token in enumerate(ids):
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"token id {token} (at {i}) is outside this model's vocabulary (0-{vocab_size - 1})"
            )


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """The engine's queue holds max_queue waiting jobs: the caller answers 429."""


class Job:
    """One request inside an engine. `emit` is called from the worker thread."""

    def __init__(
        self, model: str, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable
    ) -> None:
        self.model, self.prompt_ids, self.params = model, list(prompt_ids), params
        self._emit = emit
        self.cancelled = threading.Event()
        self.done = False
        self.enqueued_at = time.monotonic()

    def cancel(self) -> None:
        """Stop generating for this job (client gone, timeout); no more events are sent."""
        self.cancelled.set()

    def delta(self, text: str) -> None:
        if text and not self.done:
            self._emit(Delta(text))

    def finish(self, event: Finished | Failed) -> None:
        if not self.done:
            self.done = True
            self._emit(event)


class TokenizerFront:
    """The tokenizer side of an engine whose `_served[model]` holds `.tokenizer` and `.lock`:
    prompts rendered with the run's own chat template, text encoded, token-id prompts decoded."""

    _served: dict

    def vocab_size(self, model: str) -> int:
        raise NotImplementedError

    def render_chat(self, model: str, messages: list[dict]) -> tuple[str, list[int]]:
        """(prompt text, prompt ids) with the run's own chat template, as training rendered it."""
        from tuneforge.data.templates import render_prompt

        served = self._served[model]
        with served.lock:
            ids = render_prompt(served.tokenizer, messages)
            return served.tokenizer.decode(ids), ids

    def encode_text(self, model: str, text: str) -> list[int]:
        served = self._served[model]
        with served.lock:
            return list(served.tokenizer(text)["input_ids"])

    def decode_ids(self, model: str, ids: list[int]) -> str:
        """A token-id prompt's text (what the record keeps); ValueError for an id the model lacks."""
        check_token_ids(ids, self.vocab_size(model))
        served = self._served[model]
        with served.lock:
            return served.tokenizer.decode(ids)


class Engine(Protocol):
    kind: str
    context_length: int
    on_batch: Callable[[int], None] | None

    def model_names(self) -> list[str]: ...
    def adapter_of(self, model: str) -> str | None: ...
    def render_chat(self, model: str, messages: list[dict]) -> tuple[str, list[int]]: ...
    def encode_text(self, model: str, text: str) -> list[int]: ...
    def decode_ids(self, model: str, ids: list[int]) -> str: ...  # ValueError: not in the vocab
    def submit(self, job: Job) -> None: ...
    def queue_depth(self) -> int: ...
    def start(self) -> None: ...
    def shutdown(self, timeout_s: float) -> None: ...
    def reload(self, ref: str | Path, name: str | None = None) -> str: ...


class JobQueue(Protocol):
    """What an engine's worker offers: the Batcher below, or scheduler.py's continuous Scheduler."""

    def submit(self, job: Job) -> None: ...
    def depth(self) -> int: ...
    def start(self) -> None: ...
    def shutdown(self, timeout_s: float) -> None: ...


class BatcherQueue:
    """The queue half of an Engine, shared by every engine: its jobs go through `self.batcher`."""

    batcher: JobQueue

    def submit(self, job: Job) -> None:
        self.batcher.submit(job)

    def queue_depth(self) -> int:
        return self.batcher.depth()

    def start(self) -> None:
        self.batcher.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.batcher.shutdown(timeout_s)


class WorkerQueue:
    """A bounded FIFO of jobs, the one worker thread that serves it, and calls run between work.

    Subclasses write `_loop` (how jobs become batches); this holds what every such queue shares:
    submit (429 when full, refused while closing), depth, `call` (run a function on the worker,
    e.g. an adapter swap, so nothing changes under running work) and a bounded shutdown.
    """

    def __init__(
        self,
        *,
        max_batch: int,
        max_queue: int,
        wait_s: float,
        on_batch: Callable[[int], None] | None,
        name: str,
    ) -> None:
        self.on_batch = on_batch
        self.max_batch, self.max_queue, self.wait_s = max(1, max_batch), max(1, max_queue), wait_s
        self._jobs: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are waiting")
            self._jobs.append(job)
            self._cond.notify()

    def depth(self) -> int:
        """Jobs waiting to run (running ones are not counted)."""
        return len(self._jobs)

    def call(self, fn: Callable[[], Any], timeout_s: float = 600.0) -> Any:
        """Run `fn` on the worker thread between two pieces of work and return its result."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        if not self._thread.is_alive():  # not started (tests, one-shot use): run here
            self._run_calls()
        return future.result(timeout=timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, finish the queued and running ones (bounded), stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        with self._cond:  # whatever is left after the bound is cancelled, not dropped silently
            left = list(self._jobs) + self._running_jobs()
            self._jobs.clear()
        for job in left:
            job.cancel()
            job.finish(Failed("the server shut down before this request ran"))

    def _running_jobs(self) -> list[Job]:
        return []

    def _loop(self) -> None:
        raise NotImplementedError

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                future.set_exception(e)


class Batcher(WorkerQueue):
    """Runs requests that arrive together as one batch, up to `max_batch` at a time.

    The worker takes the oldest job, waits up to `wait_s` for others with the same `group_key`
    (e.g. the same adapter) and hands them to `run_batch` together.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Job]], None],
        *,
        max_batch: int,
        max_queue: int,
        wait_s: float = 0.005,
        group_key: Callable[[Job], Any] = lambda job: job.model,
        on_batch: Callable[[int], None] | None = None,
        name: str = "tuneforge-engine",
    ) -> None:
        super().__init__(
            max_batch=max_batch, max_queue=max_queue, wait_s=wait_s, on_batch=on_batch, name=name
        )
        self.run_batch, self.group_key = run_batch, group_key

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._calls and not self._closing:
                    self._cond.wait()
                if self._closing and not self._jobs and not self._calls:
                    return
            self._run_calls()
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[Job]:
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while True:
                live = [j for j in self._jobs if not j.cancelled.is_set()]
                if len(live) != len(self._jobs):
                    self._jobs = deque(live)
                if not live:
                    return []
                key = self.group_key(live[0])
                same = [j for j in live if self.group_key(j) == key][: self.max_batch]
                remaining = deadline - time.monotonic()
                if len(same) >= self.max_batch or remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            chosen = {id(j) for j in same}
            self._jobs = deque(j for j in self._jobs if id(j) not in chosen)
        return same

    def _run(self, batch: list[Job]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            self.run_batch(batch)
        except Exception as e:  # one bad batch must not kill the worker
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.finish(Failed(f"generation failed: {e.__class__.__name__}"))
        for job in batch:  # an engine that forgot a job must not leave its client waiting
            job.finish(Failed("generation ended without a result"))

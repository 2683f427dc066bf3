"""Continuous (iteration-level) batching: a bounded queue and one worker thread that, between two
decode steps, admits waiting jobs into the running batch and lets finished or cancelled ones go.

What a step computes is the Stepper's business (the transformers engine's batch.py); this module
only decides who runs: admission, the batch and token limits, lanes, and calls between steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Protocol

from tuneforge.serve.engines.base import Failed, Job, WorkerQueue

log = logging.getLogger(__name__)


class Stepper(Protocol):
    """The model side of a running batch."""

    def lane(self, job: Job) -> Hashable:
        """Jobs of one lane can share a forward pass (e.g. the same adapter)."""

    def joinable(self) -> bool:
        """Whether rows can join the running batch now (some caches cannot grow in rows)."""

    def join(self, jobs: list[Job]) -> None:
        """Prefill `jobs`, give each its first token and add them to the running batch."""

    def step(self) -> None:
        """One more token for every running row; rows that end (or were cancelled) leave."""

    def clear(self) -> None:
        """Forget every row and free the cache (after an error, or when the batch is empty)."""


def job_cost(job: Job) -> int:
    """The tokens a job may hold in the cache: its prompt and all it may generate."""
    return len(job.prompt_ids) + job.params.max_tokens


class Scheduler(WorkerQueue):
    """Runs jobs through a Stepper, admitting newcomers between decode steps.

    Admission is first come, first served: the oldest waiting job joins when its lane is the
    running batch's lane, the batch has fewer than `max_batch` rows and the reserved tokens
    (`job_cost`) stay within `max_batch_tokens` (a lone job is always admitted). A head of the
    queue in another lane stops admission, so the batch drains and that lane runs next. When the
    batch is empty the worker waits up to `wait_s` for company, so a burst is prefilled together.
    `call` runs a function once the batch has drained (weight swaps); admission pauses meanwhile.
    `on_batch` sees the running batch size after each admission.
    """

    def __init__(
        self,
        stepper: Stepper,
        *,
        max_batch: int,
        max_queue: int,
        max_batch_tokens: int = 0,
        wait_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
        name: str = "tuneforge-scheduler",
    ) -> None:
        super().__init__(
            max_batch=max_batch, max_queue=max_queue, wait_s=wait_s, on_batch=on_batch, name=name
        )
        self.stepper, self.max_batch_tokens = stepper, max(0, max_batch_tokens)
        self.running: list[Job] = []
        self._lane: Hashable | None = None

    def _running_jobs(self) -> list[Job]:
        return list(self.running)

    # ---- the worker --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._jobs or self._calls or self.running or self._closing):
                    self._cond.wait()
                if self._closing and not (self._jobs or self._calls or self.running):
                    return
            if not self.running:
                self._run_calls()
            newcomers = self._admissible()
            try:
                if newcomers:
                    self.running += newcomers
                    if self.on_batch is not None:
                        self.on_batch(len(self.running))
                    self.stepper.join(newcomers)
                    self._settle()
                if self.running:
                    self.stepper.step()
                    self._settle()
            except Exception as e:  # one bad step must not kill the worker
                self._fail_running(e)

    def _settle(self) -> None:
        """Let go of rows that finished or were cancelled; free the cache when none is left."""
        self.running = [j for j in self.running if not (j.done or j.cancelled.is_set())]
        if not self.running:
            self._lane = None
            self.stepper.clear()

    def _fail_running(self, error: Exception) -> None:
        log.exception("generation failed for a batch of %d", len(self.running))
        for job in self.running:
            job.finish(Failed(f"generation failed: {error.__class__.__name__}"))
        self.running, self._lane = [], None
        self.stepper.clear()

    def _admissible(self) -> list[Job]:
        """Take the waiting jobs that may join the running batch now (in arrival order)."""
        if not self.running and self.wait_s > 0 and self._jobs:
            self._wait_for_company()
        taken: list[Job] = []
        with self._cond:
            if self._calls or (self.running and not self.stepper.joinable()):
                return taken  # a swap waits for the batch to drain; or the cache cannot grow
            reserved = sum(job_cost(j) for j in self.running)
            while self._jobs and len(self.running) + len(taken) < self.max_batch:
                job = self._jobs[0]
                if job.cancelled.is_set():  # its client left while it waited
                    self._jobs.popleft()
                    continue
                lane = self.stepper.lane(job)
                if (self.running or taken) and lane != self._lane:
                    break
                cost = job_cost(job)
                if (self.running or taken) and 0 < self.max_batch_tokens < reserved + cost:
                    break
                self._lane, reserved = lane, reserved + cost
                taken.append(self._jobs.popleft())
        return taken

    def _wait_for_company(self) -> None:
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while len(self._jobs) < self.max_batch and not self._closing and not self._calls:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

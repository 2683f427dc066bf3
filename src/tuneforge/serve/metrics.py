"""Prometheus metrics for `/metrics`: requests by route and status, latency and time to first
token, tokens in and out, queue depth, in-flight requests and batch sizes.

One registry per app (so several apps in a process never clash); app.py and the engines feed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServeMetrics:
    def __init__(self, known_routes: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self.known_routes = set(known_routes)
        r = self.registry
        self.requests = Counter(
            "tuneforge_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "tuneforge_request_latency_seconds",
            "Time to the last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tuneforge_time_to_first_token_seconds",
            "Time to the first generated text",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tuneforge_prompt_tokens", "Prompt tokens of served requests", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "tuneforge_completion_tokens", "Generated tokens", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "tuneforge_batch_size",
            "Running requests after each admission",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tuneforge_queue_depth", "Requests waiting for a batch", registry=r
        )
        self.in_flight = Gauge(
            "tuneforge_requests_in_flight", "Requests being answered", registry=r
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def route_label(self, path: str) -> str:
        """The path itself for known routes, else `other` (fuzzers must not blow up the labels)."""
        if path in self.known_routes:
            return path
        if path.startswith("/v1/models/"):
            return "/v1/models/{model}"
        return "other"

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by route and final status, with its latency."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, start, status = self.metrics.route_label(scope["path"]), time.perf_counter(), 500

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

"""The vLLM engine: tuneforge's app in front of vLLM's own OpenAI server (a child process, or any
OpenAI-compatible `--upstream`), so keys, limits, records, metrics and feedback stay tuneforge's.

Prompts are rendered here with each run's own tokenizer and sent as token ids to the upstream's
`POST /v1/completions` (streamed); its chunks become Delta / Finished / Failed events. Batching is
vLLM's: every request goes upstream at once, up to max_batch + max_queue in flight (then 429).
What vLLM is started on is vllm_launch.py's; the request and stream format vllm_upstream.py's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneforge.errors import ServeError
from tuneforge.serve.engines.base import Failed, Job, QueueFull, TokenizerFront
from tuneforge.serve.engines.vllm_launch import (
    ServedName,
    VllmChild,
    VllmInputs,
    child_command,
    free_port,
    require_vllm,
    start_child,
    vllm_inputs,
)
from tuneforge.serve.engines.vllm_upstream import (
    StreamReader,
    error_message,
    request_body,
    upstream_models,
    upstream_url,
)

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.05  # how often cancelled jobs are looked for (their upstream stream is closed)


@dataclass
class Served:
    """One served name: its upstream name, its run's tokenizer (so its chat template) and stops."""

    entry: ServedName
    tokenizer: Any
    stop_ids: frozenset[int]
    vocab_size: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # tokenizers are not re-entrant


def _eos_ids(model_dir: Path) -> set[int]:
    """End-of-sequence ids of the model's config and generation config, as transformers reads them."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids |= set(eos) if isinstance(eos, list) else {eos} if isinstance(eos, int) else set()
    return ids


def _context_length(model_dir: Path, tokenizer: Any) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config") or {}
    limit = (
        config.get("max_position_embeddings")
        or text.get("max_position_embeddings")
        or config.get("n_positions")
        or 2048
    )
    tok_limit = getattr(tokenizer, "model_max_length", None)
    return int(tok_limit) if isinstance(tok_limit, int) and 0 < tok_limit < limit else int(limit)


def load_served(inputs: VllmInputs) -> dict[str, Served]:
    """Each served name with its run's tokenizer, end-of-turn ids and vocabulary size."""
    from tuneforge.models import load_tokenizer

    vocab = json.loads((inputs.model_dir / "config.json").read_text()).get("vocab_size")
    served = {}
    for entry in inputs.served:
        tok = load_tokenizer(entry.tokenizer_dir, inputs.trust_remote_code)
        stops = {tok.eos_token_id} | _eos_ids(inputs.model_dir)
        served[entry.name] = Served(
            entry, tok, frozenset(i for i in stops if i is not None), int(vocab or len(tok))
        )
    return served


class VllmEngine(TokenizerFront):
    """Forwards each job to the upstream at once; vLLM batches them. One asyncio loop (its own
    thread) holds every open upstream stream; a cancelled job's stream is closed within
    CANCEL_POLL_S, which aborts the request in vLLM."""

    kind = "vllm"

    def __init__(
        self,
        url: str,
        served: dict[str, Served],
        *,
        context_length: int,
        api_key: str | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        child: VllmChild | None = None,
    ) -> None:
        self.url, self._served, self.context_length = url, served, context_length
        self.max_in_flight = max(1, max_batch) + max(1, max_queue)
        self.child = child
        self.on_batch: Callable[[int], None] | None = None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._in_flight: dict[Job, bool] = {}  # job -> whether its first text has come
        self._tasks: dict[Job, asyncio.Task] = {}
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._watcher: asyncio.Task | None = None

    @classmethod
    def open(
        cls,
        ref: str | Path,
        *,
        name: str | None = None,
        adapters: Sequence[tuple[str, str | Path]] = (),
        upstream: str | None = None,
        upstream_key: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_batch: int = 8,
        max_queue: int = 64,
        vllm_args: Sequence[str] = (),
        start_timeout_s: float = 600.0,
    ) -> VllmEngine:
        """Check `ref`, load its tokenizers, then start vLLM on it (or reach `upstream`)."""
        from tuneforge.serve.engines.hf import default_name

        inputs = vllm_inputs(
            str(ref), [(n, str(p)) for n, p in adapters], name or default_name(ref)
        )
        served = load_served(inputs)
        context = _context_length(inputs.model_dir, served[inputs.served[0].name].tokenizer)
        child = None
        if upstream is None:
            require_vllm()
            port, upstream_key = free_port(), secrets.token_urlsafe(24)
            url = f"http://127.0.0.1:{port}"
            command = child_command(
                inputs, port=port, max_num_seqs=max_batch, dtype=dtype, extra_args=vllm_args
            )
            child = start_child(
                command, url, upstream_key, device=device, timeout_s=start_timeout_s
            )
        else:
            url = upstream_url(upstream)
        label = f"--upstream {upstream}" if child is None else "--engine vllm: the vLLM child"
        try:
            cards = upstream_models(url, upstream_key, label=label)
            context = _map_names(served, cards, label, context)
        except BaseException:
            if child is not None:
                child.stop()
            raise
        log.info("vLLM upstream: %s (%s)", url, "started here" if child else "already running")
        return cls(
            url,
            served,
            context_length=context,
            api_key=upstream_key,
            child=child,
            max_batch=max_batch,
            max_queue=max_queue,
        )

    # ---- what app.py asks --------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return list(self._served)

    def adapter_of(self, model: str) -> str | None:
        entry = self._served[model].entry
        return str(entry.source) if entry.adapter_dir is not None else None

    def vocab_size(self, model: str) -> int:
        return self._served[model].vocab_size

    def reload(self, ref: str | Path, name: str | None = None) -> str:
        raise ServeError(
            "reload: the vllm engine serves what vLLM loaded at its start; restart `tuneforge "
            "serve` (or the upstream) to change weights"
        )

    def queue_depth(self) -> int:
        """Requests sent upstream that have no text yet (waiting in vLLM, or prefilling)."""
        with self._lock:
            return sum(1 for started in self._in_flight.values() if not started)

    def submit(self, job: Job) -> None:
        self.start()
        with self._lock:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._in_flight) >= self.max_in_flight:
                raise QueueFull(f"{len(self._in_flight)} requests are in flight")
            self._in_flight[job] = False
            in_flight = len(self._in_flight)
        if self.on_batch is not None:
            self.on_batch(in_flight)
        asyncio.run_coroutine_threadsafe(self._run(job), self._loop)

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="tuneforge-vllm", daemon=True
            )
            self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=30)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, let those in flight finish (bounded), close the rest, stop vLLM."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._in_flight)
        for job in left:
            job.cancel()
            job.finish(Failed("the server shut down before this request finished"))
        if self._loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if self.child is not None:
            self.child.stop()

    # ---- inside the engine's event loop ------------------------------------------------------

    async def _open(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.max_in_flight + 4, max_keepalive_connections=64)
        timeout = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=30.0)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout, headers=self._headers)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_cancelled())

    async def _close(self) -> None:
        self._watcher.cancel()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._client.aclose()

    async def _watch_cancelled(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for job, task in list(self._tasks.items()):
                if job.cancelled.is_set() and not task.done():
                    task.cancel()  # leaving `client.stream` closes the connection: vLLM aborts

    async def _run(self, job: Job) -> None:
        import httpx

        self._tasks[job] = asyncio.current_task()
        try:
            if not job.cancelled.is_set():
                await self._stream(job)
        except asyncio.CancelledError:
            pass  # the client left or timed out: nobody waits for an event
        except httpx.TransportError as e:
            log.warning("vLLM upstream %s: %s: %s", self.url, e.__class__.__name__, e)
            job.finish(Failed("The vLLM upstream is unavailable; retry later.", status=503))
        except Exception as e:  # an unreadable answer must not take the engine down
            log.exception("vLLM upstream %s answered something unreadable", self.url)
            job.finish(
                Failed(
                    f"The vLLM upstream's answer was unreadable ({e.__class__.__name__}).",
                    status=502,
                )
            )
        finally:
            self._tasks.pop(job, None)
            with self._lock:
                self._in_flight.pop(job, None)
            job.finish(Failed("generation ended without a result"))

    async def _stream(self, job: Job) -> None:
        served = self._served[job.model]
        body = request_body(served.entry.upstream, job.prompt_ids, job.params, served.stop_ids)
        async with self._client.stream("POST", self.url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = error_message(await response.aread())
                log.warning(
                    "vLLM upstream %s answered %d: %s", self.url, response.status_code, detail
                )
                job.finish(
                    Failed(
                        f"The vLLM upstream refused the request ({response.status_code}: {detail}).",
                        status=502,
                    )
                )
                return
            reader = StreamReader(len(job.prompt_ids))
            async for line in response.aiter_lines():
                text = reader.feed(line)
                if text:
                    self._in_flight[job] = True
                    job.delta(text)
                if reader.done:
                    break
        job.finish(reader.result())


def _map_names(served: dict[str, Served], cards: dict[str, dict], label: str, context: int) -> int:
    """Point each served name at an upstream model; returns the context the upstream allows.

    The main model may be known upstream by another name when it is the upstream's only base
    model (a vLLM started without --served-model-name); adapters must be served by their name."""
    roots = [i for i, card in cards.items() if not card.get("parent")]
    for name, s in served.items():
        if s.entry.upstream in cards:
            continue
        if s.entry.adapter_dir is None and len(roots) == 1:
            s.entry = replace(s.entry, upstream=roots[0])
            continue
        listed = ", ".join(cards) or "nothing"
        hint = (
            f"--lora-modules {name}=RUN_DIR/adapter"
            if s.entry.adapter_dir
            else f"--served-model-name {name}"
        )
        raise ServeError(
            f"{label}: it does not serve {s.entry.upstream!r} (it serves {listed}); "
            f"start vLLM with {hint}"
        )
    for s in served.values():
        limit = cards[s.entry.upstream].get("max_model_len")
        if isinstance(limit, int) and 0 < limit < context:
            context = limit
    return context

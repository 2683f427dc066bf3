"""The upstream's side of the wire, in OpenAI's format as vLLM speaks it: the streamed
/v1/completions request for one job, reading its SSE chunks into an event, its model list.

Pure data handling plus two plain HTTP calls; the engine around them is vllm.py's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from tuneforge.errors import ServeError, UsageError
from tuneforge.serve.engines.base import Failed, Finished, SamplingParams

MIN_TOP_P = 1e-6  # vLLM wants top_p in (0, 1]; OpenAI allows 0, which means the top token
FINISH = {"stop": "stop", "length": "length"}


def request_body(
    model: str, ids: Sequence[int], params: SamplingParams, stop_ids: Sequence[int]
) -> dict[str, Any]:
    """The upstream's streamed /v1/completions request for one job (OpenAI fields + vLLM's)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(ids),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": max(params.top_p, MIN_TOP_P),
        "stream": True,
        "stream_options": {"include_usage": True},
        # vLLM's own fields: the run's end-of-turn ids, and no default from the model's
        # generation_config (top_k, min_p, penalties) that tuneforge's engines would not apply
        "stop_token_ids": sorted(stop_ids),
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed % 2**63  # vLLM takes a signed 64-bit seed
    return body


class StreamReader:
    """Reads an OpenAI text-completion SSE stream: text deltas, the finish reason, the usage."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.parts = prompt_tokens, []
        self.reason: str | None = None
        self.usage: dict | None = None
        self.error: str | None = None
        self.done = False

    def feed(self, line: str) -> str:
        """One line of the stream; returns the new text (maybe empty)."""
        if not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return ""
        chunk = json.loads(data)
        if chunk.get("error"):
            error = chunk["error"]
            self.error = str(error.get("message") if isinstance(error, dict) else error)[:300]
            self.done = True
            return ""
        text = ""
        for choice in chunk.get("choices") or []:
            text += choice.get("text") or ""
            self.reason = choice.get("finish_reason") or self.reason
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if text:
            self.parts.append(text)
        return text

    def result(self) -> Finished | Failed:
        if self.error is not None:
            return Failed(f"The vLLM upstream failed mid-answer: {self.error}", status=502)
        if not self.done and self.reason is None:
            return Failed("The vLLM upstream closed the stream before its end.", status=502)
        if self.reason not in FINISH:
            return Failed(
                f"The vLLM upstream ended with finish_reason {self.reason!r}.", status=502
            )
        usage = self.usage or {}  # without usage: the prompt as sent, one token per chunk
        prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens))
        completion_tokens = int(usage.get("completion_tokens", len(self.parts)))
        return Finished(FINISH[self.reason], "".join(self.parts), prompt_tokens, completion_tokens)


def upstream_url(url: str) -> str:
    """`http(s)://host:port`, without a trailing `/` or `/v1` (OpenAI clients' base URL form)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--upstream {url}: expected http://HOST:PORT (or https://)")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def error_message(raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error", {})
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = raw.decode("utf-8", errors="replace")
    return str(message or "no message")[:300]


def upstream_models(url: str, api_key: str | None, *, label: str) -> dict[str, dict]:
    """GET url/v1/models: {id: model card}; a ServeError starting with `label` when it fails."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url + "/v1/models", headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        raise ServeError(
            f"{label}: cannot reach {url}/v1/models ({e.__class__.__name__}: {e})"
        ) from e
    if response.status_code != 200:
        raise ServeError(
            f"{label}: GET /v1/models answered {response.status_code} "
            f"({error_message(response.content)}); a key it accepts goes in --upstream-key-file"
        )
    try:
        return {card["id"]: card for card in response.json()["data"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ServeError(f"{label}: GET /v1/models is not an OpenAI model list") from e

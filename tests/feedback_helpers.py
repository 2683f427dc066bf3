"""Shared pieces of the feedback tests: response records, and a small app (router + store).

The app is what `tuneforge serve --db` mounts, without the model: the durability test runs it
as a subprocess (`python tests/feedback_helpers.py URL PORT`) and SIGKILLs it.
"""

from __future__ import annotations

import sys
import time
import uuid

from tuneforge.serve.records import ResponseRecord

KEY = "test-key-0123456789abcdef"


def make_record(
    prompt: str = "Color of sky?",
    completion: str = "blue",
    *,
    model: str = "tiny",
    adapter: str | None = "default",
    status: int = 200,
    created: float | None = None,
    latency_s: float = 0.05,
    rid: str | None = None,
) -> ResponseRecord:
    messages = [{"role": "user", "content": prompt}]
    return ResponseRecord(
        id=rid or f"chatcmpl-{uuid.uuid4().hex}",
        created=time.time() if created is None else created,
        route="/v1/chat/completions",
        model=model,
        adapter=adapter,
        request={"model": model, "messages": messages},
        prompt=f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        completion=completion,
        finish_reason="stop",
        prompt_tokens=len(prompt),
        completion_tokens=len(completion),
        latency_s=latency_s,
        ttft_s=latency_s / 2,
        status=status,
        error=None if status == 200 else "boom",
    )


def feedback_app(store, keys=None, **router_options):
    """A FastAPI app with only the feedback router, rendering APIError as OpenAI error JSON."""
    from fastapi import FastAPI

    from tuneforge.feedback.routes import feedback_router
    from tuneforge.serve.apierrors import APIError, api_error_response

    app = FastAPI()
    app.add_exception_handler(APIError, lambda request, err: api_error_response(err))
    app.include_router(feedback_router(store, keys, **router_options))
    return app


def main(url: str, port: int) -> None:
    """Serve the feedback app on 127.0.0.1:PORT with one seeded response `chatcmpl-seed`."""
    import uvicorn

    from tuneforge.feedback.store import FeedbackStore
    from tuneforge.serve.auth import ApiKeys

    store = FeedbackStore(url)
    store.write(make_record(rid="chatcmpl-seed"))
    app = feedback_app(store, ApiKeys([KEY]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

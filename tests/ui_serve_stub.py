"""A stand-in for `tuneforge serve` in the page's chat tests: same command line, no model.

It checks keys with the real `ApiKeys.from_file`, mounts the real feedback router on the real
store, and answers chat completions by streaming "echo: " + the last user message, recorded
in the store like served answers are. Run as `python tests/ui_serve_stub.py TARGET --host ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from tuneforge.feedback import FeedbackStore, feedback_router
from tuneforge.serve.apierrors import APIError, api_error_response, error_response
from tuneforge.serve.auth import ApiKeys, require_key
from tuneforge.serve.records import ResponseRecord
from tuneforge.serve.schemas import chat_chunk


def record(rid: str, body: dict, text: str) -> ResponseRecord:
    return ResponseRecord(
        id=rid, created=time.time(), route="/v1/chat/completions", model=body["model"],
        adapter=None, request=body, prompt=json.dumps(body["messages"]), completion=text,
        finish_reason="stop", prompt_tokens=1, completion_tokens=len(text), latency_s=0.01,
        ttft_s=0.005, status=200, error=None,
    )  # fmt: skip


def build(target: str, keys: ApiKeys, store: FeedbackStore) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(APIError, lambda request, err: api_error_response(err))
    name = target.rstrip("/").rsplit("/", 1)[-1]
    guarded = [Depends(require_key(keys))]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") != name or body.get("stream") is not True:
            return error_response(400, f"model: expected {name!r} with stream: true")
        text = "echo: " + body["messages"][-1]["content"]
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        async def events():
            yield f"data: {json.dumps(chat_chunk(rid, 0, name, {'role': 'assistant'}, None))}\n\n"
            for i in range(0, len(text), 4):
                await asyncio.sleep(0.01)
                yield f"data: {json.dumps(chat_chunk(rid, 0, name, {'content': text[i : i + 4]}, None))}\n\n"  # noqa: E501
            store.write(record(rid, body, text))
            yield f"data: {json.dumps(chat_chunk(rid, 0, name, {}, 'stop'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app.include_router(feedback_router(store, keys))
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key-file", required=True)
    p.add_argument("--db", required=True)
    args = p.parse_args()
    assert args.host == "127.0.0.1"
    app = build(args.model, ApiKeys.from_file(args.api_key_file), FeedbackStore(args.db))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

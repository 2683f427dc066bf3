"""The OpenAI routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}].

Each generation route validates, finds the engine serving `model`, renders the prompt with that
model's own template, fits the token budget, then hands over to calls.Runner. Refusals before
that point are recorded here; the app, middleware and error handlers are app.py's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tuneforge.errors import TemplateError
from tuneforge.serve.apierrors import APIError
from tuneforge.serve.calls import Call, Runner
from tuneforge.serve.engines.base import Engine, Finished, SamplingParams
from tuneforge.serve.limits import Limits, token_budget
from tuneforge.serve.records import ResponseRecord, new_response_id
from tuneforge.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    chat_chunk,
    completion_chunk,
    usage_dict,
)

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
GENERATION_ROUTES = (CHAT, COMPLETIONS)
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 502, 503)
}
SSE = {"text/event-stream": {"schema": {"type": "string"}}}


class ModelTable:
    """Which engine serves which model name (asked each time: a reload may add names)."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)
        self.created = int(time.time())

    def names(self) -> list[str]:
        return [name for engine in self.engines for name in engine.model_names()]

    def engine_for(self, model: str) -> Engine:
        for engine in self.engines:
            if model in engine.model_names():
                return engine
        raise APIError(
            404,
            f"The model '{model}' does not exist here; GET /v1/models lists the served models.",
            param="model",
            code="model_not_found",
        )


async def raw_body(request: Request) -> dict:
    """The request body as received, when it is a JSON object (what the record keeps)."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {"body": body}


def error_record(
    route: str, body: Any, started: float, status: int, message: str
) -> ResponseRecord:
    """The record of a request refused before it reached an engine."""
    body = body if isinstance(body, dict) else {}
    model = body.get("model")
    return ResponseRecord(
        id=new_response_id(route),
        created=time.time(),
        route=route,
        model=model if isinstance(model, str) else "",
        adapter=None,
        request=body,
        prompt="",
        completion="",
        finish_reason="error",
        prompt_tokens=0,
        completion_tokens=0,
        latency_s=time.perf_counter() - started,
        ttft_s=None,
        status=status,
        error=message,
    )


def openai_router(table: ModelTable, runner: Runner, limits: Limits) -> APIRouter:
    router = APIRouter()

    async def answer(route: str, req: Any, request: Request) -> Response:
        """Validate against the engine, submit, answer; refusals on the way are recorded."""
        started = time.perf_counter()
        request.state.body = await raw_body(request)
        try:
            engine = table.engine_for(req.model)
            call = build_call(route, req, request, engine, started, limits)
            runner.submit(call)
            if req.stream:
                return runner.stream(call)
            return JSONResponse(response_body(call, await runner.complete(call)))
        except APIError as e:
            if not e.recorded:
                record = error_record(route, request.state.body, started, e.status_code, e.message)
                await runner.write(record)
            raise

    @router.post(
        CHAT,
        response_model=ChatCompletion,
        responses={**ERRORS, 200: {"content": SSE}},
        summary="Chat completion (OpenAI format); `stream: true` answers with SSE chunks",
    )
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await answer(CHAT, req, request)

    @router.post(
        COMPLETIONS,
        response_model=Completion,
        responses={**ERRORS, 200: {"content": SSE}},
        summary="Text completion (OpenAI format): the prompt as given, no chat template",
    )
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await answer(COMPLETIONS, req, request)

    @router.get(MODELS, response_model=ModelList, responses={401: ERRORS[401]})
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=table.created) for name in table.names()])

    @router.get(
        MODELS + "/{model}",
        response_model=ModelCard,
        responses={401: ERRORS[401], 404: ERRORS[404]},
    )
    async def get_model(model: str) -> ModelCard:
        table.engine_for(model)
        return ModelCard(id=model, created=table.created)

    return router


def render(route: str, req: Any, engine: Engine) -> tuple[str, list[int], str]:
    """(prompt text, prompt ids, the request field holding the prompt)."""
    if route == COMPLETIONS and isinstance(req.prompt, list):  # token ids, used as given
        try:
            return engine.decode_ids(req.model, req.prompt), list(req.prompt), "prompt"
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", param="prompt", code="invalid_prompt") from e
    if route == COMPLETIONS:
        return req.prompt, engine.encode_text(req.model, req.prompt), "prompt"
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in req.messages
    ]
    try:
        prompt, ids = engine.render_chat(req.model, messages)
    except TemplateError as e:
        raise APIError(400, f"messages: {e}", param="messages", code="template") from e
    return prompt, ids, "messages"


def build_call(
    route: str, req: Any, request: Request, engine: Engine, started: float, limits: Limits
) -> Call:
    """Render the prompt, fit the token budget (400 when it cannot fit) and describe the call."""
    prompt, ids, prompt_field = render(route, req, engine)
    asked, field = req.token_budget()
    max_tokens = token_budget(
        len(ids), asked, field, prompt_field, engine.context_length, limits.max_tokens_cap
    )
    params = SamplingParams(max_tokens, req.temperature, req.top_p, tuple(req.stops()), req.seed)
    rid, created = new_response_id(route), int(time.time())

    def chunk(text: str, finish: str | None) -> dict:
        if route == COMPLETIONS:
            return completion_chunk(rid, created, req.model, text, finish)
        delta = {"content": text} if text else {}
        if not text and finish is None:  # the first chunk carries the role
            delta = {"role": "assistant", "content": ""}
        return chat_chunk(rid, created, req.model, delta, finish)

    return Call(
        route=route,
        rid=rid,
        model=req.model,
        body=request.state.body,
        prompt=prompt,
        prompt_ids=ids,
        params=params,
        engine=engine,
        request=request,
        started=started,
        chunk=chunk,
        usage_in_stream=bool(req.stream_options and req.stream_options.include_usage),
        created=created,
    )


def response_body(call: Call, done: Finished) -> dict[str, Any]:
    """The non-streamed answer: a chat.completion or a text_completion object."""
    if call.route == COMPLETIONS:
        kind, choice = "text_completion", {"text": done.text}
    else:
        kind, choice = "chat.completion", {"message": {"role": "assistant", "content": done.text}}
    return {
        "id": call.rid,
        "object": kind,
        "created": call.created,
        "model": call.model,
        "choices": [{"index": 0, **choice, "finish_reason": done.finish_reason, "logprobs": None}],
        "usage": usage_dict(done.prompt_tokens, done.completion_tokens),
    }

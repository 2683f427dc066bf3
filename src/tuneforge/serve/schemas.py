"""Request and response models in OpenAI's format: chat.completions, completions, models.

Validation only: unsupported OpenAI options are refused here by name (never silently ignored);
what the values mean for generation is decided in app.py and the engines.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
Name = Annotated[str, Field(min_length=1, max_length=256)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    # strict: "5" is not a number and 1 is not a bool; unknown fields are ignored as OpenAI
    # clients add new optional fields often.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: Name
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: Stop | list[Stop] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    presence_penalty: float = Field(0.0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, description="only 0 is supported")
    logit_bias: dict[str, Any] | None = Field(None, description="not supported")
    user: str | None = Field(None, max_length=256)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported: only 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    tools: list[Any] | None = Field(None, description="not supported")
    response_format: dict[Literal["type"], Literal["text"]] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> None:
        if v:
            raise ValueError("tools are not supported")
        return None

    def token_budget(self) -> tuple[int | None, str]:
        """(max_tokens as asked, the field it came from)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        min_length=1,
        description="the text, or its token ids (as OpenAI's API allows); one prompt per request",
    )
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for text completions
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: int = Field(1, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list) -> str | list[int]:
        """The one prompt: its text, or its token ids (a list of ints)."""
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return v
        if len(v) != 1:
            raise ValueError("one prompt per request")
        if isinstance(v[0], list) and not v[0]:
            raise ValueError("a token-id prompt needs at least one id")
        return v[0]

    def token_budget(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


# ---- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuneforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def chat_chunk(
    rid: str, created: int, model: str, delta: dict, finish: str | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def completion_chunk(
    rid: str, created: int, model: str, text: str, finish: str | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }

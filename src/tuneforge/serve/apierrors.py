"""Errors in OpenAI's wire format: `{"error": {"message", "type", "param", "code"}}`.

APIError is raised anywhere in a request; app.py installs the handlers that render it (and
FastAPI's own validation and HTTP errors) in this format.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

#: OpenAI's error `type` for each status this server returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
}


class APIError(HTTPException):
    """An error the client gets as OpenAI JSON; `param` names the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message, self.param, self.code = message, param, code
        self.recorded = False  # True once a ResponseRecord holds this error


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def api_error_response(err: APIError) -> JSONResponse:
    return error_response(err.status_code, err.message, err.param, err.code, err.headers)


#: pydantic's names for union members in an error location (`str`, `list[TextPart]`, ...)
_UNION_TAG = re.compile(r"^([A-Z]\w*|[a-z]+(-[a-z]+)*)(\[.*\])?$")
_TAG_WORDS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "tuple"}


def _is_union_tag(part: str) -> bool:
    if not _UNION_TAG.match(part):
        return False
    return part[0].isupper() or "[" in part or "-" in part or part in _TAG_WORDS


def field_path(loc: tuple | list) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`; None for the body as a whole.

    Union member tags that pydantic puts in locations (`content.str`) are left out."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header") and not out:
            continue
        if isinstance(part, str) and _is_union_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None

"""How config problems are worded: `key.path: reason`, with a "did you mean" where one fits.

Pure functions over pydantic's errors; no config section is defined here.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError


def not_one_of(value: Any, allowed: list[str] | tuple[str, ...]) -> str:
    msg = f"{value!r} is not one of {', '.join(allowed)}"
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return msg + (f" (did you mean {close[0]!r}?)" if close else "")


def format_errors(err: ValidationError, prefix: str = "", *, root: type[BaseModel]) -> list[str]:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        path = ".".join(([prefix] if prefix else []) + loc)
        if e["type"] == "extra_forbidden":
            reason = "unknown key" + _did_you_mean(e, root)
        elif e["type"] == "literal_error":
            allowed = e["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            reason = f"{e['input']!r} is not one of {allowed}"
        else:
            reason = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {reason}" if path else reason)  # cross-checks name their keys
    return lines


def _did_you_mean(e: dict, root: type[BaseModel]) -> str:
    key = str(e["loc"][-1])
    known = _known_keys(root, e["loc"][:-1])
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        sub = [
            a
            for a in getattr(ann, "__args__", (ann,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not sub:
            return []
        model = sub[0]
    return list(model.model_fields)

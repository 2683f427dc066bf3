"""Check one piece of feedback (a POST body or a JSONL row) field by field, naming the bad field.

Pure: no database and no HTTP here; routes.py and the `feedback add` command map FieldError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCALES = ("thumbs", "stars")
FIELDS = ("response_id", "rating", "scale", "correction", "tags", "comment", "idempotency_key")


@dataclass(frozen=True)
class FeedbackLimits:
    """Size limits; anything larger is refused (413), never truncated."""

    max_body_bytes: int = 2 * 2**20
    max_correction_chars: int = 64 * 1024
    max_comment_chars: int = 8 * 1024
    max_tags: int = 32
    max_tag_chars: int = 64
    max_key_chars: int = 200


@dataclass(frozen=True)
class FeedbackItem:
    response_id: str
    rating: int
    scale: str
    correction: str | None = None
    tags: list[str] = field(default_factory=list)
    comment: str | None = None
    idempotency_key: str | None = None

    @property
    def score(self) -> float:
        """The rating on 0..1: thumbs -1 -> 0, +1 -> 1; stars 1 -> 0 ... 5 -> 1."""
        return (self.rating + 1) / 2 if self.scale == "thumbs" else (self.rating - 1) / 4

    def payload_sha256(self) -> str:
        """What a retry with the same idempotency key must repeat (everything but the key)."""
        data = {k: v for k, v in asdict(self).items() if k != "idempotency_key"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class FieldError(ValueError):
    """A bad field: `status` is the HTTP status (400, 404, 409, 413), `field` its name."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def _text(name: str, value: Any, limit: int, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise FieldError(400, name, f"{name}: expected a string, got {_type(value)}")
    if required and not value.strip():
        raise FieldError(400, name, f"{name}: must not be empty")
    if len(value) > limit:
        raise FieldError(413, name, f"{name}: {len(value)} characters, over the limit of {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError(400, name, f"{name}: not valid UTF-8 (a lone surrogate)") from None
    if "\x00" in value:
        raise FieldError(400, name, f"{name}: contains a NUL character")
    return value


def _type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def _rating(body: dict[str, Any]) -> tuple[int, str]:
    rating, scale = body.get("rating"), body.get("scale")
    if scale is not None and scale not in SCALES:
        raise FieldError(400, "scale", f"scale: {scale!r} is not one of {', '.join(SCALES)}")
    if isinstance(rating, bool) or not isinstance(rating, int):
        raise FieldError(400, "rating", f"rating: expected an integer, got {_type(rating)}")
    if scale is None:  # -1 and +1 are thumbs; 2..5 can only be stars; 1 means thumbs up
        scale = "thumbs" if rating in (-1, 1) else "stars"
    if scale == "thumbs" and rating not in (-1, 1):
        raise FieldError(400, "rating", f"rating: {rating} is not a thumbs rating (-1 or 1)")
    if scale == "stars" and not 1 <= rating <= 5:
        raise FieldError(400, "rating", f"rating: {rating} is not a star rating (1 to 5)")
    return rating, scale


def _tags(value: Any, limits: FeedbackLimits) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError(400, "tags", f"tags: expected an array of strings, got {_type(value)}")
    if len(value) > limits.max_tags:
        raise FieldError(
            413, "tags", f"tags: {len(value)} tags, over the limit of {limits.max_tags}"
        )
    return [
        _text(f"tags[{i}]", t, limits.max_tag_chars, required=True) for i, t in enumerate(value)
    ]


def parse_feedback(
    body: Any, limits: FeedbackLimits | None = None, key: str | None = None
) -> FeedbackItem:
    """A FeedbackItem from a decoded JSON object; `key` is an Idempotency-Key header, if sent."""
    limits = limits or FeedbackLimits()
    if not isinstance(body, dict):
        raise FieldError(400, None, f"the body must be a JSON object, got {_type(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise FieldError(
            400, unknown[0], f"{unknown[0]}: unknown field (known: {', '.join(FIELDS)})"
        )
    response_id = _text("response_id", body.get("response_id"), 80, required=True)
    rating, scale = _rating(body)
    body_key = _text("idempotency_key", body.get("idempotency_key"), limits.max_key_chars)
    if key is not None and body_key is not None and key != body_key:
        raise FieldError(400, "idempotency_key", "idempotency_key: differs from the header's")
    key = _text("Idempotency-Key", key, limits.max_key_chars) if key is not None else body_key
    return FeedbackItem(
        response_id=response_id,
        rating=rating,
        scale=scale,
        correction=_text("correction", body.get("correction"), limits.max_correction_chars),
        tags=_tags(body.get("tags"), limits),
        comment=_text("comment", body.get("comment"), limits.max_comment_chars),
        idempotency_key=key or None,
    )

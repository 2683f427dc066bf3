"""What the server remembers of each request: one ResponseRecord per served (or refused) call.

Sinks write them somewhere: JsonlRecordSink (append-only, fsync per record) here; the feedback
package's FeedbackStore writes the same records into its database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

RECORDS_FILE = "serve/records.jsonl"  # relative to a run dir: the default sink's file


def new_response_id(route: str) -> str:
    """`chatcmpl-<uuid4 hex>` for chat, `cmpl-<uuid4 hex>` for completions: the feedback key."""
    prefix = "chatcmpl" if route.endswith("chat/completions") else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ResponseRecord:
    id: str
    created: float
    route: str
    model: str
    adapter: str | None
    request: dict  # the OpenAI request body as received
    prompt: str  # the rendered prompt text
    completion: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    status: int
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResponseRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"response record: missing field(s) {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})


@runtime_checkable
class RecordSink(Protocol):
    def write(self, record: ResponseRecord) -> None: ...


class JsonlRecordSink:
    """Appends one JSON line per record and fsyncs it, so a record survives a crash once written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)  # its directory appears with the first record, not before
        self._lock = threading.Lock()

    def write(self, record: ResponseRecord) -> None:
        line = json.dumps(record.to_dict(), ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(line)

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[ResponseRecord]:
        """Every record written so far (a torn last line from a crash is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(ResponseRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError):
                continue
        return out


class NullRecordSink:
    """Records nothing (benchmarks, tests that do not look at records)."""

    def write(self, record: ResponseRecord) -> None:
        return None

"""Server-sent events that follow a run's metrics.jsonl as the trainer appends to it.

A sleep-based tail (a stat and a read every half second, nothing when idle), complete lines
only, resumable from a byte offset (the event id); what the lines mean is `runs.py`'s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from tuneforge.ui.runs import parse_lines

POLL_S = 0.5
KEEPALIVE_S = 15.0
MAX_CHUNK = 1 << 20  # at most this much of the file per event


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def read_new(path: Path, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
    """(records in complete lines after `offset`, the new offset, whether the file was cut)."""
    try:
        size = path.stat().st_size
    except OSError:
        return [], 0, offset > 0
    if size < offset:  # the file was replaced or truncated (a fresh start or a resume)
        return [], 0, True
    if size == offset:
        return [], offset, False
    with path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read(min(size - offset, MAX_CHUNK))
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset, False  # a line is being written: wait for its newline
    text = chunk[: end + 1].decode("utf-8", "replace")
    return parse_lines(text), offset + end + 1, False


async def follow(
    path: Path,
    offset: int,
    status: Callable[[], dict[str, Any]],
    disconnected: Callable[[], Awaitable[bool]],
    poll_s: float = POLL_S,
) -> AsyncIterator[str]:
    """`metrics` events with new records, `status` when the run's state changes, `done` at the end.

    `status()` returns at least {"active": bool}; once the run is no longer active and the file
    has nothing new, the stream ends with a `done` event.
    """
    last_status: dict[str, Any] | None = None
    quiet_since = time.monotonic()
    while not await disconnected():
        records, offset, cut = read_new(path, offset)
        if cut:
            yield sse("reset", {}, 0)
            continue
        if records:
            yield sse("metrics", records, offset)
            quiet_since = time.monotonic()
            continue  # more may be waiting (a large file is sent in chunks)
        now = status()
        if now != last_status:
            yield sse("status", now)
            last_status = now
        if not now.get("active"):
            records, offset, _ = read_new(path, offset)  # lines written just before the end
            if records:
                yield sse("metrics", records, offset)
            yield sse("done", now)
            return
        if time.monotonic() - quiet_since > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(poll_s)

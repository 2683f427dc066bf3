"""Generated token ids -> text deltas a client may see: whole characters only, stop strings cut.

Pure string logic (no model): the engines push one token at a time and send what comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class TextStream:
    """Decodes the growing completion and releases text that can no longer become a stop string.

    The deltas joined equal `text` at the end; a stop string and anything after it are never
    released (OpenAI's `stop` semantics).
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly releasable text (maybe empty)."""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith(REPLACEMENT):  # half a character: wait for the rest of its bytes
            return ""
        return self._release(text, final=False)

    def flush(self) -> str:
        """The generation ended: release what was held back (a stop-string prefix, a half char)."""
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids), final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, text, end = True, text[:cut], cut
        else:
            end = len(text) if final else len(text) - self._held(text)
        self.text = text
        end = max(end, self.sent)
        delta, self.sent = text[self.sent : end], end
        return delta

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s, self.sent) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text) - self.sent), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

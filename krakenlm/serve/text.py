"""Incremental detokenization with stop strings, for streaming: each token yields the text that is
final so far. Held back until more tokens arrive: a trailing incomplete UTF-8 sequence (decoded as
U+FFFD), and a trailing piece that may be the start of a stop string (never sent if the stop
string completes). The concatenated deltas are exactly the decoded text cut before the first stop
string, so streamed and whole responses agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """Tokens in, final text deltas out; ``stopped`` once a stop string appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode, self.stops = decode, tuple(stops)
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the newly final text (possibly empty)."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._advance(text, cut)
        safe = len(text.rstrip(REPLACEMENT))
        return self._advance(text, safe - self._partial_stop(text[:safe]))

    def flush(self) -> str:
        """At the end (no more tokens): whatever was held back."""
        if self.stopped or not self.tokens:
            return ""
        text = self.decode(self.tokens)
        return self._advance(text, len(text))

    def _advance(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = text[self.sent:upto], upto
        return delta

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts (searching only where a new one could be)."""
        if not self.stops:
            return None
        start = max(0, self.sent - max(len(s) for s in self.stops))
        found = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

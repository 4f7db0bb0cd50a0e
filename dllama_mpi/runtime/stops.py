"""Generated text as it may be shown: stop strings cut, the text that could still become a
stop string held back until it cannot, incomplete UTF-8 held back by the decoder."""
from __future__ import annotations


class StopMatcher:
    """feed(piece) -> (text safe to emit, stopped). The stop string itself is never emitted,
    even when it arrives split over several pieces: the longest tail of the text that is a
    prefix of some stop string stays held until a later piece rules it out (or completes a
    stop string, or flush() releases it at the end)."""

    def __init__(self, stops=()):
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        buf = self.held + piece
        # a stop string cannot begin in text already emitted: the held tail was the longest
        # candidate, so searching the held tail and the new piece is enough
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buf[:min(found)], True
        keep = self._partial(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(buf), len(s) - 1), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class TextStream:
    """Tokens in, emit-safe text out: the streaming decoder (push(token) -> str, flush() ->
    str; None: no text at all) followed by the stop matcher. `text` is everything emitted."""

    def __init__(self, decoder=None, stops=()):
        self.decoder = decoder
        self.matcher = StopMatcher(stops)
        self.text = ""
        self.stopped = False

    def push(self, token: int, last: bool = False) -> str:
        """The text that became safe with `token`; with last=True also everything held back
        (the sequence ends here). Sets .stopped when a stop string completed."""
        if self.decoder is None:
            return ""
        piece = self.decoder.push(token)
        if last:
            piece += self.decoder.flush()
        out, self.stopped = self.matcher.feed(piece)
        if last and not self.stopped:
            out += self.matcher.flush()
        self.text += out
        return out

    def finish(self) -> str:
        """The sequence ended without a token of its own (a stop id, cancellation): release
        what is held back."""
        if self.decoder is None or self.stopped:
            return ""
        out, self.stopped = self.matcher.feed(self.decoder.flush())
        if not self.stopped:
            out += self.matcher.flush()
        self.text += out
        return out

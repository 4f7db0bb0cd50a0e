"""Streaming detokenization: token ids in, printable text out, one piece at a time."""

from __future__ import annotations

from typing import Protocol


class _Decodes(Protocol):
    """What the decoder needs of a tokenizer (core.Tokenizer has it)."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str: ...


class IncrementalDecoder:
    """Turns a stream of token ids into text, one printable piece at a time.

    ``push(id)`` returns the text that became printable with this token (possibly ""): bytes of a
    character split over several byte-level / byte-fallback tokens are held until the character
    is complete, and SentencePiece "▁" spacing is resolved as in a full ``decode``.  ``flush()``
    returns whatever is still held (an incomplete character comes out as U+FFFD).  The
    concatenation of all returned pieces equals ``tokenizer.decode(all_ids)``.

    It decodes a short sliding window of recent ids with the tokenizer's own decoder and emits the
    growth of the text, so every decoder (byte-level, byte-fallback, Metaspace) is handled alike.
    """

    def __init__(self, tokenizer: _Decodes, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids already emitted that give context to the decoder
        self._read = 0  # ids[:read] have been emitted

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text) :]
            # the ids just emitted become the context window; older ones are no longer needed
            del self._ids[: self._read]
            self._prefix, self._read = 0, len(self._ids)
            return out
        return ""

    def flush(self) -> str:
        """Emit what is held back (an incomplete UTF-8 sequence decodes to U+FFFD) and reset."""
        out = ""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
            new_text = self._decode(self._ids[self._prefix :])
            out = new_text[len(prefix_text) :]
        self.reset()
        return out

    def reset(self) -> None:
        self._ids.clear()
        self._prefix = self._read = 0

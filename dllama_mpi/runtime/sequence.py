"""One request as the scheduler sees it (Sequence), what it reports (TokenEvent, Completion),
the caller's handle on it (RequestHandle), and the KV slots it may run in (Slot)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DllamaError
from .stops import TextStream


@dataclass
class TokenEvent:
    """One generated token, delivered on the scheduler thread. `token` is None only for the
    last event of a sequence that ended without a token of its own (a stop id, cancellation)
    while text was held back: it carries that text."""
    token: int | None
    text: str                  # text that became safe to emit with this token (may be "")
    logprob: float | None = None                         # when params.logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # when params.top_logprobs > 0


@dataclass
class Completion:
    request_id: str
    prompt_tokens: list[int]
    generated_tokens: list[int]     # stop ids / tokens after a stop string excluded
    text: str                       # the whole generated text, stop string cut
    finish_reason: str              # "stop" | "length" | "cancelled" | "error"
    cached_tokens: int              # prompt tokens reused from the prefix cache
    prompt_seconds: float           # submit -> first token (time to first token)
    decode_seconds: float           # first token -> done
    error: str | None = None


class RequestHandle:
    def __init__(self, request_id: str, scheduler):
        self.id = request_id
        self._scheduler = scheduler
        self._event = threading.Event()
        self.completion: Completion | None = None
        self.cancel_requested = False

    def cancel(self) -> None:
        """Any thread, any time: the request ends as "cancelled" (if not done already) and
        its KV slot is freed at the scheduler's next step boundary."""
        self._scheduler._cancel(self)

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._event.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        return self.completion

    def done(self) -> bool:
        return self._event.is_set()

    def _set(self, completion: Completion) -> None:
        self.completion = completion
        self._event.set()


def check_prompt(prompt: list[int], max_seq_len: int) -> None:
    if not prompt:
        raise DllamaError("the prompt is empty: nothing to condition on")
    if len(prompt) >= max_seq_len:
        raise DllamaError(f"the prompt has {len(prompt)} tokens; --max-seq-len is {max_seq_len} "
                          f"(it must leave room for at least one generated token)")


@dataclass
class Sequence:
    handle: RequestHandle
    prompt: list[int]
    params: object                          # SamplingParams
    sample: Callable[..., int]              # (logits, allowed mask or None) -> token id
    stream: TextStream
    on_token: Callable | None = None
    on_done: Callable | None = None
    grammar: object | None = None           # grammar.Matcher of params.response_format
    slot: int = -1                          # KV slot while admitted
    pos: int = 0                            # next position to write
    next_token: int = -1                    # decoding: the token to feed at pos
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)

    def completion(self, reason: str, error: str | None = None) -> Completion:
        now = time.perf_counter()
        first = self.t_first if self.t_first is not None else now
        return Completion(self.handle.id, list(self.prompt), list(self.generated),
                          self.stream.text, reason, self.cached_tokens, first - self.t_submit,
                          now - first, error)


@dataclass
class Slot:
    """A KV slot: the tokens whose K/V it holds at positions 0.. (kept after its sequence
    ends, for the prefix cache), and when it was last freed."""
    tokens: list[int] = field(default_factory=list)
    last_used: int = -1
    seq: Sequence | None = None

    def shared_prefix(self, prompt: list[int]) -> int:
        """Leading tokens of prompt this slot holds, leaving at least the prompt's last token
        to recompute (its logits give the first generated token)."""
        m = min(len(self.tokens), len(prompt) - 1)
        if m <= 0:
            return 0
        diff = np.flatnonzero(np.asarray(self.tokens[:m]) != np.asarray(prompt[:m]))
        return int(diff[0]) if diff.size else m

"""One sequence on the root: prompt as a batch (in chunks), then token by token."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import DllamaError


@dataclass
class Generation:
    prompt_tokens: list[int]
    generated_tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"     # "length" | "stop"
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return len(self.prompt_tokens) / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first generated token comes from the prompt's forward: decode steps = n - 1
        n = len(self.generated_tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


def generate(engine, prompt: list[int], max_new_tokens: int, sample: Callable[[object], int],
             stop_ids: set[int], max_seq_len: int, prefill_chunk: int = 128,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Root only. Stops at a stop id (not emitted), max_new_tokens, or the context end."""
    if not prompt:
        raise DllamaError("the prompt is empty: nothing to condition on")
    if len(prompt) >= max_seq_len:
        raise DllamaError(f"the prompt has {len(prompt)} tokens; --max-seq-len is {max_seq_len} "
                          f"(it must leave room for at least one generated token)")
    g = Generation(prompt_tokens=list(prompt))
    t0 = time.perf_counter()
    for start in range(0, len(prompt), prefill_chunk):
        logits = engine.forward(prompt[start:start + prefill_chunk], start)
    g.prompt_seconds = time.perf_counter() - t0
    pos = len(prompt)
    t0 = time.perf_counter()
    while len(g.generated_tokens) < max_new_tokens:
        token = sample(logits[-1])
        if token in stop_ids:
            g.finish_reason = "stop"
            break
        g.generated_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(g.generated_tokens) == max_new_tokens or pos >= max_seq_len:
            break
        logits = engine.forward([token], pos)
        pos += 1
    g.decode_seconds = time.perf_counter() - t0
    return g

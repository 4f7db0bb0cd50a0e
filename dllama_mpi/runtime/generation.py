"""Sequences on the root for one-thread front ends: one prompt and its continuation
(generate), a list of prompts decoding together (generate_batch); both through the one
loop of runtime.scheduler."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import SamplingParams
from ..errors import DllamaError
from .scheduler import Completion, Scheduler
from .sequence import check_prompt  # noqa: F401  (re-exported)


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
    """Root only, KV slot 0. Stops at a stop id (not emitted), max_new_tokens, or the
    context end. The prompt goes in chunks of prefill_chunk tokens."""
    check_prompt(prompt, max_seq_len)
    scheduler = Scheduler(engine, n_slots=1, max_seq_len=max_seq_len, eos_ids=stop_ids,
                          token_budget=prefill_chunk, prefix_cache=False)
    tokens = None if on_token is None else (
        lambda ev: on_token(ev.token) if ev.token is not None else None)
    c = scheduler.generate(prompt, _params(max_new_tokens), on_token=tokens, sampler=sample)
    return _generation(c)


def _params(max_new_tokens: int) -> SamplingParams:
    """Sampling is the caller's sampler; stop ids are the scheduler's eos_ids."""
    return SamplingParams(max_tokens=max(0, max_new_tokens))


def _generation(c: Completion) -> Generation:
    if c.finish_reason == "error":
        raise DllamaError(c.error)
    return Generation(c.prompt_tokens, c.generated_tokens, c.finish_reason,
                      c.prompt_seconds, c.decode_seconds)


@dataclass
class BatchResult:
    generations: list[Generation]
    decode_steps: int = 0
    decode_tokens: int = 0       # tokens made by decode steps (rows of several sequences)
    decode_seconds: float = 0.0  # time in decode steps
    prefill_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Aggregate: tokens of all sequences per second of decode steps."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def generate_batch(engine, prompts: list[list[int]], max_new_tokens: list[int],
                   samplers: list[Callable[[object], int]], stop_ids: set[int], max_seq_len: int,
                   n_slots: int, prefill_chunk: int = 128,
                   on_done: Callable[[int, Generation], None] | None = None) -> BatchResult:
    """Root only. Continuous batching through the Scheduler: up to n_slots sequences decode
    together, one row each per step, and a prompt's chunk (steps of at most prefill_chunk
    rows) shares the steps of the running sequences; a finished sequence frees its KV slot
    for the next prompt (which reuses the tokens it shares with the slot's last sequence).
    Each sequence stops as generate() does, and gives the same tokens as generate() alone."""
    for p in prompts:
        check_prompt(p, max_seq_len)
    scheduler = Scheduler(engine, n_slots=n_slots, max_seq_len=max_seq_len, eos_ids=stop_ids,
                          token_budget=prefill_chunk)
    result = BatchResult([Generation(prompt_tokens=list(p)) for p in prompts])
    t_start = time.perf_counter()

    def done(index: int, c: Completion) -> None:
        if c.finish_reason != "error":
            result.generations[index] = g = _generation(c)
            if on_done is not None:
                on_done(index, g)

    handles = [scheduler.submit(p, _params(m), sampler=sample,
                                on_done=lambda c, i=i: done(i, c))
               for i, (p, m, sample) in enumerate(zip(prompts, max_new_tokens, samplers))]
    while scheduler.step():
        pass
    for h in handles:
        _generation(h.wait(0))          # an error ends the batch as before: raised
    result.decode_steps = scheduler.decode_steps_total
    result.decode_tokens = scheduler.decode_rows_total
    result.decode_seconds = scheduler.decode_seconds_total
    result.prefill_seconds = scheduler.prefill_seconds_total
    result.seconds = time.perf_counter() - t_start
    return result

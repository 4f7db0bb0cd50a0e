"""Sequences on the root: a prompt as a batch (in chunks), then token by token; several
sequences decoding together (generate_batch)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DllamaError


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
    check_prompt(prompt, max_seq_len)
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


@dataclass
class _Running:
    index: int          # which prompt
    gen: Generation
    sample: Callable[[object], int]
    max_new: int
    token: int = 0      # the token to feed next
    pos: int = 0        # its position
    started: float = 0.0


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


def check_prompt(prompt: list[int], max_seq_len: int) -> None:
    if not prompt:
        raise DllamaError("the prompt is empty: nothing to condition on")
    if len(prompt) >= max_seq_len:
        raise DllamaError(f"the prompt has {len(prompt)} tokens; --max-seq-len is {max_seq_len} "
                          f"(it must leave room for at least one generated token)")


def generate_batch(engine, prompts: list[list[int]], max_new_tokens: list[int],
                   samplers: list[Callable[[object], int]], stop_ids: set[int], max_seq_len: int,
                   n_slots: int, prefill_chunk: int = 128,
                   on_done: Callable[[int, Generation], None] | None = None) -> BatchResult:
    """Root only. Continuous batching: up to n_slots sequences decode together, one row each
    per step (engine.forward_rows); a finished sequence frees its KV slot for the next
    prompt, which is prefilled (in chunks, alone) before it joins. Each sequence stops as
    generate() does, and gives the same tokens as generate() would alone."""
    for p in prompts:
        check_prompt(p, max_seq_len)
    result = BatchResult([Generation(prompt_tokens=list(p)) for p in prompts])
    waiting = list(range(len(prompts)))[::-1]
    free = list(range(n_slots))[::-1]
    running: dict[int, _Running] = {}
    t_start = time.perf_counter()

    def finish(slot: int, reason: str) -> None:
        r = running.pop(slot)
        r.gen.finish_reason = reason
        r.gen.decode_seconds = time.perf_counter() - r.started
        free.append(slot)
        if on_done is not None:
            on_done(r.index, r.gen)

    def take(slot: int, logits_row) -> None:
        """Sample the next token of the sequence in slot; finish it or queue the token."""
        r = running[slot]
        token = r.sample(logits_row)
        if token in stop_ids:
            finish(slot, "stop")
            return
        r.gen.generated_tokens.append(token)
        if len(r.gen.generated_tokens) == r.max_new or r.pos >= max_seq_len:
            finish(slot, "length")
            return
        r.token = token

    while waiting or running:
        while waiting and free:                      # admit: prefill into a free slot
            i, slot = waiting.pop(), free.pop()
            prompt = result.generations[i].prompt_tokens
            r = running[slot] = _Running(i, result.generations[i], samplers[i], max_new_tokens[i],
                                         pos=len(prompt))
            t0 = time.perf_counter()
            for start in range(0, len(prompt), prefill_chunk):
                logits = engine.forward(prompt[start:start + prefill_chunk], start, slot=slot)
            r.started = time.perf_counter()
            r.gen.prompt_seconds = r.started - t0
            result.prefill_seconds += r.gen.prompt_seconds
            if r.max_new <= 0:
                finish(slot, "length")
            else:
                take(slot, logits[-1])
        if not running:
            continue
        slots = sorted(running)
        t0 = time.perf_counter()
        logits = engine.forward_rows([running[s].token for s in slots],
                                     [running[s].pos for s in slots], slots)
        result.decode_seconds += time.perf_counter() - t0
        result.decode_steps += 1
        result.decode_tokens += len(slots)
        for row, slot in enumerate(slots):
            running[slot].pos += 1
            take(slot, logits[row])
    result.seconds = time.perf_counter() - t_start
    return result

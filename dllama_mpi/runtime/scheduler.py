"""The open scheduler: the one loop behind inference, chat, batch and serve (on the root).

Requests arrive at any time from any thread (submit: a lock and a condition); the scheduler
thread alone drives the engine. Each engine step carries one row for every decoding
sequence plus prompt chunks of the prefilling sequences, in admission order, within a token
budget (decode rows first; the chunks get what is left, at least one token), so a long
prompt never stalls the running streams, and requests that arrive together are prefilled
together: continuous batching with chunked prefill, in one forward.

A sequence ends on a stop id (not emitted), a stop string (never emitted: text that could
still become one is held back), max_tokens, the context end, cancellation (any thread, any
time: its slot is freed at the next step boundary) or an error. A request with a
response_format gets a grammar matcher (compiled at submit): its logits are masked to the
tokens the grammar allows before sampling (stop ids only where the grammar accepts), and the
sequence ends with "stop" once the grammar is complete. A finished sequence's KV
slot keeps its tokens: a later prompt that starts with them takes that slot and starts
prefill where they differ (the prefix cache).
"""
from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque

from ..errors import DllamaError
from ..sampler import Sampler, logprobs_of, masked
from .sequence import (Completion, RequestHandle, Sequence, Slot, TokenEvent,  # noqa: F401
                       check_prompt)
from .stops import TextStream

# a prefix held by another slot is copied when it saves at least this many positions of
# prefill (a copy is a broadcast step of its own)
MIN_COPY_POSITIONS = 16


def _shared(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share, counted up to MIN_COPY_POSITIONS."""
    n = min(len(a), len(b), MIN_COPY_POSITIONS)
    return next((i for i in range(n) if a[i] != b[i]), n)


class Scheduler:
    def __init__(self, engine, *, n_slots: int, max_seq_len: int, eos_ids,
                 decoder_factory=None, token_budget: int = 256, prefix_cache: bool = True,
                 prefill_alone: bool = False, grammar=None):
        """engine: forward(tokens, pos, slot=) and forward_rows(tokens, positions, slots,
        logit_rows=) on the root. decoder_factory: () -> a streaming decoder (push(token) ->
        str, flush() -> str), needed for text and stop strings. prefill_alone: steps with a
        prompt chunk carry no decode rows (the behaviour before chunked prefill; benchmarks).
        grammar: a grammar.GrammarCompiler (matcher(response_format) -> Matcher), needed for
        requests with a response_format."""
        if n_slots < 1:
            raise DllamaError(f"the scheduler needs at least one KV slot, got {n_slots}")
        if token_budget < 1:
            raise DllamaError(f"token_budget must be >= 1, got {token_budget}")
        self.engine, self.max_seq_len = engine, max_seq_len
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.decoder_factory, self.token_budget = decoder_factory, token_budget
        self.prefix_cache, self.prefill_alone = prefix_cache, prefill_alone
        self.grammar = grammar
        self.slots = [Slot() for _ in range(n_slots)]
        self._cond = threading.Condition(threading.Lock())
        self._waiting: deque[Sequence] = deque()     # submitted, no slot yet (FIFO)
        self._running: list[Sequence] = []           # in a slot, in admission order
        self._closed = False
        self._loop_thread: threading.Thread | None = None
        self._ids, self._clock = itertools.count(), itertools.count()
        # counters (for /metrics); the *_seconds of a mixed step are shared by its rows
        self.requests_total = 0
        self.tokens_generated_total = self.prompt_tokens_total = self.cached_tokens_total = 0
        self.steps_total = self.decode_steps_total = 0
        self.decode_rows_total = self.prefill_rows_total = 0
        self.decode_seconds_total = self.prefill_seconds_total = 0.0
        self.kv_copies_total = 0

    # -- any thread --------------------------------------------------------------------
    def submit(self, prompt_tokens, params, on_token=None, on_done=None,
               request_id: str | None = None, sampler=None) -> RequestHandle:
        """Queue a request; DllamaError at once for an empty prompt, one that leaves no room
        in max_seq_len, bad params or an invalid response_format. sampler: a callable(logits)
        -> token id used instead of the seeded Sampler of params (generate_batch's callers
        bring their own; with a response_format it sees the disallowed logits as -inf)."""
        params.check()
        prompt = [int(t) for t in prompt_tokens]
        check_prompt(prompt, self.max_seq_len)
        if params.stop and self.decoder_factory is None:
            raise DllamaError("stop strings need the text: this scheduler has no decoder")
        matcher = None
        if params.response_format is not None:
            if self.grammar is None:
                raise DllamaError("response_format needs a grammar: this scheduler has none")
            matcher = self.grammar.matcher(params.response_format)   # compiles; may raise
        sample = Sampler.from_params(params) if sampler is None else (
            lambda logits, allowed, f=sampler: masked(f, logits, allowed))
        decoder = self.decoder_factory() if self.decoder_factory is not None else None
        with self._cond:
            if self._closed:
                raise DllamaError("the scheduler is closed")
            handle = RequestHandle(request_id or f"req-{next(self._ids)}", self)
            self._waiting.append(Sequence(
                handle, prompt, params, sample, TextStream(decoder, params.stop), on_token,
                on_done, grammar=matcher))
            self.requests_total += 1
            self._cond.notify_all()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            handle.cancel_requested = True
            self._cond.notify_all()

    def close(self, cancel: bool = False) -> None:
        """Stop run() once nothing runs (cancelling everything first if asked); later
        submits raise DllamaError."""
        with self._cond:
            self._closed = True
            if cancel:
                for s in list(self._waiting) + list(self._running):
                    s.handle.cancel_requested = True
            self._cond.notify_all()

    @property
    def requests_running(self) -> int:
        return len(self._running)

    @property
    def requests_waiting(self) -> int:
        return len(self._waiting)

    def counters(self) -> dict:
        """A snapshot of the counters (for /metrics)."""
        names = ("requests_running", "requests_waiting", "requests_total",
                 "tokens_generated_total", "prompt_tokens_total", "cached_tokens_total",
                 "steps_total", "decode_steps_total", "decode_rows_total", "prefill_rows_total",
                 "decode_seconds_total", "prefill_seconds_total", "kv_copies_total")
        return {n: getattr(self, n) for n in names}

    # -- the scheduler thread ----------------------------------------------------------
    def run(self) -> None:
        """step() while there is work; wait for work when idle; return after close() once
        nothing runs. An engine error fails every request, then propagates."""
        with self._cond:
            if self._loop_thread is not None:
                raise DllamaError("the scheduler already runs in another thread")
            self._loop_thread = threading.current_thread()
        try:
            while True:
                with self._cond:
                    while not self._closed and not (self._waiting or self._running):
                        self._cond.wait()
                    if self._closed and not (self._waiting or self._running):
                        return
                self.step()
        except BaseException as e:
            self._fail_all(f"{type(e).__name__}: {e}")
            raise
        finally:
            with self._cond:
                self._loop_thread = None

    def generate(self, prompt_tokens, params, on_token=None, sampler=None) -> Completion:
        """Submit, then step() until the request is done (one-thread front ends); when run()
        drives the scheduler in another thread, just wait for it."""
        handle = self.submit(prompt_tokens, params, on_token=on_token, sampler=sampler)
        if self._loop_thread is not None:
            return handle.wait()
        while not handle.done():
            if not self.step() and not handle.done():
                raise RuntimeError("the scheduler went idle before the request finished")
        return handle.completion

    def step(self) -> bool:
        """One engine step: reap cancellations, admit, then one forward of the decode rows
        and the prompt chunks that fit the budget. False if there was nothing to do."""
        if self._loop_thread not in (None, threading.current_thread()):
            raise DllamaError("step() called while run() drives the scheduler in another thread")
        self._reap_cancelled()
        self._admit()
        decode = [s for s in self._running if not s.prefilling]
        prefilling = [s for s in self._running if s.prefilling]
        if prefilling and self.prefill_alone:
            decode = []
        if not decode and not prefilling:
            return False
        room, chunks = max(1, self.token_budget - len(decode)), []
        for pre in prefilling:
            if room == 0:
                break
            chunks.append((pre, pre.prompt[pre.pos:pre.pos + room]))
            room -= len(chunks[-1][1])
        self._forward(decode, chunks)
        return True

    def _reap_cancelled(self) -> None:
        with self._cond:
            gone = [s for s in self._waiting if s.handle.cancel_requested]
            for s in gone:
                self._waiting.remove(s)
        gone += [s for s in self._running if s.handle.cancel_requested]
        for s in gone:
            self._finish(s, "cancelled")

    def _admit(self) -> None:
        """Give waiting requests free slots, oldest first, while the next step has room for
        a chunk of theirs: the prompts already prefilling leave some of the token budget
        (admitting more would only hold slots). A prompt that shares at least
        MIN_COPY_POSITIONS tokens with one being prefilled waits for it, to copy them."""
        while self._prefill_room() > 0:
            free = [i for i, sl in enumerate(self.slots) if sl.seq is None]
            with self._cond:
                if not free or not self._waiting or self._waits_for_prefill(self._waiting[0].prompt):
                    return
                seq = self._waiting.popleft()
                self._running.append(seq)
            if seq.params.max_tokens == 0:
                self._finish(seq, "length")
                continue
            slot = self._choose_slot(seq.prompt, free)
            cached = self.slots[slot].shared_prefix(seq.prompt) if self.prefix_cache else 0
            if self.prefix_cache:
                cached = self._copy_longer_prefix(seq.prompt, slot, cached)
            self.slots[slot].seq = seq
            del self.slots[slot].tokens[cached:]
            seq.slot, seq.pos, seq.cached_tokens = slot, cached, cached
            self.prompt_tokens_total += len(seq.prompt)
            self.cached_tokens_total += cached

    def _prefill_room(self) -> int:
        """Tokens of the next step's budget that the decode rows and the prompts being
        prefilled leave (prefill_alone: the budget, only while nothing prefills)."""
        prefilling = [s for s in self._running if s.prefilling]
        if self.prefill_alone:
            return 0 if prefilling else self.token_budget
        decode = len(self._running) - len(prefilling)
        return max(1, self.token_budget - decode) - sum(len(s.prompt) - s.pos for s in prefilling)

    def _waits_for_prefill(self, prompt) -> bool:
        """A prompt sharing MIN_COPY_POSITIONS leading tokens with one being prefilled (the
        n choices of a prompt, a common system prompt): better copied once it is done."""
        return self.prefix_cache and any(_shared(prompt, s.prompt) >= MIN_COPY_POSITIONS
                                         for s in self._running if s.prefilling)

    def _copy_longer_prefix(self, prompt, slot: int, cached: int) -> int:
        """When another slot (a running sequence's too: the n choices of one prompt, a shared
        system prompt) holds a longer prefix of prompt than `slot`, copy its K/V over: a
        memory copy instead of a prefill. Returns the positions `slot` now holds."""
        best, src = cached, -1
        for i, other in enumerate(self.slots):
            n = other.shared_prefix(prompt)
            if i != slot and n > best:
                best, src = n, i
        if best - cached < MIN_COPY_POSITIONS:
            return cached
        self.engine.copy_kv(src, slot, best)
        self.slots[slot].tokens[:] = self.slots[src].tokens[:best]
        self.kv_copies_total += 1
        return best

    def _choose_slot(self, prompt, free: list[int]) -> int:
        """The free slot sharing the longest prefix with prompt; among equals (and when the
        cache is off) the least recently used."""
        if not self.prefix_cache:
            return min(free, key=lambda i: self.slots[i].last_used)
        return max(free, key=lambda i: (self.slots[i].shared_prefix(prompt),
                                        -self.slots[i].last_used))

    def _forward(self, decode: list[Sequence], chunks: list[tuple[Sequence, list[int]]]) -> None:
        """One forward: a row for each decoding sequence, then each prompt chunk's rows."""
        tokens = [s.next_token for s in decode]
        positions = [s.pos for s in decode]
        slots = [s.slot for s in decode]
        completing = []                   # (prompt that completes, the row of its last token)
        for pre, chunk in chunks:
            tokens += chunk
            positions += range(pre.pos, pre.pos + len(chunk))
            slots += [pre.slot] * len(chunk)
            if pre.pos + len(chunk) == len(pre.prompt):
                completing.append((pre, len(tokens) - 1))
        t0 = time.perf_counter()
        try:
            if len(decode) + len(chunks) == 1:        # one sequence: its last row's logits
                logits = self.engine.forward(tokens, positions[0], slot=slots[0])
                rows = [0] * (len(decode) + len(completing))
            else:
                want = list(range(len(decode))) + [row for _, row in completing]
                logits = self.engine.forward_rows(     # None: every row (decode-only steps)
                    tokens, positions, slots, logit_rows=None if len(want) == len(tokens) else want)
                rows = list(range(len(want)))
        except BaseException as e:
            for s in decode + [pre for pre, _ in chunks]:
                self.slots[s.slot].tokens.clear()      # what the cache holds is unknown
                self._finish(s, "error", f"{type(e).__name__}: {e}")
            raise
        self._count(time.perf_counter() - t0, len(decode), len(tokens) - len(decode))
        for s in decode:
            self.slots[s.slot].tokens.append(s.next_token)
            s.pos += 1
        for pre, chunk in chunks:
            self.slots[pre.slot].tokens.extend(chunk)
            pre.pos += len(chunk)
        self._reap_cancelled()            # cancelled during the forward: no more tokens
        for s, row in zip(decode + [pre for pre, _ in completing], rows):
            self._take(s, logits[row])

    def _count(self, seconds: float, n_decode: int, n_chunk: int) -> None:
        self.steps_total += 1
        self.decode_steps_total += n_decode > 0
        self.decode_rows_total += n_decode
        self.prefill_rows_total += n_chunk
        share = n_decode / (n_decode + n_chunk)
        self.decode_seconds_total += seconds * share
        self.prefill_seconds_total += seconds * (1 - share)

    def _take(self, s: Sequence, row) -> None:
        """Sample s's next token from its logits row; emit it, or end the sequence."""
        if s.handle.done():
            return
        p, g = s.params, s.grammar
        try:
            token = int(s.sample(row, None if g is None else g.allowed(len(row))))
        except DllamaError as e:            # the grammar allows nothing (its error state)
            self._finish(s, "error", f"{e}: {g.error}" if g is not None else str(e))
            return
        if s.t_first is None:
            s.t_first = time.perf_counter()
        if g is not None and not g.accept(token):
            self._finish(s, "error", f"the grammar rejected token {token}: {g.error}")
            return
        if token in self.eos_ids and not p.ignore_eos:
            self._finish(s, "stop")
            return
        s.generated.append(token)
        self.tokens_generated_total += 1
        complete = g is not None and g.done     # the grammar allows nothing more
        last = complete or len(s.generated) >= p.max_tokens or s.pos >= self.max_seq_len
        text = s.stream.push(token, last)
        lp = top = None
        if p.logprobs or p.top_logprobs:
            lp, top = logprobs_of(row, token, p.top_logprobs)
            lp = lp if p.logprobs else None
        if not self._emit(s, TokenEvent(token, text, lp, top)):
            return
        if s.stream.stopped or complete:
            self._finish(s, "stop")
        elif last:
            self._finish(s, "length")
        else:
            s.next_token = token

    def _emit(self, s: Sequence, event: TokenEvent) -> bool:
        if s.on_token is None:
            return True
        try:
            s.on_token(event)
            return True
        except Exception as e:              # a front end's bug ends its request, not the loop
            self._finish(s, "error", f"on_token raised {type(e).__name__}: {e}", tail=False)
            return False

    def _finish(self, s: Sequence, reason: str, error: str | None = None,
                tail: bool = True) -> None:
        """End s: release held-back text, free its slot (its tokens stay for the prefix
        cache), report the Completion."""
        text = s.stream.finish()
        if text and tail and s.on_token is not None:
            self._emit(s, TokenEvent(None, text))
            if s.handle.done():
                return
        if s.slot >= 0:
            self.slots[s.slot].seq = None
            self.slots[s.slot].last_used = next(self._clock)
            s.slot = -1
        with self._cond:
            if s in self._running:
                self._running.remove(s)
        completion = s.completion(reason, error)
        if s.on_done is not None:
            try:
                s.on_done(completion)
            except Exception as e:
                print(f"warning: on_done of request {s.handle.id} raised {type(e).__name__}: {e}",
                      file=sys.stderr)
        s.handle._set(completion)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
        for s in list(self._running) + waiting:
            if s.slot >= 0:
                self.slots[s.slot].tokens.clear()
            if not s.handle.done():
                self._finish(s, "error", message)

"""A fake scheduler with the contract of dllama_mpi/runtime/scheduler.py (notes/scheduler_api.md)
and a character-level fake tokenizer, for testing the front ends without a model or MPI.

The fake "generates" `reply(prompt_tokens)` (default: the prompt reversed), one token per
step() for every running request, then the end-of-sequence id 0. Stop strings, max_tokens,
the context limit, logprobs, cancellation and a prefix cache (longest common prefix with
earlier sequences) behave as the contract says; on_token/on_done run on the thread that
calls step() (the run() thread)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from dllama_mpi.config import SamplingParams
from dllama_mpi.errors import DllamaError

EOS = 0


@dataclass
class TokenEvent:
    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Completion:
    request_id: str
    prompt_tokens: list[int]
    generated_tokens: list[int]
    text: str
    finish_reason: str
    cached_tokens: int
    prompt_seconds: float
    decode_seconds: float
    error: str | None = None


class FakeTokenizer:
    """One token per character (its code point); token 0 is the end of sequence."""
    vocab_size = 0x110000
    eos_ids = [EOS]
    bos_id = None
    add_bos = False

    def encode(self, text, add_bos=None, parse_special=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != EOS)

    def decoder(self, skip_special_tokens=False):
        return _Decoder()

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        for m in messages:
            if m["role"] == "tool":
                raise ValueError("chat template error: tool messages are not supported")
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class _Decoder:
    def push(self, token):
        return "" if token == EOS else chr(token)

    def flush(self):
        return ""


class FakeHandle:
    def __init__(self, scheduler, request_id):
        self.id = request_id
        self._scheduler = scheduler
        self._event = threading.Event()
        self.completion = None

    def cancel(self):
        self._scheduler._cancel(self)

    def wait(self, timeout=None):
        self._event.wait(timeout)
        return self.completion

    def done(self):
        return self._event.is_set()


class _Seq:
    def __init__(self, handle, prompt, params, on_token, on_done, reply, cached):
        self.handle, self.prompt, self.params = handle, list(prompt), params
        self.on_token, self.on_done = on_token, on_done
        self.reply = list(reply)
        self.generated: list[int] = []
        self.text = ""          # decoded text of the generated tokens (stop string not yet cut)
        self.emitted = 0        # characters of text delivered through events
        self.cancelled = False
        self.cached = cached
        self.t_submit = time.monotonic()
        self.t_first = None


class FakeScheduler:
    def __init__(self, max_seq_len=256, n_slots=4, delay=0.0, reply=None, token_text=chr):
        self.max_seq_len = max_seq_len
        self.token_text = token_text     # the text of one token (the fake tokenizer's: chr)
        self.n_slots = n_slots
        self.delay = delay
        self.reply = reply or (lambda prompt: list(reversed(prompt)))
        self._cond = threading.Condition()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._closed = False
        self._history: list[list[int]] = []
        self._n = 0
        # what the tests look at
        self.submitted: list[tuple[str, list[int], SamplingParams]] = []
        self.cancelled: list[str] = []
        self.finished: list[Completion] = []
        self.tokens_generated_total = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.steps_total = 0

    @property
    def requests_running(self):
        return len(self._running)

    @property
    def requests_waiting(self):
        return len(self._waiting)

    # -- the contract ---------------------------------------------------------------------
    def submit(self, prompt_tokens, params, on_token=None, on_done=None, request_id=None):
        if not prompt_tokens:
            raise DllamaError("the prompt is empty")
        if len(prompt_tokens) >= self.max_seq_len:
            raise DllamaError(f"the prompt ({len(prompt_tokens)} tokens) leaves no room in the "
                              f"context ({self.max_seq_len})")
        params.check()
        with self._cond:
            if self._closed:
                raise DllamaError("the scheduler is closed")
            self._n += 1
            handle = FakeHandle(self, request_id or f"req-{self._n}")
            cached = 0
            for h in self._history:
                k = 0
                while k < min(len(h), len(prompt_tokens) - 1) and h[k] == prompt_tokens[k]:
                    k += 1
                cached = max(cached, k)
            seq = _Seq(handle, prompt_tokens, params, on_token, on_done,
                       self.reply(list(prompt_tokens)), cached)
            self._waiting.append(seq)
            self.submitted.append((handle.id, list(prompt_tokens), params))
            self._cond.notify_all()
        return handle

    def step(self) -> bool:
        calls = []
        with self._cond:
            for seq in [s for s in self._waiting + self._running if s.cancelled]:
                self._finish(seq, "cancelled", calls)
            while self._waiting and len(self._running) < self.n_slots:
                self._running.append(self._waiting.pop(0))
            busy = bool(self._running)
            if busy:
                self.steps_total += 1
            for seq in list(self._running):
                self._advance(seq, calls)
        for fn, arg in calls:
            if fn is not None:
                fn(arg)
        if busy and self.delay:
            time.sleep(self.delay)
        return busy or bool(calls)

    def run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running) and not self._closed:
                    self._cond.wait(0.1)
                if self._closed and not (self._waiting or self._running):
                    return
            self.step()

    def close(self, cancel=False) -> None:
        with self._cond:
            self._closed = True
            if cancel:
                for seq in self._waiting + self._running:
                    if not seq.cancelled:
                        seq.cancelled = True
                        self.cancelled.append(seq.handle.id)
            self._cond.notify_all()

    def generate(self, prompt_tokens, params, on_token=None):
        handle = self.submit(prompt_tokens, params, on_token=on_token)
        while not handle.done():
            self.step()
        return handle.wait()

    # -- internals --------------------------------------------------------------------------
    def _cancel(self, handle):
        with self._cond:
            for seq in self._waiting + self._running:
                if seq.handle is handle and not seq.cancelled:
                    seq.cancelled = True
                    self.cancelled.append(handle.id)
            self._cond.notify_all()

    def _advance(self, seq: _Seq, calls) -> None:
        p = seq.params
        if seq.t_first is None:
            seq.t_first = time.monotonic()
        if len(seq.generated) >= p.max_tokens or len(seq.prompt) + len(seq.generated) >= self.max_seq_len:
            return self._finish(seq, "length", calls)
        i = len(seq.generated)
        token = seq.reply[i] if i < len(seq.reply) else (ord("x") if p.ignore_eos else EOS)
        if token == EOS:
            return self._finish(seq, "stop", calls)
        seq.generated.append(token)
        seq.text += self.token_text(token)
        self.tokens_generated_total += 1
        lp = top = None
        if p.logprobs:
            lp = -0.5
            top = [(token + k, -0.5 - k) for k in range(p.top_logprobs)] if p.top_logprobs else None
        cut = min((seq.text.find(s) for s in p.stop if s in seq.text), default=-1)
        if cut >= 0:
            seq.text = seq.text[:cut]
            text = seq.text[seq.emitted:]
            seq.emitted = len(seq.text)
            calls.append((seq.on_token, TokenEvent(token, text, lp, top)))
            return self._finish(seq, "stop", calls)
        hold = 0   # the longest end of the text that may begin a stop string
        for s in p.stop:
            for k in range(min(len(s) - 1, len(seq.text)), 0, -1):
                if seq.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = max(len(seq.text) - hold, seq.emitted)
        calls.append((seq.on_token, TokenEvent(token, seq.text[seq.emitted:safe], lp, top)))
        seq.emitted = safe

    def _finish(self, seq: _Seq, reason: str, calls) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        now = time.monotonic()
        first = seq.t_first or now
        c = Completion(seq.handle.id, seq.prompt, list(seq.generated), seq.text, reason,
                       seq.cached, first - seq.t_submit, now - first)
        self.prompt_tokens_total += len(seq.prompt)
        self.cached_tokens_total += seq.cached
        self._history.append(seq.prompt + seq.generated)
        self.finished.append(c)
        seq.handle.completion = c

        def done(c, seq=seq):
            if seq.on_done is not None:
                seq.on_done(c)
            seq.handle._event.set()
        calls.append((done, c))

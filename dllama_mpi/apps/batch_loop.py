"""The root's loop of `batch`: requests read lazily from the input, submitted to the scheduler
as slots free up (at most --max-batch sequences in flight), the engine stepped on this (main)
thread, one record written as each request finishes (completion order).

A stop signal only sets a flag (StopFlag); the loop reads it between engine steps: no new
request is admitted, the ones that have not produced a token yet are abandoned at once, the
others get `stop_timeout` seconds to finish, then are abandoned too. An abandoned request has
no record: the next run (the same command) does it again.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

from ..config import SamplingParams
from ..errors import DllamaError
from . import openai_schema as oa
from .batch_io import Item
from .batch_records import Done, RecordWriter, duplicate_error, error_record, ok_record
from .batch_requests import RequestError, answer, prepare, token_texts
from .batch_signals import StopFlag

SEED_MODULUS = 2**63


@dataclass
class Stats:
    total: int = 0               # requests in the input
    read: int = 0                # requests read so far
    skipped: int = 0             # already had a record (an earlier run)
    ok: int = 0
    failed: int = 0              # error records written by this run
    abandoned: int = 0           # stopped before they finished: no record, done next run
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    exhausted: bool = False      # the whole input was read
    stopped_by: str | None = None

    @property
    def complete(self) -> bool:
        """Every request of the input has its record."""
        return self.exhausted and self.abandoned == 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Pending:
    item: Item
    prepared: object
    rid: str
    created: int
    completions: list
    events: list | None
    left: int
    started: bool = False
    handles: list = field(default_factory=list)


class BatchLoop:
    def __init__(self, scheduler, tokenizer, max_seq_len: int, items: Iterator[Item],
                 done: Done, output: RecordWriter, errors: RecordWriter | None,
                 defaults: SamplingParams, seed: int | None, max_batch: int, model_name: str,
                 stop: StopFlag, progress, stop_timeout: float = 60.0):
        """scheduler: the scheduler contract (submit, step, requests_running/waiting), stepped
        here; progress: skip(), record(ok, tokens), tick()."""
        self.sched, self.tokenizer, self.max_seq_len = scheduler, tokenizer, max_seq_len
        self.items, self.done = items, done
        self.output, self.errors = output, errors or output
        self.defaults, self.seed, self.max_batch = defaults, seed, max_batch
        self.model_name, self.stop, self.progress = model_name, stop, progress
        self.stop_timeout = stop_timeout
        self.token_text = token_texts(tokenizer)
        self.first_line: dict[str, int] = {}      # custom_id -> line of its first occurrence
        self.occurrences: dict[str, int] = {}
        self.pending: dict[str, _Pending] = {}
        self.stats = Stats()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Stats:
        t0 = time.perf_counter()
        draining = abandoned_all = False
        deadline = 0.0
        while True:
            if self.stop.count and not draining:
                draining, deadline = True, time.monotonic() + self.stop_timeout
                self.stats.stopped_by = self.stop.name
                print(f"batch: {self.stop.name}: no new requests; {len(self.pending)} running "
                      f"get {self.stop_timeout:g} s to finish", file=sys.stderr, flush=True)
                self._abandon(lambda p: not p.started)
            if draining and not abandoned_all and (
                    self.stop.count > 1 or time.monotonic() >= deadline):
                abandoned_all = True
                self._abandon(lambda p: True)
            if not draining:
                self._top_up()
            if not self.pending:
                break
            if not self.sched.step() and self.pending:
                raise DllamaError("internal error: the scheduler went idle with requests "
                                  "in flight")
            self.output.tick()
            self.errors.tick()
            self.progress.tick()
        self.stats.seconds = time.perf_counter() - t0
        return self.stats

    def _top_up(self) -> None:
        s = self.sched
        while not self.stats.exhausted and s.requests_running + s.requests_waiting < self.max_batch:
            item = next(self.items, None)
            if item is None:
                self.stats.exhausted = True
            else:
                self._take(item)

    def _abandon(self, which) -> None:
        for p in list(self.pending.values()):
            if which(p):
                for h in p.handles:
                    h.cancel()

    # -- one request ------------------------------------------------------------------------
    def _take(self, item: Item) -> None:
        self.stats.read += 1
        cid = item.custom_id
        occurrence = self.occurrences.get(cid, 0)
        self.occurrences[cid] = occurrence + 1
        self.first_line.setdefault(cid, item.line)
        if self.done.has(cid, occurrence):
            self.stats.skipped += 1
            self.progress.skip()
            return
        if occurrence > 0:
            return self._fail(item, duplicate_error(item.line, cid, self.first_line[cid]))
        if item.error is not None:
            return self._fail(item, item.error)
        try:
            prepared = prepare(item.url, item.body, self.tokenizer, self.max_seq_len,
                               self._defaults(item.index))
        except RequestError as e:
            return self._fail(item, e)
        rid = oa.new_id("chatcmpl" if prepared.chat else "cmpl")
        sequences = prepared.sequences()
        p = _Pending(item, prepared, rid, oa.now(), [None] * len(sequences),
                     [[] for _ in sequences] if prepared.params.logprobs else None,
                     len(sequences))
        self.pending[rid] = p
        try:
            for k, (prompt, params) in enumerate(sequences):
                p.handles.append(self.sched.submit(
                    prompt, params, on_token=lambda ev, p=p, k=k: self._on_token(p, k, ev),
                    on_done=lambda c, p=p, k=k: self._on_done(p, k, c),
                    request_id=f"{rid}-{k}"))
        except DllamaError as e:          # prepare() checked what submit checks: unexpected
            del self.pending[rid]
            for h in p.handles:
                h.cancel()
            self._fail(item, RequestError("invalid_body", str(e)))

    def _defaults(self, index: int) -> SamplingParams:
        if self.seed is None:
            return self.defaults
        return replace(self.defaults, seed=(self.seed + index) % SEED_MODULUS)

    def _on_token(self, p: _Pending, k: int, event) -> None:
        p.started = True
        if p.events is not None:
            p.events[k].append(event)

    def _on_done(self, p: _Pending, k: int, completion) -> None:
        p.completions[k] = completion
        p.left -= 1
        if p.left == 0 and self.pending.pop(p.rid, None) is not None:
            self._finished(p)

    def _finished(self, p: _Pending) -> None:
        if any(c.finish_reason == "cancelled" for c in p.completions):
            self.stats.abandoned += 1
            return
        try:
            body = answer(p.prepared, p.completions, p.events, p.rid, p.created,
                          self.model_name, self.token_text)
        except RequestError as e:
            return self._fail(p.item, e)
        self.output.write(ok_record(p.item.custom_id, body))
        u = body["usage"]
        self.stats.ok += 1
        self.stats.prompt_tokens += u["prompt_tokens"]
        self.stats.generated_tokens += u["completion_tokens"]
        self.progress.record(True, u["completion_tokens"])

    def _fail(self, item: Item, e: RequestError) -> None:
        self.errors.write(error_record(item.custom_id, e))
        self.stats.failed += 1
        self.progress.record(False, 0)

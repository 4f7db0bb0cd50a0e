"""The scheduler (runtime/scheduler.py): mixed steps (decode rows + one prompt chunk) give
what each sequence gives alone, requests from other threads, cancellation, stop strings,
the prefix cache, the token budget and logprobs. One process (SerialComm), the tiny model of
tiny.py for results, a scripted fake engine for the policy. References computed here."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig, SamplingParams
from dllama_mpi.errors import DllamaError
from dllama_mpi.runtime.scheduler import Scheduler
from dllama_mpi.runtime.stops import StopMatcher
from dllama_mpi.sampler import Sampler, logprobs_of
from dllama_mpi.runtime.startup import start
from tiny import write_tiny_gguf

MAX_SEQ = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


# -- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("sched") / "q40_9h.gguf"), "q40_9h", "q4_0")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("sched") / "gqa6.gguf"), "gqa6")


def session(path, slots, weights="q40"):
    run = RunConfig(weights_float_type=weights, buffer_float_type="f32", max_seq_len=MAX_SEQ,
                    parallel=slots, nthreads=1)
    return start(SerialComm(), path, run, want_tokenizer=False)


def prompts(vocab, lengths, seed=0):
    r = np.random.default_rng(seed)
    return [r.integers(3, vocab, n).tolist() for n in lengths]


def alone(engine, prompt, n):
    """Greedy tokens by a plain loop: the whole prompt in one forward, then one token a step
    (KV slot 0)."""
    logits, out, pos = engine.forward(prompt, 0), [], len(prompt)
    while len(out) < n:
        out.append(int(np.argmax(logits[-1])))
        if len(out) == n or pos >= MAX_SEQ:
            break
        logits = engine.forward([out[-1]], pos)
        pos += 1
    return out


class Recorder:
    """Wraps an engine: each step's rows (tokens, positions, slots), logit rows and logits."""

    def __init__(self, engine):
        self.engine, self.steps = engine, []

    def forward(self, tokens, pos, all_logits=False, slot=0):
        logits = self.engine.forward(tokens, pos, all_logits, slot)
        self.steps.append(dict(tokens=list(tokens), positions=list(range(pos, pos + len(tokens))),
                               slots=[slot] * len(tokens), logit_rows=[len(tokens) - 1],
                               logits=logits))
        return logits

    def forward_rows(self, tokens, positions, slots, logit_rows=None):
        logits = self.engine.forward_rows(tokens, positions, slots, logit_rows)
        self.steps.append(dict(tokens=list(tokens), positions=list(positions), slots=list(slots),
                               logit_rows=list(range(len(tokens)) if logit_rows is None
                                               else logit_rows), logits=logits))
        return logits


class ScriptEngine:
    """A fake engine: the logits of a row at position p make script[p + 1] the greedy choice
    (the rest: noise seeded by p)."""

    def __init__(self, script, vocab=64):
        self.script, self.vocab, self.steps = list(script), vocab, []

    def _row(self, pos):
        row = np.random.default_rng(pos).normal(size=self.vocab).astype(np.float32)
        row[self.script[pos + 1]] = 20.0
        return row

    def forward(self, tokens, pos, all_logits=False, slot=0):
        self.steps.append(dict(n=len(tokens), slots={slot}))
        return self._row(pos + len(tokens) - 1)[None]

    def forward_rows(self, tokens, positions, slots, logit_rows=None):
        rows = range(len(tokens)) if logit_rows is None else logit_rows
        self.steps.append(dict(n=len(tokens), slots=set(slots)))
        return np.array([self._row(positions[i]) for i in rows], np.float32).reshape(-1, self.vocab)


class PieceDecoder:
    """id -> a fixed piece of text. With hold: ids divisible by 4 are 'incomplete' (held
    until the next push, as split UTF-8 is)."""

    def __init__(self, table, hold=False):
        self.table, self.hold, self.held = table, hold, ""

    def push(self, token):
        self.held += self.table[token]
        if self.hold and token % 4 == 0:
            return ""
        out, self.held = self.held, ""
        return out

    def flush(self):
        out, self.held = self.held, ""
        return out


def c_slot(sched, handle):
    """The slot that holds the prompt of handle's request (its last sequence there)."""
    prompt = handle.wait(0).prompt_tokens
    return next(i for i, sl in enumerate(sched.slots) if sl.tokens[:len(prompt)] == prompt)


def pieces(vocab=64):
    letters = "abcdefghij"
    return {i: letters[i % 10] + letters[(i * 7) % 10] for i in range(vocab)}


# -- the engine: logits of chosen rows, a prompt as a rows chunk --------------------------
@pytest.mark.parametrize("weights", ["q40", "f32"])
def test_prompt_as_rows_chunk_equals_plain_forward(weights, tiny, tiny_f32):
    """A prompt fed as rows (in KV slot 1, with a decode row of slot 0 in the same forward)
    attends causally: its logits equal a plain forward of the prompt alone."""
    path = tiny if weights == "q40" else tiny_f32
    s = session(path, 2, weights)
    other, prompt = prompts(s.config.vocab_size, [5, 13], seed=3)
    s.engine.forward(other, 0, slot=0)
    t = len(prompt)
    rows = s.engine.forward_rows([7] + prompt, [len(other)] + list(range(t)), [0] + [1] * t,
                                 logit_rows=list(range(t + 1)))
    ref = session(path, 1, weights).engine.forward(prompt, 0, all_logits=True)
    np.testing.assert_allclose(rows[1:], ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    # chosen rows only, in the order asked: the same step again, two rows' logits
    chosen = s.engine.forward_rows([7] + prompt, [len(other)] + list(range(t)), [0] + [1] * t,
                                   logit_rows=[t, 0])
    if weights == "q40":
        np.testing.assert_array_equal(chosen, rows[[t, 0]])
    np.testing.assert_allclose(chosen, rows[[t, 0]], rtol=0,
                               atol=1e-5 * float(np.abs(ref).max()))
    assert s.engine.forward_rows([4, 5], [0, 1], [1, 1], logit_rows=[]).shape == (
        0, s.config.vocab_size)


# -- mixed steps -------------------------------------------------------------------------
def test_mixed_steps_equal_sequences_alone(tiny):
    """Five prompts (3..30 tokens) through 3 slots with an 8-token budget: prompts go in
    chunks that share steps with decode rows; each sequence's tokens are its tokens alone."""
    s = session(tiny, 3)
    ps = prompts(s.config.vocab_size, [3, 17, 30, 5, 22])
    n_new = [10, 6, 12, 20, 4]
    rec = Recorder(s.engine)
    sched = Scheduler(rec, n_slots=3, max_seq_len=MAX_SEQ, eos_ids=set(), token_budget=8)
    handles = [sched.submit(p, greedy(n)) for p, n in zip(ps, n_new)]
    while sched.step():
        pass
    ref = session(tiny, 1).engine
    for h, p, n in zip(handles, ps, n_new):
        c = h.wait(0)
        assert c.generated_tokens == alone(ref, p, n)
        assert c.finish_reason == "length" and c.prompt_tokens == p
    mixed = [st for st in rec.steps if len(set(st["slots"])) > 1 and len(st["tokens"]) == 8]
    assert mixed, "no step mixed decode rows with a full prompt chunk"
    assert sched.tokens_generated_total == sum(n_new)
    assert sched.prompt_tokens_total == sum(map(len, ps))
    assert sched.requests_running == sched.requests_waiting == 0
    counters = sched.counters()
    assert counters["steps_total"] == len(rec.steps) and counters["requests_total"] == 5
    assert counters["decode_rows_total"] + counters["prefill_rows_total"] == sum(
        len(st["tokens"]) for st in rec.steps)


def test_token_budget_is_respected(tiny):
    """Every step carries all decode rows and chunks of what is left of the budget: prompts
    in admission order, each chunk but a step's last one ending its prompt (the next prompt
    starts in the same step)."""
    s = session(tiny, 3)
    rec = Recorder(s.engine)
    sched = Scheduler(rec, n_slots=3, max_seq_len=MAX_SEQ, eos_ids=set(), token_budget=6)
    planned, two_chunks, forward = [], 0, sched._forward

    def record(decode, chunks):   # (decode rows, per chunk (slot, rows, whether it ends its prompt))
        planned.append((len(decode), [(pre.slot, len(c), pre.pos + len(c) == len(pre.prompt))
                                      for pre, c in chunks]))
        forward(decode, chunks)
    sched._forward = record
    for p in prompts(s.config.vocab_size, [20, 25, 9, 14], seed=4):
        sched.submit(p, greedy(7))
    while sched.step():
        pass
    assert sched.steps_total == len(rec.steps) == len(planned)
    for st in rec.steps:
        assert len(st["tokens"]) <= 6
    for n_decode, chunks in planned:
        assert n_decode + sum(n for _, n, _ in chunks) <= 6
        assert all(ends for _, _, ends in chunks[:-1])    # every chunk but the last ends its prompt
        two_chunks += len(chunks) > 1
    assert two_chunks                           # a prompt ended and the next began in one step
    full = [st for st in rec.steps if len(st["tokens"]) == 6 and len(set(st["slots"])) > 1]
    assert full                                # decode rows + chunks filling the budget
    assert sched.prefill_rows_total == sum(len(p) for p in prompts(s.config.vocab_size,
                                                                   [20, 25, 9, 14], seed=4))


def test_requests_that_arrive_together_are_prefilled_together(tiny):
    """8 prompts submitted at once, 4 to 7 tokens each (43 in all), budget 32: the first step
    carries the first 6 prompts whole (31 tokens) and 1 token of the 7th; the next, beside the
    6 decode rows, the rest of the 7th and all of the 8th; then all 8 decode together. Each
    sequence's tokens are those it makes alone."""
    s = session(tiny, 8)
    rec = Recorder(s.engine)
    sched = Scheduler(rec, n_slots=8, max_seq_len=MAX_SEQ, eos_ids=set(), token_budget=32)
    ps = prompts(s.config.vocab_size, [4, 5, 6, 7, 4, 5, 6, 6], seed=6)
    handles = [sched.submit(p, greedy(5)) for p in ps]
    while sched.step():
        pass
    first, second, third = rec.steps[:3]
    assert first["slots"] == [sl for sl in range(6) for _ in ps[sl]] + [6]
    assert second["slots"] == list(range(6)) + [6] * 5 + [7] * 6
    assert sorted(third["slots"]) == list(range(8)) and len(third["tokens"]) == 8
    ref = session(tiny, 1).engine
    for p, h in zip(ps, handles):
        assert h.wait(0).generated_tokens == alone(ref, p, 5)


def test_policy_on_a_fake_engine():
    """Two streams decode while a 40-token prompt arrives: every step keeps both decode rows
    and the chunk gets the rest of the budget; with prefill_alone the chunks run alone."""
    for alone_flag in (False, True):
        eng = ScriptEngine(list(range(1, 64)) * 4)
        sched = Scheduler(eng, n_slots=3, max_seq_len=200, eos_ids=set(), token_budget=10,
                          prefill_alone=alone_flag)
        a, b = (sched.submit([1, 2], greedy(30)) for _ in range(2))
        for _ in range(4):
            sched.step()
        c = sched.submit(list(range(1, 41)), greedy(3))
        steps0 = len(eng.steps)
        while not c.done():
            sched.step()
        chunk_steps = eng.steps[steps0:]
        if alone_flag:                       # the prompt alone in 4 steps, then decode
            assert [st["n"] for st in chunk_steps[:4]] == [10, 10, 10, 10]
            assert all(st["slots"] == {c_slot(sched, c)} for st in chunk_steps[:4])
            assert chunk_steps[4]["n"] == 3
        else:                                # 2 decode rows + 8 prompt rows a step
            assert [st["n"] for st in chunk_steps[:5]] == [10, 10, 10, 10, 10]
            assert all(len(st["slots"]) == 3 for st in chunk_steps[:5])
        sched.close(cancel=True)
        while sched.step():
            pass
        assert a.wait(0).finish_reason in ("cancelled", "length")


# -- threads and cancellation --------------------------------------------------------------
def test_requests_from_another_thread(tiny):
    """run() on its own thread; requests submitted while others decode give their tokens
    alone; close() ends run()."""
    s = session(tiny, 2)
    ps = prompts(s.config.vocab_size, [6, 11, 4, 9], seed=5)
    sched = Scheduler(s.engine, n_slots=2, max_seq_len=MAX_SEQ, eos_ids=set(), token_budget=5)
    loop = threading.Thread(target=sched.run)
    loop.start()
    started, gate = threading.Event(), threading.Event()
    first = sched.submit(ps[0], greedy(25), on_token=lambda ev: (started.set(), gate.wait(60)))
    assert started.wait(120)             # the first decodes (held at its first token) ...
    later = [sched.submit(p, greedy(10)) for p in ps[1:]]
    gate.set()                           # ... while the others arrive
    results = [h.wait(120) for h in [first] + later]
    assert sched.generate(ps[1], greedy(10)).generated_tokens == results[1].generated_tokens
    sched.close()
    loop.join(60)
    assert not loop.is_alive()
    with pytest.raises(DllamaError, match="closed"):
        sched.submit(ps[0], GREEDY)
    ref = session(tiny, 1).engine
    for c, p, n in zip(results, ps, [25, 10, 10, 10]):
        assert c.generated_tokens == alone(ref, p, n)


def test_cancel_frees_the_slot(tiny):
    """One slot: a long request cancelled mid-way (from another thread) frees its slot and
    the waiting request runs; a waiting request cancelled never runs."""
    s = session(tiny, 1)
    pa, pb, pc = prompts(s.config.vocab_size, [5, 7, 4], seed=6)
    sched = Scheduler(s.engine, n_slots=1, max_seq_len=MAX_SEQ, eos_ids=set())
    three, gate = threading.Event(), threading.Event()
    events = []

    def on_a(ev):
        events.append(ev)
        if len(events) == 3:             # hold the loop until the cancel is in
            three.set()
            gate.wait(60)

    loop = threading.Thread(target=sched.run)
    a = sched.submit(pa, greedy(50), on_token=on_a)
    b = sched.submit(pb, greedy(6))
    c = sched.submit(pc, greedy(6))
    c.cancel()
    loop.start()
    assert three.wait(120)
    a.cancel()
    gate.set()
    ca, cb, cc = a.wait(120), b.wait(120), c.wait(120)
    sched.close()
    loop.join(60)
    assert ca.finish_reason == "cancelled" and len(ca.generated_tokens) == 3
    assert cc.finish_reason == "cancelled" and cc.generated_tokens == []
    assert cb.finish_reason == "length"
    assert cb.generated_tokens == alone(session(tiny, 1).engine, pb, 6)
    assert sched.slots[0].seq is None


def test_close_cancel_ends_run():
    eng = ScriptEngine(list(range(1, 64)) * 4)
    sched = Scheduler(eng, n_slots=1, max_seq_len=200, eos_ids=set())
    going, gate = threading.Event(), threading.Event()
    h = sched.submit([1], greedy(150), on_token=lambda ev: (going.set(), gate.wait(30)))
    w = sched.submit([2], greedy(5))
    loop = threading.Thread(target=sched.run)
    loop.start()
    assert going.wait(30)
    sched.close(cancel=True)
    gate.set()
    loop.join(30)
    assert not loop.is_alive()
    assert h.wait(0).finish_reason == "cancelled" and w.wait(0).finish_reason == "cancelled"


# -- stop strings --------------------------------------------------------------------------
def _run_text(stop=(), hold=False, eos=(), max_tokens=30, script=None):
    table = pieces()
    eng = ScriptEngine(script or [(i * 5 + 3) % 64 for i in range(200)])
    sched = Scheduler(eng, n_slots=1, max_seq_len=200, eos_ids=set(eos),
                      decoder_factory=lambda: PieceDecoder(table, hold))
    events = []
    c = sched.generate([1, 2, 3], greedy(max_tokens, stop=tuple(stop)), on_token=events.append)
    return c, events, table


@pytest.mark.parametrize("hold", [False, True])
def test_stop_string_split_across_tokens(hold):
    ref, _, table = _run_text(hold=hold)
    text = "".join(table[t] for t in ref.generated_tokens)
    assert ref.text == text and ref.finish_reason == "length"
    stop = text[21:25]                   # starts in token 10's piece, ends in token 12's
    cut = text.find(stop)
    c, events, _ = _run_text([stop, "zzz"], hold=hold)
    assert c.finish_reason == "stop"
    assert c.text == text[:cut]
    assert "".join(ev.text for ev in events) == c.text
    streamed = ""
    for ev in events:                    # never the stop string, and no more held than needed
        streamed += ev.text
        assert stop not in streamed
    k = next(i for i in range(1, 31) if len("".join(table[t] for t in
                                                    ref.generated_tokens[:i])) >= cut + len(stop))
    if not hold:
        assert c.generated_tokens == ref.generated_tokens[:k]
        produced = emitted = ""
        for ev in events:                # held back: at most a proper prefix of the stop
            produced += table[ev.token]
            emitted += ev.text
            assert len(produced) - len(emitted) <= len(stop) - 1 or ev is events[-1]


def test_stop_string_in_one_token_and_earliest_wins():
    ref, _, table = _run_text()
    text = ref.text
    stops = [text[10:12], text[4:8]]     # token 5's whole piece; tokens 2-3
    c, events, _ = _run_text(stops)
    assert c.text == text[:min(text.find(st) for st in stops)] and c.finish_reason == "stop"
    assert "".join(ev.text for ev in events) == c.text


def test_held_text_released_at_a_stop_id():
    """Text held back as a possible stop string comes out when a stop id ends the sequence
    (an event without a token), and in Completion.text."""
    ref, _, table = _run_text()
    gen = ref.generated_tokens
    n = next(j for j in range(3, len(gen)) if gen.index(gen[j]) == j)   # a first occurrence
    eos = gen[n]
    before = "".join(table[t] for t in ref.generated_tokens[:n])
    stop = before[-1] + "#"              # the last character could start it: held
    c, events, _ = _run_text([stop], eos=[eos])
    assert c.finish_reason == "stop" and c.generated_tokens == ref.generated_tokens[:n]
    assert c.text == before == "".join(ev.text for ev in events)
    assert events[-1].token is None and events[-1].text == before[-1]


def test_stop_matcher_by_characters():
    m = StopMatcher(["abc", "bd"])
    out = [m.feed(ch) for ch in "xxabab"]
    assert "".join(o for o, _ in out) == "xxab" and m.held == "ab"
    assert m.feed("d") == ("a", True)
    m = StopMatcher(["\n\n"])
    assert m.feed("hi\n") == ("hi", False) and m.feed("x") == ("\nx", False)


# -- prefix cache --------------------------------------------------------------------------
def test_prefix_cache_equals_recomputation(tiny):
    """Turn 2 = turn 1's prompt + its answer + more: its slot's tokens are reused (cached
    tokens reported), and the tokens equal recomputation, with and without the cache."""
    s = session(tiny, 2)
    p1, more = prompts(s.config.vocab_size, [10, 5], seed=7)
    rec = Recorder(s.engine)
    sched = Scheduler(rec, n_slots=2, max_seq_len=MAX_SEQ, eos_ids=set(), token_budget=16)
    t1 = sched.generate(p1, greedy(8))
    assert t1.cached_tokens == 0
    p2 = p1 + t1.generated_tokens + more
    steps = len(rec.steps)
    t2 = sched.generate(p2, greedy(8))
    assert t2.cached_tokens == len(p1) + len(t1.generated_tokens) - 1
    assert sum(len(st["tokens"]) for st in rec.steps[steps:]) == len(p2) - t2.cached_tokens + 7
    again = sched.generate(p1, greedy(8))         # a prompt the slot holds whole
    assert again.cached_tokens == len(p1) - 1
    assert sched.cached_tokens_total == t2.cached_tokens + again.cached_tokens
    fresh = Scheduler(session(tiny, 1).engine, n_slots=1, max_seq_len=MAX_SEQ, eos_ids=set(),
                      prefix_cache=False)
    t2_nocache = fresh.generate(p2, greedy(8))
    assert t2_nocache.cached_tokens == 0
    ref = session(tiny, 1).engine
    assert t2.generated_tokens == t2_nocache.generated_tokens == alone(ref, p2, 8)
    assert again.generated_tokens == t1.generated_tokens == alone(ref, p1, 8)


def test_prefix_cache_picks_the_longest_prefix_then_lru():
    eng = ScriptEngine(list(range(1, 64)) * 4)
    sched = Scheduler(eng, n_slots=3, max_seq_len=200, eos_ids=set())
    a = sched.submit([5, 6, 7, 8], greedy(2))
    b = sched.submit([9, 10, 11], greedy(2))
    while sched.step():
        pass
    slot_a = next(i for i, sl in enumerate(sched.slots) if sl.tokens[:1] == [5])
    slot_b = next(i for i, sl in enumerate(sched.slots) if sl.tokens[:1] == [9])
    assert a.done() and b.done()
    c = sched.generate([9, 10, 11, 12, 13], greedy(1))
    assert c.cached_tokens == 3
    assert sched.slots[slot_b].tokens[:5] == [9, 10, 11, 12, 13]
    d = sched.generate([40, 41], greedy(1))          # no shared prefix: the never-used slot
    assert d.cached_tokens == 0
    unused = ({0, 1, 2} - {slot_a, slot_b}).pop()
    assert sched.slots[unused].tokens[:2] == [40, 41]
    e = sched.generate([50, 51], greedy(1))          # then the least recently used: a's
    assert sched.slots[slot_a].tokens[:2] == [50, 51] and e.cached_tokens == 0


# -- logprobs, sampling, checks ------------------------------------------------------------
def _log_softmax(row):
    z = row.astype(np.float64)
    return z - z.max() - np.log(np.sum(np.exp(z - z.max())))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_are_log_softmax_of_the_logits(tiny, temperature):
    s = session(tiny, 1)
    rec = Recorder(s.engine)
    sched = Scheduler(rec, n_slots=1, max_seq_len=MAX_SEQ, eos_ids=set())
    events = []
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=6, logprobs=True,
                            top_logprobs=4)
    c = sched.generate(prompts(s.config.vocab_size, [7], seed=8)[0], params,
                       on_token=events.append)
    assert [ev.token for ev in events] == c.generated_tokens
    for ev, st in zip(events, rec.steps):
        lp = _log_softmax(st["logits"][-1])
        assert ev.logprob == pytest.approx(lp[ev.token], abs=1e-9)
        order = np.argsort(-lp, kind="stable")[:4]
        assert [t for t, _ in ev.top_logprobs] == order.tolist()
        np.testing.assert_allclose([v for _, v in ev.top_logprobs], lp[order], atol=1e-9)
    plain = Scheduler(rec, n_slots=1, max_seq_len=MAX_SEQ, eos_ids=set())
    ev2 = []
    plain.generate([5, 6], greedy(2), on_token=ev2.append)
    assert ev2[0].logprob is None and ev2[0].top_logprobs is None


def test_seeded_sampling_matches_a_sampler_alone(tiny):
    """Each request's own seeded Sampler: the same tokens in a batch as alone."""
    s = session(tiny, 3)
    ps = prompts(s.config.vocab_size, [4, 9, 6], seed=9)
    sched = Scheduler(s.engine, n_slots=3, max_seq_len=MAX_SEQ, eos_ids=set(), token_budget=4)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=12) for i in range(3)]
    hs = [sched.submit(p, pr) for p, pr in zip(ps, params)]
    while sched.step():
        pass
    ref = session(tiny, 1).engine
    for h, p, pr in zip(hs, ps, params):
        sample, logits, out = Sampler.from_params(pr), ref.forward(p, 0), []
        for pos in range(len(p), len(p) + 12):
            out.append(sample(logits[-1]))
            logits = ref.forward([out[-1]], pos)
        assert h.wait(0).generated_tokens == out


def test_logprobs_of_ties_and_top():
    row = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    lp, top = logprobs_of(row, 3, 3)
    ref = _log_softmax(row)
    assert lp == pytest.approx(ref[3]) and [t for t, _ in top] == [1, 2, 0]


def test_submit_checks_and_zero_tokens():
    eng = ScriptEngine(list(range(1, 64)) * 4)
    sched = Scheduler(eng, n_slots=1, max_seq_len=20, eos_ids=set())
    with pytest.raises(DllamaError, match="empty"):
        sched.submit([], GREEDY)
    with pytest.raises(DllamaError, match="prompt has 20 tokens"):
        sched.submit(list(range(20)), GREEDY)
    with pytest.raises(DllamaError, match="temperature"):
        sched.submit([1], SamplingParams(temperature=-1))
    with pytest.raises(DllamaError, match="stop strings"):
        sched.submit([1], greedy(3, stop=("x",)))
    assert sched.requests_waiting == 0
    c = sched.generate([1, 2], greedy(0))
    assert c.finish_reason == "length" and c.generated_tokens == [] and eng.steps == []
    c = sched.generate([1, 2], greedy(50))            # the context end
    assert c.finish_reason == "length" and len(c.generated_tokens) == 20 - 2 + 1


def test_a_failing_callback_ends_only_its_request():
    eng = ScriptEngine(list(range(1, 64)) * 4)
    sched = Scheduler(eng, n_slots=2, max_seq_len=100, eos_ids=set())

    def bad(ev):
        raise RuntimeError("boom")

    h = sched.submit([1, 2], greedy(5), on_token=bad)
    ok = sched.submit([3], greedy(5))
    while sched.step():
        pass
    assert h.wait(0).finish_reason == "error" and "boom" in h.wait(0).error
    assert ok.wait(0).finish_reason == "length" and len(ok.wait(0).generated_tokens) == 5
    assert all(sl.seq is None for sl in sched.slots)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["wörld 🙂", "🙂 e", "ö", "d 🙂"])
def test_stop_strings_with_the_real_streaming_decoder(stop):
    """SmolLM2's byte-level tokenizer splits 'ö' and '🙂' over several tokens (the decoder
    holds incomplete UTF-8): the text is cut before the stop string all the same."""
    from dllama_mpi.runtime.stops import TextStream
    from dllama_mpi.tokenizer import Tokenizer
    from tiny import smollm2_path
    tok = Tokenizer.from_gguf(smollm2_path())
    text = "héllo wörld 🙂 end of the wörld"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    stream = TextStream(tok.decoder(), (stop,))
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(stream.push(t, last=i == len(ids) - 1))
        assert stop not in "".join(pieces)
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == stream.text == text[:text.find(stop)]

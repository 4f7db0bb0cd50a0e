"""Several sequences decoding together (KV slots, engine.forward_rows, generate_batch) give
what each sequence gives alone."""
from __future__ import annotations

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.errors import DllamaError
from dllama_mpi.runtime.generation import generate, generate_batch
from dllama_mpi.sampler import Sampler
from dllama_mpi.runtime.startup import start
from tiny import write_tiny_gguf

MAX_SEQ = 48


@pytest.fixture(scope="module")
def tiny_q40(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("batch") / "q40_9h.gguf"), "q40_9h", "q4_0")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("batch") / "gqa6.gguf"), "gqa6")


def _session(path, weights, parallel):
    run = RunConfig(weights_float_type=weights, buffer_float_type="f32", max_seq_len=MAX_SEQ,
                    parallel=parallel, nthreads=1)
    return start(SerialComm(), path, run, want_tokenizer=False)


def _prompts(vocab, n, seed=0):
    r = np.random.default_rng(seed)
    return [r.integers(3, vocab, int(r.integers(1, 12))).tolist() for _ in range(n)]


def _alone(path, weights, prompts, max_new, samplers, stop_ids=frozenset()):
    s = _session(path, weights, 1)
    return [generate(s.engine, p, m, sm, set(stop_ids), MAX_SEQ)
            for p, m, sm in zip(prompts, max_new, samplers)]


@pytest.mark.parametrize("weights,slots", [("q40", 3), ("q40", 8), ("f32", 4)])
def test_batch_equals_alone_greedy(weights, slots, tiny_q40, tiny_f32):
    """7 prompts of different lengths and budgets through 3, 4 or 8 slots (slots are reused
    as sequences finish): each sequence's tokens are those it makes alone."""
    path = tiny_q40 if weights == "q40" else tiny_f32
    s = _session(path, weights, slots)
    prompts = _prompts(s.config.vocab_size, 7)
    max_new = [5, 12, 1, 30, 8, 40, 3]
    greedy = [lambda l: int(np.argmax(l))] * 7
    batch = generate_batch(s.engine, prompts, max_new, greedy, set(), MAX_SEQ, slots)
    alone = _alone(path, weights, prompts, max_new, greedy)
    for b, a in zip(batch.generations, alone):
        assert b.generated_tokens == a.generated_tokens
        assert b.finish_reason == a.finish_reason
    # the context end stops a sequence as it stops alone (prompt + 40 > 48 positions)
    assert len(batch.generations[5].generated_tokens) == min(40, MAX_SEQ - len(prompts[5]) + 1)
    assert batch.decode_tokens == sum(len(g.generated_tokens) - 1 for g in batch.generations)
    assert batch.decode_steps < batch.decode_tokens      # rows of several sequences per step


def test_batch_sampling_and_stop_ids(tiny_q40):
    """Temperature sampling with a seed per sequence, and a stop id: same as alone."""
    s = _session(tiny_q40, "q40", 4)
    prompts = _prompts(s.config.vocab_size, 6, seed=1)
    max_new = [20] * 6
    stop = {17, 42, 99}
    mk = lambda: [Sampler(1.0, 0.9, 0, seed) for seed in range(6)]  # noqa: E731
    batch = generate_batch(s.engine, prompts, max_new, mk(), stop, MAX_SEQ, 4)
    alone = _alone(tiny_q40, "q40", prompts, max_new, mk(), stop)
    assert [g.generated_tokens for g in batch.generations] == [g.generated_tokens for g in alone]
    assert [g.finish_reason for g in batch.generations] == [g.finish_reason for g in alone]


def test_forward_rows_logits_match_single_sequences(tiny_f32):
    """F32 weights: the logits of a decode step of three sequences at different positions
    equal each sequence's own forward (BLAS may round a batch differently: tight tolerance)."""
    s = _session(tiny_f32, "f32", 3)
    prompts = _prompts(s.config.vocab_size, 3, seed=2)
    for slot, p in enumerate(prompts):
        s.engine.forward(p, 0, slot=slot)
    nxt = [5, 6, 7]
    rows = s.engine.forward_rows(nxt, [len(p) for p in prompts], [0, 1, 2])
    single = _session(tiny_f32, "f32", 1)
    for i, p in enumerate(prompts):
        ref = single.engine.forward(p + [nxt[i]], 0)[-1]
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(rows[i], ref, rtol=0, atol=1e-5 * scale)


def test_batch_rejects_a_bad_prompt_before_running(tiny_q40):
    s = _session(tiny_q40, "q40", 2)
    steps = len(s.engine.steps)
    with pytest.raises(DllamaError, match="prompt has 60 tokens"):
        generate_batch(s.engine, [[5, 6], [7] * 60], [4, 4], [np.argmax] * 2, set(), MAX_SEQ, 2)
    with pytest.raises(DllamaError, match="empty"):
        generate_batch(s.engine, [[5, 6], []], [4, 4], [np.argmax] * 2, set(), MAX_SEQ, 2)
    assert len(s.engine.steps) == steps                   # nothing ran

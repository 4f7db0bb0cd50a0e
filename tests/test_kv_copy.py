"""A prompt prefix another KV slot already holds is copied, not recomputed: the n choices of
one prompt and requests sharing a system prompt prefill it once. Results equal recomputation
(greedy), on one process here and on N ranks in tests/mpi/test_kv_copy_parity.py."""
import numpy as np

from dllama_mpi.config import SamplingParams
from dllama_mpi.runtime.scheduler import MIN_COPY_POSITIONS, Scheduler
from test_scheduler import MAX_SEQ, alone, prompts, session, tiny  # noqa: F401 (fixture)


def _run(engine, reqs, slots, prefix_cache=True):
    sch = Scheduler(engine, n_slots=slots, max_seq_len=MAX_SEQ, eos_ids=set(),
                    prefix_cache=prefix_cache)
    handles = [sch.submit(p, SamplingParams(temperature=0.0, max_tokens=n)) for p, n in reqs]
    while sch.step():
        pass
    return sch, [h.wait(0) for h in handles]


def test_n_choices_of_one_prompt_prefill_it_once(tiny):  # noqa: F811
    s = session(tiny, 3)
    (p,) = prompts(s.config.vocab_size, [MIN_COPY_POSITIONS + 9], seed=4)
    sch, done = _run(s.engine, [(p, 6)] * 3, 3)
    assert sch.kv_copies_total == 2
    assert [c.cached_tokens for c in done] == [0, len(p) - 1, len(p) - 1]
    expected = alone(session(tiny, 1).engine, p, 6)
    assert all(c.generated_tokens == expected for c in done)


def test_a_shared_system_prompt_is_copied_from_a_running_sequence(tiny):  # noqa: F811
    s = session(tiny, 2)
    system, a, b = prompts(s.config.vocab_size, [MIN_COPY_POSITIONS + 4, 5, 7], seed=7)
    reqs = [(system + a, 12), (system + b, 5)]
    sch, done = _run(s.engine, reqs, 2)
    assert sch.kv_copies_total == 1 and done[1].cached_tokens == len(system)
    plain = session(tiny, 1).engine
    assert [c.generated_tokens for c in done] == [alone(plain, p, n) for p, n in reqs]
    _, recomputed = _run(session(tiny, 2).engine, reqs, 2, prefix_cache=False)
    assert [c.generated_tokens for c in recomputed] == [c.generated_tokens for c in done]


def test_a_short_shared_prefix_is_recomputed(tiny):  # noqa: F811
    s = session(tiny, 2)
    system, a, b = prompts(s.config.vocab_size, [MIN_COPY_POSITIONS - 4, 5, 7], seed=9)
    sch, done = _run(s.engine, [(system + a, 3), (system + b, 3)], 2)
    assert sch.kv_copies_total == 0 and done[1].cached_tokens == 0


def test_copy_prefix_moves_exactly_those_positions():
    from dllama_mpi.kvcache import KVCache
    kv = KVCache(2, 8, 1, 4, n_slots=3)
    kv.k[...] = np.arange(kv.k.size, dtype=np.float32).reshape(kv.k.shape)
    kv.v[...] = -kv.k
    before = kv.k.copy()
    kv.copy_prefix(0, 2, 5)
    assert np.array_equal(kv.k[:, 2, :5], before[:, 0, :5])
    assert np.array_equal(kv.k[:, 2, 5:], before[:, 2, 5:])
    assert np.array_equal(kv.k[:, :2], before[:, :2]) and np.array_equal(kv.v, -kv.k)

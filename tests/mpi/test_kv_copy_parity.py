"""On N ranks, a KV prefix copied between slots (the n choices of one prompt, a shared
system prompt) gives the tokens one process computes without any copy."""
import os

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig, SamplingParams
from dllama_mpi.runtime.scheduler import MIN_COPY_POSITIONS, Scheduler
from dllama_mpi.runtime.startup import run_root, start
from mpi_util import agree, on_root
from tiny import write_tiny_gguf

MAX_SEQ = 64


def _generate(engine, reqs, prefix_cache):
    sch = Scheduler(engine, n_slots=3, max_seq_len=MAX_SEQ, eos_ids=set(),
                    prefix_cache=prefix_cache)
    handles = [sch.submit(p, SamplingParams(temperature=0.0, max_tokens=n)) for p, n in reqs]
    while sch.step():
        pass
    return sch.kv_copies_total, [h.wait(0).generated_tokens for h in handles]


@pytest.mark.mpi(min_size=2)
def test_copied_prefixes_equal_recomputation(comm, shared_dir):
    path = on_root(comm, lambda: write_tiny_gguf(
        os.path.join(shared_dir, "copy-q4_0.gguf"), "q40_9h", "q4_0"))
    run = RunConfig(max_seq_len=MAX_SEQ, parallel=3, nthreads=1, buffer_float_type="f32")
    s = start(comm, path, run, want_tokenizer=False)
    r = np.random.default_rng(3)
    system = r.integers(3, s.config.vocab_size, MIN_COPY_POSITIONS + 6).tolist()
    reqs = [(system, 5), (system, 5), (system + [7, 8, 9], 6)]
    got = []
    assert run_root(s, lambda s: got.append(_generate(s.engine, reqs, True))) == 0
    if comm.is_root:
        alone = start(SerialComm(), path, run, want_tokenizer=False)
        copies, tokens = got[0]
        _, expected = _generate(alone.engine, reqs, False)
        agree(comm, copies == 2 and tokens == expected, f"{copies} copies, {tokens} != {expected}")
    else:
        agree(comm, None)

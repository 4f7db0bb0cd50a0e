"""Several sequences decoding together on N ranks (rows with their own positions and KV
slots cross MPI in the step packet) give the tokens of one process decoding each alone."""
import os

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.generation import generate, generate_batch
from dllama_mpi.runtime.startup import start
from mpi_util import agree, on_root
from tiny import write_tiny_gguf

MAX_SEQ = 48


def _prompts(vocab, n):
    r = np.random.default_rng(5)
    return [r.integers(3, vocab, int(r.integers(1, 10))).tolist() for _ in range(n)]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("weights,wire", [("f32", "f32"), ("q40", "f32")])
def test_batch_on_n_ranks_equals_alone_in_one_process(comm, shared_dir, weights, wire):
    gguf_type = "q4_0" if weights == "q40" else "f32"
    path = on_root(comm, lambda: write_tiny_gguf(
        os.path.join(shared_dir, f"q40_9h-{gguf_type}.gguf"), "q40_9h", gguf_type))
    run = RunConfig(weights_float_type=weights, buffer_float_type=wire, max_seq_len=MAX_SEQ,
                    parallel=3, nthreads=1)
    s = start(comm, path, run, want_tokenizer=False)
    if not comm.is_root:
        s.engine.run_worker_loop()
        agree(comm, None)
        return
    prompts = _prompts(s.config.vocab_size, 5)
    max_new = [6, 20, 3, 40, 9]
    greedy = [lambda l: int(np.argmax(l))] * 5
    batch = generate_batch(s.engine, prompts, max_new, greedy, set(), MAX_SEQ, 3)
    s.engine.stop()
    alone_session = start(SerialComm(), path, RunConfig(
        weights_float_type=weights, buffer_float_type=wire, max_seq_len=MAX_SEQ, nthreads=1),
        want_tokenizer=False)
    alone = [generate(alone_session.engine, p, m, greedy[0], set(), MAX_SEQ).generated_tokens
             for p, m in zip(prompts, max_new)]
    got = [g.generated_tokens for g in batch.generations]
    agree(comm, got == alone, f"{comm.size} ranks, batch {got} != alone {alone}")

"""`plan` on N ranks: every rank holds the bytes the plan predicts (start-up's own report)
and each decode token moves the bytes it predicts, rank by rank, as comm.py counts them."""
import os

import numpy as np
import pytest

from dllama_mpi import predict
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.generation import generate
from dllama_mpi.runtime.startup import run_root, start
from mpi_util import agree, on_root
from tiny import write_tiny_gguf


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("gguf_type,weights,wire", [("q4_0", "auto", "q80"), ("f32", "q41", "q80"),
                                                    ("f32", "f32", "f32")])
def test_plan_equals_a_run(comm, shared_dir, gguf_type, weights, wire):
    path = on_root(comm, lambda: write_tiny_gguf(
        os.path.join(shared_dir, f"plan-{gguf_type}.gguf"), "q40_9h", gguf_type))
    s = start(comm, path, RunConfig(weights_float_type=weights, buffer_float_type=wire,
                                    max_seq_len=32, nthreads=1, parallel=2),
              want_tokenizer=False)
    row = s.engine.embedding.empty(1).nbytes

    def body(session):
        generate(session.engine, [1, 5, 9], 6, lambda l: int(np.argmax(l)), set(), 32)

    steps = []
    assert run_root(s, body, lambda _, st: steps.append(st)) == 0
    ok = msg = None
    if comm.is_root:
        p = predict.make_plan(s.config, s.run, comm.size, predict.LINKS["1gbe"],
                              predict.Machine(), row)
        measured = {(x.bytes_sent, x.bytes_recv) for st in steps[0] for x in st if x.n_tokens == 1}
        decode = [{(x.bytes_sent, x.bytes_recv) for x in st if x.n_tokens == 1} for st in steps[0]]
        predicted = [{(t.sent, t.recv)} for t in p.traffic]
        ok = decode == predicted and p.memory == s.memory and len(measured) >= 1
        msg = f"{comm.size} ranks: measured {decode} vs plan {predicted}; memory {s.memory} vs {p.memory}"
    agree(comm, ok, msg)

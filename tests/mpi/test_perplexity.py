"""Perplexity on N ranks equals one process's (F32 weights and wire) and the default 4-bit
path's on every rank count."""
import os

import pytest

from dllama_mpi.apps.perplexity import evaluate
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.startup import start
from mpi_util import agree, on_root
from tiny import SHAPES, hf_model

TEXT = ("It was the best of times, it was the worst of times; the quick brown fox jumps over "
        "the lazy dog while seven wise owls count the stars. ") * 2


def write_model(path: str, shape: str, weight_type: str) -> str:
    from dllama_mpi.testing import write_llama_gguf
    m = hf_model(shape, seed=2)
    tensors = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    write_llama_gguf(path, **SHAPES[shape], context_length=256, tensors=tensors,
                     weight_type=weight_type, tokenizer="bytes")
    return path


def perplexity(comm, path, weights, wire):
    s = start(comm, path, RunConfig(weights_float_type=weights, buffer_float_type=wire,
                                    max_seq_len=64, prefill_chunk=24, nthreads=1))
    if not comm.is_root:
        s.engine.run_worker_loop()
        return None
    r = evaluate(s.engine, s.tokenizer.encode(TEXT), 64, 24, 24)
    s.engine.stop()
    return r


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("weights,wire,file_type", [("f32", "f32", "f32"), ("q40", "q80", "q4_0")])
def test_perplexity_equals_one_process(comm, shared_dir, weights, wire, file_type):
    path = on_root(comm, lambda: write_model(os.path.join(shared_dir, f"m-{file_type}.gguf"),
                                             "q40_9h", file_type))
    r = perplexity(comm, path, weights, wire)
    ok = msg = None
    if comm.is_root:
        one = perplexity(SerialComm(), path, weights, wire)
        # F32: the partial sums of in-split matrices are added in another order on N ranks
        # (float rounding only); Q80 wire: each rank's partial sum is rounded to 8 bits
        tol = 1e-6 if wire == "f32" else 2e-2
        rel = abs(r.perplexity / one.perplexity - 1)
        ok = r.nll.size == one.nll.size and rel <= tol
        msg = (f"{comm.size} ranks: {r.perplexity!r} vs one process {one.perplexity!r} "
               f"(relative {rel:.2e} > {tol})")
    agree(comm, ok, msg)

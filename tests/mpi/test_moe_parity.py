"""Mixtures of experts on N ranks (`mpiexec -n N bash tests/mpi/run_rank.sh tests/mpi`):
tiny random Qwen3-MoE and Mixtral (tests/tiny.py MOE_SHAPES: every expert's 96 units split
over the ranks like a dense FFN) as GGUF and HF folders. On N ranks the logits match
transformers, direct loading gives the bits of scatter loading, greedy tokens equal one
process's, and every rank holds what memory.py predicts."""
import os

import numpy as np
import pytest

from dllama_mpi import memory
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.startup import run_root, start
from mpi_util import agree, on_root
from tiny import hf_moe_logits, our_greedy, our_logits, save_hf_moe, tolerance, write_moe_gguf

IDS = [1, 17, 42, 99, 3, 150, 7, 64]
CASES = [(shape, form) for shape in ("qwen3moe", "mixtral") for form in ("gguf", "hf")]


def moe_file(comm, shared_dir, shape, form, weight_type="f32"):
    path = os.path.join(shared_dir, f"{shape}-{weight_type}" + (".gguf" if form == "gguf" else ""))

    def make():
        if not os.path.exists(path):
            if form == "gguf":
                write_moe_gguf(path, shape, weight_type)
            else:
                save_hf_moe(path, shape)
        return path
    return on_root(comm, make)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape,form", CASES)
def test_moe_on_n_ranks(comm, shared_dir, shape, form):
    path = moe_file(comm, shared_dir, shape, form)
    scatter = our_logits(comm, path, IDS, load="scatter")
    direct = our_logits(comm, path, IDS, load="direct")
    tokens = our_greedy(comm, path, IDS[:3], 8)
    ok, msg = None, ""
    if comm.is_root:
        ref = hf_moe_logits(shape, IDS)
        err = float(np.abs(scatter - ref).max())
        one = our_greedy(SerialComm(), path, IDS[:3], 8)
        checks = {f"logits within {tolerance(ref):.2e} of transformers (max |diff| {err:.2e})":
                  err <= tolerance(ref),
                  "direct loading gives the bits of scatter loading":
                  np.array_equal(direct, scatter),
                  f"greedy tokens {tokens} equal one process's {one}": tokens == one}
        ok = all(checks.values())
        msg = f"{shape} {form} on {comm.size} ranks: failed: " + \
            "; ".join(k for k, v in checks.items() if not v)
    agree(comm, ok, msg)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape,weight_type", [("mixtral", "f32"), ("qwen3moe", "q4_0")])
def test_every_rank_holds_what_memory_predicts(comm, shared_dir, shape, weight_type):
    path = moe_file(comm, shared_dir, shape, "gguf", weight_type)
    s = start(comm, path, RunConfig(max_seq_len=20, nthreads=1), want_tokenizer=False)
    held = comm.allgather_obj((s.engine.model.w.nbytes(), s.engine.model.kv.nbytes))
    assert run_root(s, lambda _: None) == 0
    predicted = [(m.weights, m.kv_cache) for m in memory.per_rank(s.config, s.run, comm.size)]
    agree(comm, held == predicted if comm.is_root else None, f"held {held} != {predicted}")

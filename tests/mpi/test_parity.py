"""The split across ranks: run under `mpiexec -n N python -m mpi4py -m pytest --with-mpi tests/mpi`.

Every rank runs the same test; the root computes the verdict (against transformers and
against the same model in one process) and broadcasts it, so all ranks assert alike.
"""
import os

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.runtime.startup import StartupFailed
from mpi_util import agree
from tiny import (SHAPES, hf_logits, our_greedy, our_logits, smollm2_path, tolerance,
                  write_tiny_gguf)

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]


def tiny_file(comm, shared_dir, shape, weight_type="f32"):
    path = os.path.join(shared_dir, f"{shape}-{weight_type}.gguf")
    if comm.is_root and not os.path.exists(path):
        write_tiny_gguf(path, shape, weight_type=weight_type)
    comm.barrier()
    return path


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logits_match_transformers_on_n_ranks(comm, shared_dir, shape):
    path = tiny_file(comm, shared_dir, shape)
    if comm.size > SHAPES[shape]["n_heads"]:
        with pytest.raises(StartupFailed):  # one clear error from the root, every rank exits
            our_logits(comm, path, IDS)
        return
    logits = our_logits(comm, path, IDS)
    ok, msg = None, ""
    if comm.is_root:
        ref = hf_logits(shape, IDS)
        err = float(np.abs(logits - ref).max())
        ok, msg = err <= tolerance(ref), f"{comm.size} ranks: max |diff| {err} > {tolerance(ref)}"
    agree(comm, ok, msg)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("weights,wire", [("f32", "f32"), ("q40", "q80"), ("q40", "f32")])
def test_greedy_tokens_equal_one_rank(comm, shared_dir, weights, wire):
    """Same greedy tokens on N ranks as in one process. Q40 uses a Q4_0 file (identical
    bits on every rank count); with the Q80 wire the partial sums are rounded per rank, so
    there only the logits are compared, within the Q80 rounding."""
    shape = "q40_9h"
    path = tiny_file(comm, shared_dir, shape, "q4_0" if weights == "q40" else "f32")
    tokens = our_greedy(comm, path, IDS[:5], 24, weights=weights, wire=wire)
    logits = our_logits(comm, path, IDS, weights=weights, wire=wire)
    ok, msg = None, ""
    if comm.is_root:
        one = our_greedy(SerialComm(), path, IDS[:5], 24, weights=weights, wire=wire)
        one_logits = our_logits(SerialComm(), path, IDS, weights=weights, wire=wire)
        if wire == "f32":
            ok = tokens == one and np.abs(logits - one_logits).max() <= tolerance(one_logits)
        else:
            rel = np.linalg.norm(logits - one_logits) / np.linalg.norm(one_logits)
            ok = rel < 0.05 and (logits.argmax(-1) == one_logits.argmax(-1)).mean() >= 0.75
        msg = f"{comm.size} ranks: {tokens} vs one process {one}"
    agree(comm, ok, msg)


@pytest.mark.mpi(min_size=2)
def test_q80_wire_is_identical_on_every_rank(comm):
    """The Q80 all-gather sums in rank order: every rank holds the same bits."""
    rng = np.random.default_rng(comm.rank)
    partial = rng.standard_normal((3, 96)).astype(np.float32)
    total = comm.allreduce_sum(partial, "q80").copy()
    everyone = comm.allgather_obj(total)
    exact = np.sum([np.random.default_rng(r).standard_normal((3, 96)).astype(np.float32)
                    for r in range(comm.size)], axis=0)
    assert all(np.array_equal(everyone[0], t) for t in everyone)
    # each rank's partial is rounded to 8 bits: error <= size * (amax/127)/2 per value
    assert np.abs(total - exact).max() <= comm.size * 4.5 / 127 / 2 + 1e-6


@pytest.mark.mpi(min_size=2)
def test_f32_allreduce_known_sum(comm):
    x = np.full((2, 64), comm.rank + 1, np.float32)
    total = comm.allreduce_sum(x, "f32")
    assert np.all(total == comm.size * (comm.size + 1) / 2)


@pytest.mark.mpi(min_size=2)
def test_smollm2_greedy_f32_identical_to_one_rank(comm):
    path = smollm2_path() if comm.is_root else None
    path = comm.bcast_obj(path)
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    tokens = our_greedy(comm, path, prompt, 32, max_seq_len=64)
    ok, msg = None, ""
    if comm.is_root:
        one = our_greedy(SerialComm(), path, prompt, 32, max_seq_len=64)
        ok, msg = tokens == one, f"{comm.size} ranks {tokens}\n1 rank {one}"
    agree(comm, ok, msg)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("weights", ["f32", "q40"])
def test_direct_load_equals_scatter(comm, shared_dir, weights):
    """Every rank reading its own slices gives the same bits as the root sending them."""
    path = tiny_file(comm, shared_dir, "q40_9h", "q4_0")
    direct = our_logits(comm, path, IDS, weights=weights, load="direct")
    scatter = our_logits(comm, path, IDS, weights=weights, load="scatter")
    ok = None
    if comm.is_root:
        ok = np.array_equal(direct, scatter)
    agree(comm, ok, "direct and scatter loading differ")

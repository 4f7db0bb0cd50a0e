"""Q4_K_M GGUFs on N ranks (`mpiexec -n N bash tests/mpi/run_rank.sh tests/mpi`).

The tiny K-quant models of tests/tiny.py (k8h: every matrix a K-quant; k8h_fallback: w2 in
llama.cpp's Q5_0 / Q8_0 fallbacks, tied output): at 3 ranks the in-split bands of wo and w2
cut 256-value super-blocks. On N ranks: read at f32 the logits equal transformers on the
gguf-dequantised weights; in their own runtime types (Q41 / Q80, mixed) the greedy tokens
and logits equal one process's (f32 wire: the same bits but for summation order), direct
loading gives the bits of scatter loading, and every rank holds what memory.py predicts.
Split GGUFs: direct loading from a part gives the whole file's bits.
"""
import os

import numpy as np
import pytest

from dllama_mpi import memory
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.startup import run_root, start
from mpi_util import agree, on_root
from tiny import dequantised_hf_logits, our_greedy, our_logits, tolerance, write_tiny_gguf

IDS = [1, 17, 42, 99, 3, 150, 7, 64, 5, 180, 2, 33]
SHAPES = ("k8h", "k8h_fallback")


def k_file(comm, shared_dir, shape):
    path = os.path.join(shared_dir, f"{shape}-q4_k_m.gguf")
    return on_root(comm, lambda: path if os.path.exists(path) else
                   str(write_tiny_gguf(path, shape, "q4_k_m")))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape", SHAPES)
def test_f32_read_matches_transformers_on_n_ranks(comm, shared_dir, shape):
    path = k_file(comm, shared_dir, shape)
    logits = our_logits(comm, path, IDS, weights="f32")
    ok, msg = None, ""
    if comm.is_root:
        ref = dequantised_hf_logits(path, shape, IDS)
        err = float(np.abs(logits - ref).max())
        ok, msg = err <= tolerance(ref), f"{comm.size} ranks: max |diff| {err} > {tolerance(ref)}"
    agree(comm, ok, msg)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape", SHAPES)
def test_mixed_types_on_n_ranks_equal_one_process(comm, shared_dir, shape):
    path = k_file(comm, shared_dir, shape)
    scatter = our_logits(comm, path, IDS, weights="auto", wire="f32", load="scatter")
    direct = our_logits(comm, path, IDS, weights="auto", wire="f32", load="direct")
    tokens = our_greedy(comm, path, IDS[:5], 16, weights="auto", wire="f32")
    ok, msg = None, ""
    if comm.is_root:
        one = our_logits(SerialComm(), path, IDS, weights="auto", wire="f32")
        one_tokens = our_greedy(SerialComm(), path, IDS[:5], 16, weights="auto", wire="f32")
        err = float(np.abs(scatter - one).max())
        checks = {f"logits within {tolerance(one):.2e} of one process's (max |diff| {err:.2e})":
                  err <= tolerance(one),
                  "direct loading gives the bits of scatter loading":
                  np.array_equal(direct, scatter),
                  f"greedy tokens {tokens} equal one process's {one_tokens}": tokens == one_tokens}
        ok = all(checks.values())
        msg = f"{shape} on {comm.size} ranks: failed: " + \
            "; ".join(k for k, v in checks.items() if not v)
    agree(comm, ok, msg)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_rank_holds_what_memory_predicts(comm, shared_dir, shape):
    path = k_file(comm, shared_dir, shape)
    s = start(comm, path, RunConfig(max_seq_len=20, nthreads=1, parallel=2),
              want_tokenizer=False)
    held = comm.allgather_obj((s.engine.model.w.nbytes(), s.engine.model.kv.nbytes))
    assert run_root(s, lambda _: None) == 0
    predicted = [(m.weights, m.kv_cache) for m in memory.per_rank(s.config, s.run, comm.size)]
    agree(comm, held == predicted and s.run.weights_float_type == "mixed"
          if comm.is_root else None, f"held {held} != {predicted} ({s.run.weights_float_type})")


@pytest.mark.mpi(min_size=2)
def test_split_gguf_direct_loading_reads_every_part(comm, shared_dir):
    """The Q4_K_M file split in 4 parts (llama.cpp's split GGUF), opened from its third part:
    with direct loading every rank reads its slices from whichever parts hold them; the
    logits are the bits of the whole file's."""
    from dllama_mpi.testing import split_gguf
    whole = k_file(comm, shared_dir, "k8h")
    parts = on_root(comm, lambda: [str(p) for p in split_gguf(
        whole, os.path.join(shared_dir, "k8h-split"), 6)])
    split = our_logits(comm, parts[2], IDS, weights="auto", wire="f32", load="direct")
    ref = our_logits(comm, whole, IDS, weights="auto", wire="f32", load="scatter")
    agree(comm, np.array_equal(split, ref) if comm.is_root else None,
          f"{len(parts)} parts on {comm.size} ranks: logits differ from the whole file's")

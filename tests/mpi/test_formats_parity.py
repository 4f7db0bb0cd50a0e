"""Every architecture from every format on N ranks:
`mpiexec -n N python -m mpi4py -m pytest --with-mpi tests/mpi`.

A tiny Llama, Qwen2 and Qwen3 (tests/tiny.py ARCH_SHAPES: 6 query heads over 2 KV heads, so
3 and 4 ranks split unevenly and share KV heads) as a Hugging Face folder, its .h5 and .m
conversions (Qwen2: a GGUF instead, a .m cannot hold biases): on N ranks the logits match
transformers at every position, greedy tokens equal the one-process ones, and direct loading
gives the same bits as scatter loading. The root computes each verdict and broadcasts it.
"""
import os

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from mpi_util import agree
from tiny import hf_arch_logits, our_greedy, our_logits, save_hf_arch, tolerance, write_arch_gguf

IDS = [1, 17, 42, 99, 3, 150, 7, 64]
SHAPES = ("llama_gqa6", "qwen2_gqa6", "qwen3_gqa6")
CASES = [(shape, form) for shape in SHAPES
         for form in ("hf", "h5", "gguf" if shape.startswith("qwen2") else "m")]


def model_file(comm, shared_dir: str, shape: str, form: str) -> str:
    """Written once by the root into the shared directory; every rank gets the path."""
    path = None
    if comm.is_root:
        folder = os.path.join(shared_dir, shape)
        if not os.path.isdir(folder):
            save_hf_arch(folder, shape)
        path = {"hf": folder, "gguf": folder + ".gguf"}.get(form, f"{folder}.{form}")
        if not os.path.exists(path):
            if form == "gguf":
                write_arch_gguf(path, shape)
            else:
                from dllama_mpi.apps.convert import convert
                convert(folder, path, "f32", progress=False)
    return comm.bcast_obj(path)


_REF: dict = {}


def reference(shape: str) -> np.ndarray:
    if shape not in _REF:
        _REF[shape] = hf_arch_logits(shape, IDS)
    return _REF[shape]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("shape,form", CASES)
def test_every_format_on_n_ranks(comm, shared_dir, shape, form):
    path = model_file(comm, shared_dir, shape, form)
    scatter = our_logits(comm, path, IDS, load="scatter")
    direct = our_logits(comm, path, IDS, load="direct")
    tokens = our_greedy(comm, path, IDS[:3], 8)
    ok, msg = None, ""
    if comm.is_root:
        ref = reference(shape)
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

"""model.pack_weights: one buffer, in the order the forward pass reads the matrices."""
import numpy as np

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.startup import start
from tiny import write_tiny_gguf


def _addresses(m):
    parts = [m] if isinstance(m, np.ndarray) else ([m.buf] if hasattr(m, "buf") else [m.qs, m.d])
    return [(p.ctypes.data, p.nbytes, p.base) for p in parts if p.nbytes]


def test_weights_packed_in_forward_order(tmp_path):
    for gguf_type, weights in (("q4_0", "q40"), ("f32", "f32")):
        path = write_tiny_gguf(str(tmp_path / f"m-{gguf_type}.gguf"), "q40_9h", gguf_type)
        s = start(SerialComm(), path, RunConfig(weights_float_type=weights, max_seq_len=16,
                                                nthreads=1), want_tokenizer=False)
        w = s.engine.model.w
        order = [m for lw in w.layers for m in (lw.wqkv, lw.wo, lw.w13, lw.w2)] + [w.wcls]
        parts = [a for m in order for a in _addresses(m)]
        bases = {id(_root(b)) for _, _, b in parts}
        assert len(bases) == 1                                  # one buffer
        starts = [p for p, _, _ in parts]
        assert starts == sorted(starts)                         # in forward order
        for (p0, n0, _), (p1, _, _) in zip(parts, parts[1:]):   # no overlap, 64-byte aligned
            assert p0 + n0 <= p1 and (p1 - p0) % 64 == 0


def _root(a):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a

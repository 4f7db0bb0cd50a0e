"""A memory read-bandwidth probe (`plan --probe`): a vectorised numba sum over a large
array, the figure decode speed is bounded by (bench/bench_kernels.py has the same probe)."""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def _sum_u64(a, nchunks):
    n = a.size
    part = np.zeros(nchunks, np.uint64)
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        seg = a[min(n, c * step):min(n, (c + 1) * step)]   # a slice: the loop vectorises
        s = np.uint64(0)
        for i in range(seg.size):
            s += seg[i]
        part[c] = s
    return part.sum()


def read_bandwidth(nbytes: int = 512 << 20, reps: int = 5, threads: int | None = None) -> float:
    """Bytes/s read on `threads` threads (default: all numba's), best of reps."""
    from .. import kernels
    if threads is not None:
        kernels.set_num_threads(threads)
    n = kernels.get_num_threads()
    a = np.ones(nbytes // 8, np.uint64)
    _sum_u64(a[:1024], n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        _sum_u64(a, n)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best

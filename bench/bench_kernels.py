"""Kernel benchmarks (run by hand): python bench/bench_kernels.py [--quick] [--compute]

Prints a read-bandwidth probe (vectorised numba sum over ~1 GB of uint64), then the row-tile
kernels (matmul_q80_q40 / _q41 / _q80) on SmolLM2-sized narrow matrices, then
matmul_q80_q40 GB/s of weight bytes at T=1 and GFLOP/s-equivalent (2*rows*cols*T per call)
at T=20 and T=128, each with 1 and 2 numba threads, and the fraction of the probe bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba
import numpy as np
from numba import njit, prange

from dllama_mpi import kernels as K
from dllama_mpi.kernels import simd
from dllama_mpi.kernels.matmul import _bound_matmul
from dllama_mpi.quant import Q40Matrix, Q41Matrix, Q80Matrix, quantize_q40, quantize_q41


@njit(parallel=True, fastmath=True, cache=True)
def _sum_u64(a, nchunks):
    n = a.size
    part = np.zeros(nchunks, np.uint64)
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        seg = a[min(n, c * step):min(n, (c + 1) * step)]
        s = np.uint64(0)
        for i in range(seg.size):
            s += seg[i]
        part[c] = s
    return part.sum()


def best_of(fn, reps: int, min_time: float = 0.0) -> float:
    best = float("inf")
    t_end = time.perf_counter() + min_time
    i = 0
    while i < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best


def probe(nbytes: int, threads: int, reps: int) -> float:
    a = np.ones(nbytes // 8, np.uint64)
    K.set_num_threads(threads)
    _sum_u64(a[:1024], threads)
    t = best_of(lambda: _sum_u64(a, threads), reps)
    return a.nbytes / t / 1e9


def make_matrix(rows: int, cols: int, seed: int = 0) -> Q40Matrix:
    rng = np.random.default_rng(seed)
    return Q40Matrix.from_blocks(quantize_q40(rng.standard_normal((rows, cols), dtype=np.float32)))


def bench_matmul(w: Q40Matrix, T: int, threads: int, reps: int, copies: int) -> float:
    """seconds per call, best of reps; cycles through `copies` matrices so T=1 reads from DRAM."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, w.cols), dtype=np.float32)
    xq = np.empty((T, w.cols), np.int8)
    xd = np.empty((T, w.cols // 32), np.float32)
    K.quantize_q80_act(xq, xd, x)
    out = np.empty((T, w.rows), np.float32)
    mats = [w] + [_clone(w) for _ in range(copies - 1)]
    K.set_num_threads(threads)
    K.matmul_q80_q40(out, xq, xd, w)
    state = [0]

    def call():
        K.matmul_q80_q40(out, xq, xd, mats[state[0] % len(mats)])
        state[0] += 1
    return best_of(call, reps, min_time=0.5)


def _clone(w):
    """an independent copy of any runtime matrix (its arrays copied: no cache sharing)."""
    c = type(w).__new__(type(w))
    for k in {k for cls in type(w).__mro__ for k in getattr(cls, "__slots__", ())}:
        if hasattr(w, k):                  # the slots of the base classes too (rows, cols, nb)
            v = getattr(w, k)
            setattr(c, k, v.copy() if isinstance(v, np.ndarray) else v)
    return c


_MATMUL = {Q40Matrix: K.matmul_q80_q40, Q41Matrix: K.matmul_q80_q41, Q80Matrix: K.matmul_q80_q80}


def bench_any(w, T: int, threads: int, reps: int, min_bytes: float = 128e6) -> float:
    """seconds per call (median over passes through enough copies to exceed the L3 cache)."""
    fn = _MATMUL[type(w)]
    rng = np.random.default_rng(1)
    xq = np.empty((T, w.cols), np.int8)
    xd = np.empty((T, w.cols // 32), np.float32)
    K.quantize_q80_act(xq, xd, rng.standard_normal((T, w.cols), dtype=np.float32))
    out = np.empty((T, w.rows), np.float32)
    mats = [w] + [_clone(w) for _ in range(max(1, int(min_bytes // w.nbytes)) - 1)]
    K.set_num_threads(threads)
    fn(out, xq, xd, w)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for m in mats:
            fn(out, xq, xd, m)
        times.append((time.perf_counter() - t0) / len(mats))
    return float(np.median(times))


def narrow(thr_list, bw, reps: int) -> None:
    """SmolLM2-sized matrices (dim 576, FFN 1536, vocab 49152) in the row-tile formats."""
    rng = np.random.default_rng(2)
    for rows, cols in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]:
        wf = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05 + 0.01).astype(np.float32)
        for name, w in (("q40", Q40Matrix.from_f32(wf)), ("q41", Q41Matrix.from_blocks(quantize_q41(wf))),
                        ("q80", Q80Matrix.from_f32(wf))):
            for th in thr_list:
                t = bench_any(w, 1, th, reps)
                gbs = w.nbytes / t / 1e9
                t20 = bench_any(w, 20, th, max(3, reps // 2), min_bytes=0)
                print(f"matmul_q80_{name} {rows}x{cols} ({w.nbytes / 1e6:.2f} MB) {th} thr: T=1 {t*1e6:8.1f} us "
                      f"{gbs:6.2f} GB/s ({gbs / bw[th]:.0%} of probe)   T=20 {t20*1e6:8.1f} us "
                      f"{2.0 * rows * cols * 20 / t20 / 1e9:6.1f} GFLOP/s-eq")


def compute(paths, thr_list, tokens, reps: int, kinds) -> None:
    """Compute-bound matmuls (prompt / batched decode): GOP/s (2*rows*cols*T per call) of a
    576x1536 and a 2048x5632 4-bit matrix at T tokens, per kernel path and thread count, the
    paths interleaved call by call (fair on a busy machine)."""
    rng = np.random.default_rng(3)
    for rows, cols in [(576, 1536), (2048, 5632)]:
        wf = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05 + 0.01).astype(np.float32)
        mats = {"q41": Q41Matrix.from_blocks(quantize_q41(wf)), "q40": Q40Matrix.from_f32(wf),
                "q40rows": Q40Matrix.from_blocks(quantize_q40(wf), layout="rows"), "q80": Q80Matrix.from_f32(wf)}
        for kind in kinds:
            w = mats[kind]
            for T in tokens:
                xq = np.empty((T, cols), np.int8)
                xd = np.empty((T, cols // 32), np.float32)
                K.quantize_q80_act(xq, xd, rng.standard_normal((T, cols), dtype=np.float32))
                out = np.empty((T, rows), np.float32)
                for th in thr_list:
                    K.set_num_threads(th)
                    calls = {p: _bound_matmul(out, xq, xd, w, p) for p in paths}
                    best = {p: float("inf") for p in paths}
                    for p in paths:
                        calls[p]()
                    n = max(1, int(2e8 // (rows * cols * T)))          # ~0.1 s per path per rep
                    for _ in range(reps):
                        for p in paths:
                            t0 = time.perf_counter()
                            for _ in range(n):
                                calls[p]()
                            best[p] = min(best[p], (time.perf_counter() - t0) / n)
                    line = "  ".join(f"{p}[{calls[p].func.__name__}] {2.0 * rows * cols * T / best[p] / 1e9:6.1f}"
                                     for p in paths)
                    print(f"{kind:7s} {rows}x{cols} T={T:<4d}{th} thr  GOP/s: {line}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--probe-gb", type=float, default=1.0)
    ap.add_argument("--compute", action="store_true",
                    help="only the compute-bound matmuls (GOP/s per kernel path; see compute())")
    ap.add_argument("--paths", default=",".join(simd.HOST_PATHS[:2]),
                    help="kernel paths to compare with --compute (default: the host's best two)")
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--threads", default=None, help="e.g. 1,2 (default: 1 and 2 if available)")
    ap.add_argument("--kinds", default="q41,q40,q40rows", help="matrix kinds: q41,q40,q40rows,q80")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    maxthr = numba.config.NUMBA_NUM_THREADS
    thr_list = [1, 2] if maxthr >= 2 else [1]
    if args.threads:
        thr_list = [int(v) for v in args.threads.split(",")]
    print(f"kernel path: {simd.KERNELS} (host can run {', '.join(simd.HOST_PATHS)})")
    if args.compute:
        paths = [p for p in args.paths.split(",") if p in simd.HOST_PATHS]
        compute(paths, thr_list, [int(v) for v in args.tokens.split(",")], reps, args.kinds.split(","))
        return
    K.warmup()

    bw = {}
    for th in thr_list:
        bw[th] = probe(int(args.probe_gb * 1e9), th, reps)
        print(f"read probe (numba uint64 sum, {args.probe_gb:.1f} GB), {th} thread(s): {bw[th]:6.2f} GB/s")

    narrow(thr_list, bw, reps)

    for rows, cols in [(8192, 2048), (2048, 8192)]:
        w = make_matrix(rows, cols)
        mb = w.nbytes / 1e6
        for th in thr_list:
            t = bench_matmul(w, 1, th, reps * 3, copies=8)   # 8 x 9.4 MB > L3
            gbs = w.nbytes / t / 1e9
            print(f"matmul_q80_q40 {rows}x{cols} ({mb:.1f} MB) T=1   {th} thr: {t*1e3:7.3f} ms  "
                  f"{gbs:6.2f} GB/s  ({gbs / bw[th]:.0%} of probe)")
        for T in (20, 128):
            for th in thr_list:
                t = bench_matmul(w, T, th, reps, copies=1)
                gf = 2.0 * rows * cols * T / t / 1e9
                print(f"matmul_q80_q40 {rows}x{cols} T={T:<4d}{th} thr: {t*1e3:7.3f} ms  {gf:6.1f} GFLOP/s-eq  "
                      f"({T / t:8.0f} tokens*matrices/s)")


if __name__ == "__main__":
    main()

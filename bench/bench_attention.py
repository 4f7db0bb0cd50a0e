"""A layer's kernels besides the matmuls, timed alone (run by hand, one process):

    python bench/bench_attention.py [--threads 1,2] [--rows 16] [--heads 9] [--kv-heads 3]
        [--position 50] [--layers 30] [--stream-mb 3] [--reps 9]

attention: `attention_block` (rope, the KV write, attention, Q80 of the result) of `rows`
sequences, each in its own KV slot at `position`, over the caches of `layers` layers in
turn, with `stream-mb` MB of other memory read between two layers (what the layer's
weights do to the caches in a real step); prints the median µs a layer. The defaults are a
SmolLM2 16-sequence step; `--rows 1 --heads 32 --kv-heads 8 --position 100 --layers 16
--stream-mb 34` is a synthetic-1.1B decode step.  q80 / norm / silu: the Q80 of rows x 8192
activations, the fused RMSNorm+Q80 of rows x 2048 and SiLU·mul+Q80 of rows x 8192, median µs
of a call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from dllama_mpi import kernels  # noqa: E402


@njit(cache=True)
def _stream(a, o, n):
    s = np.uint64(0)
    for i in range(o, o + n):
        s += a[i]
    return s


def median_us(call, reps: int) -> float:
    call()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def attention(args) -> float:
    T, nq, nkv, pos, L, hd = args.rows, args.heads, args.kv_heads, args.position, args.layers, 64
    S = pos + 8
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((L, T, S, nkv, hd)).astype(np.float32)
    vc = rng.standard_normal((L, T, S, nkv, hd)).astype(np.float32)
    qkv = rng.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    out = np.zeros((T, nq * hd), np.float32)
    q80 = (np.zeros((T, nq * hd), np.int8), np.zeros((T, nq * hd // 32), np.float32))
    ang = np.outer(np.arange(S), 1.0 / 10000 ** (np.arange(hd // 2) * 2 / hd)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    positions, slots = np.full(T, pos, np.int32), np.arange(T, dtype=np.int32)
    kv_of_q = (np.arange(nq) * nkv // nq).astype(np.int32)
    calls = [kernels.bind_attention_block(out, qkv, kc[l], vc[l], positions, slots, cos, sin, kv_of_q,
                                          1 / 8, q80) for l in range(L)]
    other = np.ones((1 << 30) // 8, np.uint64)
    n = int(args.stream_mb * (1 << 20)) // 8
    _stream(other, 0, 8)
    for c in calls:
        c()
    per_layer, o = [], 0
    for _ in range(args.reps):
        t = 0.0
        for c in calls:
            if o + n > other.size:
                o = 0
            _stream(other, o, n)
            o += n
            t0 = time.perf_counter()
            c()
            t += time.perf_counter() - t0
        per_layer.append(t / L)
    return float(np.median(per_layer)) * 1e6


def row_kernels(T: int, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, 8192)).astype(np.float32)
    qs, d = np.empty((T, 8192), np.int8), np.empty((T, 256), np.float32)
    xn = rng.standard_normal((T, 2048)).astype(np.float32)
    w = rng.standard_normal(2048).astype(np.float32)
    outn, qn, dn = np.empty_like(xn), np.empty((T, 2048), np.int8), np.empty((T, 64), np.float32)
    gu = rng.standard_normal((T, 2 * 8192)).astype(np.float32)
    h = np.empty((T, 8192), np.float32)
    norm = kernels.bind_rmsnorm_q80(outn, qn, dn, xn, w, 1e-5)
    silu = kernels.bind_silu_mul_q80(h, qs, d, gu)
    return {"q80": median_us(lambda: kernels.quantize_q80_act(qs, d, x), reps * 30),
            "norm": median_us(norm, reps * 30), "silu": median_us(silu, reps * 30)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--position", type=int, default=50)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--stream-mb", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    for nt in (int(t) for t in args.threads.split(",")):
        if nt > kernels.max_threads():
            continue
        kernels.set_num_threads(nt)
        att = attention(args)
        r = row_kernels(args.rows, args.reps)
        print(f"{nt} thread(s), {args.rows} rows: attention {att:.1f} us a layer "
              f"({args.heads}/{args.kv_heads} heads, position {args.position}, {args.layers} layers, "
              f"{args.stream_mb:g} MB between); q80 x8192 {r['q80']:.1f} us, rmsnorm+q80 x2048 "
              f"{r['norm']:.1f} us, silu+q80 x8192 {r['silu']:.1f} us")


if __name__ == "__main__":
    main()

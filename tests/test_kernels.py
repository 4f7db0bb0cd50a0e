"""Every kernel against a naive numpy twin, odd sizes, T in {1, 3, 17}, numba threads 1 and 2."""
import math

import numba
import numpy as np
import pytest

from dllama_mpi import kernels as K
from dllama_mpi.kernels.matmul import _matmul_unchecked
from dllama_mpi.quant import Q40Matrix, dequantize_q40, dequantize_q80_parts, quantize_q40, quantize_q80_parts

TS = [1, 3, 17]
THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]


@pytest.fixture(params=THREADS, ids=lambda n: f"thr{n}")
def threads(request):
    old = K.get_num_threads()
    K.set_num_threads(request.param)
    yield request.param
    K.set_num_threads(old)


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- naive twins

def naive_rmsnorm(x, w, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + eps) * w).astype(np.float32)


def naive_rope(x, pos, cos, sin, hd):
    y = x.astype(np.float64).copy()
    T, width = x.shape
    for t in range(T):
        for h in range(width // hd):
            for i in range(hd // 2):
                a, b = x[t, h * hd + 2 * i], x[t, h * hd + 2 * i + 1]
                c, s = cos[pos[t], i], sin[pos[t], i]
                y[t, h * hd + 2 * i] = a * c - b * s
                y[t, h * hd + 2 * i + 1] = a * s + b * c
    return y


def naive_attention(q, kc, vc, pos, kv_of_q, scale):
    T, width = q.shape
    hd = kc.shape[2]
    out = np.zeros((T, width))
    for t in range(T):
        n = pos[t] + 1
        for h in range(width // hd):
            qh = q[t, h * hd:(h + 1) * hd].astype(np.float64)
            k = kc[:n, kv_of_q[h]].astype(np.float64)
            v = vc[:n, kv_of_q[h]].astype(np.float64)
            s = scale * (k @ qh)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h * hd:(h + 1) * hd] = p @ v
    return out


def naive_q80_q40(xq, xd, w_deq):
    """returns (reference f64 result, sum of |terms|) for the matmul tolerance."""
    x = dequantize_q80_parts(xq, xd).astype(np.float64)
    w = w_deq.astype(np.float64)
    return x @ w.T, np.abs(x) @ np.abs(w).T


# ---------------------------------------------------------------- quantize_q80_act

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("n", [32, 96, 2048])
def test_quantize_q80_act(T, n, threads):
    x = (rng(T).standard_normal((T, n)) * 3).astype(np.float32)
    x[0, :32] = 0.0                                   # d == 0 block
    x[-1, -32:] = np.linspace(-127, 127, 32).astype(np.float32)   # exact .5 ties at d = 1
    x[-1, -1] = 127.0
    if T > 1:
        x[1, :32] = 1e-6                              # tiny d -> fp16 subnormal
        x[1, 32 % n:32 % n + 32] *= 1e5               # huge values (fp16 d near the top)
    qs = np.empty((T, n), np.int8)
    d = np.empty((T, n // 32), np.float32)
    K.quantize_q80_act(qs, d, x)
    rq, rd = quantize_q80_parts(x)
    assert np.array_equal(qs, rq)
    assert np.array_equal(d, rd)


def test_f16_rounding_exhaustive_sample():
    r = rng(5)
    v = np.concatenate([np.abs(r.standard_normal(20000)).astype(np.float32) * s
                        for s in (1e-7, 1e-5, 1e-3, 1.0, 1e3, 6e4 / 4)]).astype(np.float32)
    # exact fp16 midpoints (ties to even)
    h = np.arange(0, 0x7BFF, 7, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((h[:-1] + h[1:]) / 2).astype(np.float32)
    v = np.concatenate([v, mids, h.astype(np.float32)])
    x = np.zeros((v.size, 32), np.float32)
    x[:, 0] = v * 127
    qs = np.empty_like(x, dtype=np.int8)
    d = np.empty((v.size, 1), np.float32)
    K.quantize_q80_act(qs, d, x)
    _, rd = quantize_q80_parts(x)
    assert np.array_equal(d, rd)


# ---------------------------------------------------------------- matmul_q80_q40

# slab widths G: 1, 3, 5, 2, 8, 16, 18, 24, 50, 64 + 1, 64, 2 x 64; rows per tile 64 // G with partial
# last tiles; the big ones take the parallel path (thread bands aligned to tiles)
MM_SHAPES = [(1, 32), (7, 96), (33, 160), (70, 64), (130, 256), (16, 512), (9, 576), (33, 768),
             (20, 1600), (40, 2080), (257, 2048), (64, 4096), (1001, 576), (501, 2080), (95, 3104)]


@pytest.mark.parametrize("layout", ["slab", "rows"])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("rows,cols", MM_SHAPES)
def test_matmul_q80_q40(rows, cols, T, threads, layout):
    r = rng(rows * 7 + cols + T)
    raw = quantize_q40((r.standard_normal((rows, cols)) * 0.05).astype(np.float32))
    w = Q40Matrix.from_blocks(raw, layout)
    x = r.standard_normal((T, cols)).astype(np.float32)
    xq = np.empty((T, cols), np.int8)
    xd = np.empty((T, cols // 32), np.float32)
    K.quantize_q80_act(xq, xd, x)
    out = np.full((T, rows), np.nan, np.float32)
    K.matmul_q80_q40(out, xq, xd, w)
    ref, mag = naive_q80_q40(xq, xd, dequantize_q40(raw))
    # exact int32 block dots; error only from f32 scale products and the f32 sum over blocks
    tol = 1e-5 * mag + 1e-30
    assert np.all(np.abs(out - ref) <= tol), np.max(np.abs(out - ref) / tol)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("rows,cols", [(7, 96), (9, 576), (20, 1600), (40, 2080), (300, 2048), (1001, 576)])
def test_matmul_q80_q40_generic_path(rows, cols, T, threads):
    """the portable (no AVX2) kernel gives the same bits as the one the CPU uses"""
    r = rng(rows + T)
    w = Q40Matrix.from_f32((r.standard_normal((rows, cols)) * 0.05).astype(np.float32))
    xq = r.integers(-127, 128, (T, cols)).astype(np.int8)
    xd = (r.random((T, cols // 32)) * 0.1).astype(np.float32)
    a = np.empty((T, rows), np.float32)
    b = np.empty((T, rows), np.float32)
    K.matmul_q80_q40(a, xq, xd, w)
    _matmul_unchecked(b, xq, xd, w, False)
    if w.layout == "slab":
        np.testing.assert_array_equal(a, b)
    else:                                  # row tiles: same int sums, FMA vs separate f32 rounding
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


def test_matmul_q80_q40_extremes(threads):
    # all nibbles 0 or 15 and |xq| = 127: the largest integer block sums
    rows, cols = 9, 2048 + 96
    r = rng(9)
    raw = quantize_q40(np.where(r.random((rows, cols)) < 0.5, -8.0, 7.0).astype(np.float32) * 0.01)
    w = Q40Matrix.from_blocks(raw)
    xq = np.where(r.random((2, cols)) < 0.5, -127, 127).astype(np.int8)
    xd = np.full((2, cols // 32), 0.5, np.float32)
    out = np.empty((2, rows), np.float32)
    K.matmul_q80_q40(out, xq, xd, w)
    ref, mag = naive_q80_q40(xq, xd, dequantize_q40(raw))
    assert np.all(np.abs(out - ref) <= 1e-5 * mag)


# ---------------------------------------------------------------- row-tile kernels: Q41, Q80 weights

RT_SHAPES = [(1, 32), (7, 96), (17, 160), (33, 576), (50, 1536), (16, 2048), (70, 2080)]


def _q80_input(r, T, cols):
    x = r.standard_normal((T, cols)).astype(np.float32)
    xq = np.empty((T, cols), np.int8)
    xd = np.empty((T, cols // 32), np.float32)
    K.quantize_q80_act(xq, xd, x)
    return xq, xd


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("rows,cols", RT_SHAPES)
def test_matmul_q80_q41(rows, cols, T, threads):
    from dllama_mpi.quant import Q41Matrix, dequantize_q41, quantize_q41
    r = rng(rows * 5 + cols + T)
    raw = quantize_q41((r.standard_normal((rows, cols)) * 0.05 + 0.03).astype(np.float32))
    w = Q41Matrix.from_blocks(raw)
    xq, xd = _q80_input(r, T, cols)
    out = np.full((T, rows), np.nan, np.float32)
    K.matmul_q80_q41(out, xq, xd, w)
    ref, mag = naive_q80_q40(xq, xd, dequantize_q41(raw))
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-30)
    gen = np.full((T, rows), np.nan, np.float32)          # the portable (no AVX2) twin
    _matmul_unchecked(gen, xq, xd, w, False)
    np.testing.assert_allclose(gen, out, rtol=2e-5, atol=1e-5 * float(mag.max()))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("rows,cols", RT_SHAPES)
def test_matmul_q80_q80(rows, cols, T, threads):
    from dllama_mpi.quant import Q80Matrix, dequantize_q80, quantize_q80
    r = rng(rows * 3 + cols + T)
    raw = quantize_q80((r.standard_normal((rows, cols)) * 0.05).astype(np.float32))
    w = Q80Matrix.from_blocks(raw)
    xq, xd = _q80_input(r, T, cols)
    out = np.full((T, rows), np.nan, np.float32)
    K.matmul_q80_q80(out, xq, xd, w)
    ref, mag = naive_q80_q40(xq, xd, dequantize_q80(raw))
    assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-30)
    gen = np.full((T, rows), np.nan, np.float32)
    _matmul_unchecked(gen, xq, xd, w, False)
    np.testing.assert_allclose(gen, out, rtol=2e-5, atol=1e-5 * float(mag.max()))


def _unit_scale_blocks(q, nb, kind):
    """GGML block bytes with d = 1 (and m = 0) around the given integer values."""
    rows = q.shape[0]
    one = np.full((rows, nb, 1), 0x3C00, np.uint16).view(np.uint8)      # float16 1.0
    if kind == "q80":
        return np.concatenate([one, q.reshape(rows, nb, 32).astype(np.int8).view(np.uint8)], axis=2).reshape(rows, -1)
    qb = q.reshape(rows, nb, 32).astype(np.uint8)
    packed = qb[:, :, :16] | (qb[:, :, 16:] << 4)
    zero = np.zeros((rows, nb, 2), np.uint8)
    parts = [one, packed] if kind == "q40" else [one, zero, packed]
    return np.concatenate(parts, axis=2).reshape(rows, -1)


@pytest.mark.parametrize("kind", ["q40", "q41", "q80"])
@pytest.mark.parametrize("T", TS)
def test_row_tile_integer_dots_exact(kind, T, threads):
    """d = xd = 1 and extreme values: every block dot and their f32 sum are exact integers."""
    from dllama_mpi.quant import Q41Matrix, Q80Matrix
    r = rng(T)
    rows, cols = 37, 576
    nb = cols // 32
    if kind == "q80":
        q = np.where(r.random((rows, cols)) < 0.5, -127, 127)
        q[0, :5] = -128                               # GGML bytes may hold -128
        w, val = Q80Matrix.from_blocks(_unit_scale_blocks(q, nb, kind)), q
    else:
        q = np.where(r.random((rows, cols)) < 0.5, 0, 15)
        q[1] = r.integers(0, 16, cols)
        raw = _unit_scale_blocks(q, nb, kind)
        w = Q40Matrix.from_blocks(raw, "rows") if kind == "q40" else Q41Matrix.from_blocks(raw)
        val = q - 8 if kind == "q40" else q
    xq = np.where(r.random((T, cols)) < 0.5, -127, 127).astype(np.int8)
    xq[:, 40:50] = r.integers(-127, 128, (T, 10))
    xd = np.ones((T, nb), np.float32)
    out = np.empty((T, rows), np.float32)
    {"q40": K.matmul_q80_q40, "q41": K.matmul_q80_q41, "q80": K.matmul_q80_q80}[kind](out, xq, xd, w)
    np.testing.assert_array_equal(out, (xq.astype(np.int64) @ val.T.astype(np.int64)).astype(np.float32))


def test_row_tile_errors():
    from dllama_mpi.quant import Q41Matrix, Q80Matrix
    w = Q80Matrix.from_f32(np.ones((4, 64), np.float32))
    xq, xd = np.zeros((1, 64), np.int8), np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="Q80Matrix"):
        K.matmul_q80_q41(np.empty((1, 4), np.float32), xq, xd, w)
    with pytest.raises(ValueError, match="columns"):
        K.matmul_q80_q80(np.empty((1, 4), np.float32), np.zeros((1, 96), np.int8), np.zeros((1, 3), np.float32), w)
    with pytest.raises(ValueError, match="shape"):
        K.matmul_q80_q80(np.empty((1, 5), np.float32), xq, xd, w)


def test_q40matrix_dequantize():
    raw = quantize_q40(rng(3).standard_normal((33, 160)).astype(np.float32))
    assert np.array_equal(Q40Matrix.from_blocks(raw).dequantize(), dequantize_q40(raw))


# ---------------------------------------------------------------- matmul_f32

@pytest.mark.parametrize("T", TS)
def test_matmul_f32(T):
    r = rng(T)
    x = r.standard_normal((T, 96)).astype(np.float32)
    w = r.standard_normal((33, 96)).astype(np.float32)
    out = np.empty((T, 33), np.float32)
    K.matmul_f32(out, x, w)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- rmsnorm, rope, silu

@pytest.mark.parametrize("T", TS + [64])
@pytest.mark.parametrize("n", [32, 576, 2048])
def test_rmsnorm(T, n, threads):
    r = rng(n + T)
    x = (r.standard_normal((T, n)) * 5).astype(np.float32)
    w = r.standard_normal(n).astype(np.float32)
    out = np.empty_like(x)
    K.rmsnorm(out, x, w, 1e-5)
    np.testing.assert_allclose(out, naive_rmsnorm(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    K.rmsnorm(x, x, w, 1e-5)                          # in place is allowed
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("T", TS + [64])
@pytest.mark.parametrize("n", [32, 576, 1536, 8192])   # 8192 at T = 1: one row split over threads
def test_fused_q80(T, n, threads):
    """rmsnorm_q80 / silu_mul_q80 give the bits of the two kernels they fuse"""
    r = rng(n + 3 * T)
    x = (r.standard_normal((T, n)) * 3).astype(np.float32)
    w = r.standard_normal(n).astype(np.float32)
    gu = np.concatenate([x, r.standard_normal((T, n)).astype(np.float32)], axis=1)
    for fused, plain, args in ((K.rmsnorm_q80, K.rmsnorm, (x, w, 1e-5)), (K.silu_mul_q80, K.silu_mul, (gu,))):
        ref = np.empty_like(x)
        plain(ref, *args)
        rq, rd = quantize_q80_parts(ref)
        out, qs, d = np.empty_like(x), np.empty((T, n), np.int8), np.empty((T, n // 32), np.float32)
        fused(out, qs, d, *args)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(qs, rq)
        np.testing.assert_array_equal(d, rd)


def _rope_tables(P, hd, theta=10000.0):
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(P)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@pytest.mark.parametrize("T", TS + [40])
@pytest.mark.parametrize("nh,hd", [(1, 2), (3, 64), (9, 64), (32, 128)])
def test_rope(T, nh, hd, threads):
    r = rng(T * nh)
    x = r.standard_normal((T, nh * hd)).astype(np.float32)
    pos = r.integers(0, 50, T).astype(np.int32)
    cos, sin = _rope_tables(50, hd)
    ref = naive_rope(x, pos, cos, sin, hd)
    K.rope_interleaved(x, pos, cos, sin, hd)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", TS + [64])
@pytest.mark.parametrize("n", [1, 96, 1536])
def test_silu_mul(T, n, threads):
    r = rng(n)
    a = (r.standard_normal((T, n)) * 4).astype(np.float32)
    a[0, 0] = -100.0                                   # exp overflow side stays finite
    b = r.standard_normal((T, n)).astype(np.float32)
    out = np.empty_like(a)
    K.silu_mul(out, np.concatenate([a, b], axis=1))      # gate | up, as the stacked w13 gives
    a64 = a.astype(np.float64)
    np.testing.assert_allclose(out, a64 / (1 + np.exp(-a64)) * b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("T", TS)
# head dims 80 and 40: the V sums' 64-wide, 16-wide and scalar column passes (simd._pv_span)
@pytest.mark.parametrize("nq,nkv,hd,S", [(1, 1, 8, 5), (3, 1, 64, 40), (9, 3, 64, 40), (4, 2, 32, 8192),
                                         (6, 2, 80, 70), (5, 1, 40, 33)])
@pytest.mark.parametrize("use_scratch", [False, True])
def test_attention(T, nq, nkv, hd, S, use_scratch, threads):
    r = rng(T + nq + S)
    q = r.standard_normal((T, nq * hd)).astype(np.float32)
    kc = r.standard_normal((S, nkv, hd)).astype(np.float32)
    vc = r.standard_normal((S, nkv, hd)).astype(np.float32)
    if S > 100:
        pos = np.sort(r.integers(S - 300, S, T)).astype(np.int32)
        pos[-1] = S - 1
    else:
        pos = (np.arange(T) + (S - T if S >= T else 0)).astype(np.int32) % S
        pos[0] = 0
    kv_of_q = (np.arange(nq) // (nq // nkv)).astype(np.int32)
    scale = 1.0 / math.sqrt(hd)
    out = np.full((T, nq * hd), np.nan, np.float32)
    # a given scratch with room for one row of heads and a half: one row at a time
    scratch = np.empty((nq + nq // 2, S), np.float32) if use_scratch else None
    K.attention(out, q, kc, vc, pos, kv_of_q, scale, scratch)
    np.testing.assert_allclose(out, naive_attention(q, kc, vc, pos, kv_of_q, scale), rtol=1e-4, atol=2e-5)


def test_attention_scratch_too_small():
    q, kc = np.zeros((2, 4 * 16), np.float32), np.zeros((8, 2, 16), np.float32)
    with pytest.raises(ValueError, match="scratch: needs >= 4 rows and >= 6 columns"):
        K.attention(np.empty_like(q), q, kc, kc, np.array([3, 5], np.int32), np.array([0, 0, 1, 1], np.int32),
                    0.25, np.empty((3, 8), np.float32))


def test_attention_ignores_future_rows():
    r = rng(1)
    T, nq, hd, S = 2, 2, 16, 10
    q = r.standard_normal((T, nq * hd)).astype(np.float32)
    kc = r.standard_normal((S, 1, hd)).astype(np.float32)
    vc = r.standard_normal((S, 1, hd)).astype(np.float32)
    pos = np.array([3, 4], np.int32)
    kvq = np.zeros(nq, np.int32)
    a = np.empty((T, nq * hd), np.float32)
    K.attention(a, q, kc, vc, pos, kvq, 0.3)
    kc[5:] = np.nan
    vc[5:] = np.nan
    b = np.empty_like(a)
    K.attention(b, q, kc, vc, pos, kvq, 0.3)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("nq,nkv,hd,S", [(1, 1, 32, 20), (3, 1, 64, 40), (9, 3, 64, 40), (4, 2, 32, 300)])
@pytest.mark.parametrize("q80", [False, True])
def test_attention_block(T, nq, nkv, hd, S, q80, threads):
    """attention_block == rope_interleaved on q and k, the cache rows written, then attention
    (and quantize_q80_act of the result): the same bits as the kernels it fuses. The rows are
    a sequence in KV slot 1 of 2; slot 0 is left alone."""
    r = rng(T * nq + S)
    qkv = r.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    kc = r.standard_normal((2, S, nkv, hd)).astype(np.float32)
    vc = r.standard_normal((2, S, nkv, hd)).astype(np.float32)
    pos = (np.arange(T) + (S - T) // 2).astype(np.int32)
    slots = np.ones(T, np.int32)
    cos, sin = _rope_tables(S, hd)
    kv_of_q = (np.arange(nq) // (nq // nkv)).astype(np.int32)
    scale = 1.0 / math.sqrt(hd)
    # the reference, kernel by kernel
    q, k, v = (a.copy() for a in np.split(qkv, [nq * hd, (nq + nkv) * hd], axis=1))
    K.rope_interleaved(q, pos, cos, sin, hd)
    K.rope_interleaved(k, pos, cos, sin, hd)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    kc_ref[1, pos], vc_ref[1, pos] = k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
    ref = np.empty((T, nq * hd), np.float32)
    K.attention(ref, q, kc_ref[1], vc_ref[1], pos, kv_of_q, scale)
    out = np.full((T, nq * hd), np.nan, np.float32)
    qs, d = np.zeros((T, nq * hd), np.int8), np.zeros((T, nq * hd // 32), np.float32)
    K.attention_block(out, qkv, kc, vc, pos, slots, cos, sin, kv_of_q, scale, (qs, d) if q80 else None)
    np.testing.assert_array_equal(qkv[:, :nq * hd], q)           # q rotated in place
    np.testing.assert_array_equal(kc, kc_ref)
    np.testing.assert_array_equal(vc, vc_ref)
    np.testing.assert_array_equal(out, ref)
    if q80:
        rq, rd = quantize_q80_parts(ref)
        np.testing.assert_array_equal(qs, rq)
        np.testing.assert_array_equal(d, rd)


def _three_sequences(seed, nq, nkv, hd, S):
    """Random K and V caches of 3 KV slots and a fused qkv row for each."""
    r = rng(seed)
    kc = r.standard_normal((3, S, nkv, hd)).astype(np.float32)
    vc = r.standard_normal((3, S, nkv, hd)).astype(np.float32)
    return kc, vc, r.standard_normal((3, (nq + 2 * nkv) * hd)).astype(np.float32)


def test_attention_block_rows_of_several_sequences():
    """Rows of three sequences at different positions (a batched decode step) == each alone."""
    nq, nkv, hd, S = 4, 2, 32, 30
    kc, vc, qkv = _three_sequences(7, nq, nkv, hd, S)
    pos, slots = np.array([4, 17, 0], np.int32), np.array([2, 0, 1], np.int32)
    cos, sin = _rope_tables(S, hd)
    kvq = np.array([0, 0, 1, 1], np.int32)
    alone = np.empty((3, nq * hd), np.float32)
    kc1, vc1 = kc.copy(), vc.copy()
    for i in range(3):
        row = qkv[i:i + 1].copy()
        K.attention_block(alone[i:i + 1], row, kc1[slots[i]:slots[i] + 1], vc1[slots[i]:slots[i] + 1],
                          pos[i:i + 1], None, cos, sin, kvq, 0.2)
    out = np.empty_like(alone)
    K.attention_block(out, qkv, kc, vc, pos, slots, cos, sin, kvq, 0.2)
    np.testing.assert_array_equal(out, alone)
    np.testing.assert_array_equal(kc, kc1)
    with pytest.raises(ValueError, match="slots"):
        K.attention_block(out, qkv, kc, vc, pos, np.array([0, 3, 1], np.int32), cos, sin, kvq, 0.2)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_attention_long_row_same_bits_on_any_threads_and_in_a_batch():
    """One row of many positions (a decode step at long context: its blocks of positions run
    over the threads) gives the bits of one thread, and of the same row in a batch (its rows
    over the threads); checked against the naive attention too."""
    nq, nkv, hd, S = 8, 2, 64, 1100
    kc, vc, qkv = _three_sequences(11, nq, nkv, hd, S)
    pos, slots = np.array([1000, 700, 999], np.int32), np.array([0, 1, 2], np.int32)
    cos, sin = _rope_tables(S, hd)
    kvq = np.repeat(np.arange(nkv), nq // nkv).astype(np.int32)
    old, rows_out = K.get_num_threads(), []
    try:
        for threads, rows in ((1, 1), (2, 1), (2, 3)):
            K.set_num_threads(threads)
            kc1, vc1, q1 = kc.copy(), vc.copy(), qkv[:rows].copy()
            out = np.empty((rows, nq * hd), np.float32)
            K.attention_block(out, q1, kc1, vc1, pos[:rows], slots[:rows], cos, sin, kvq, 0.125)
            rows_out.append(out[0])
    finally:
        K.set_num_threads(old)
    np.testing.assert_array_equal(rows_out[1], rows_out[0])
    np.testing.assert_array_equal(rows_out[2], rows_out[0])
    q, k, v = (a.copy() for a in np.split(qkv[:1], [nq * hd, (nq + nkv) * hd], axis=1))
    K.rope_interleaved(q, pos[:1], cos, sin, hd)
    K.rope_interleaved(k, pos[:1], cos, sin, hd)
    kc[0, pos[0]], vc[0, pos[0]] = k.reshape(nkv, hd), v.reshape(nkv, hd)
    np.testing.assert_allclose(rows_out[0], naive_attention(q, kc[0], vc[0], pos[:1], kvq, 0.125)[0],
                               rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_rmsnorm_heads(T):
    r = rng(T)
    hd, nh = 16, 5
    x = r.standard_normal((T, 8 * hd)).astype(np.float32)
    w = r.standard_normal(hd).astype(np.float32)
    ref = x.copy()
    heads = ref[:, hd:hd + nh * hd].reshape(T * nh, hd)
    ref[:, hd:hd + nh * hd] = naive_rmsnorm(heads, w, 1e-6).reshape(T, nh * hd)
    K.rmsnorm_heads(x, hd, nh, w, 1e-6)
    np.testing.assert_allclose(x, ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(x[:, :hd], ref[:, :hd])          # other columns untouched
    np.testing.assert_array_equal(x[:, (nh + 1) * hd:], ref[:, (nh + 1) * hd:])
    with pytest.raises(ValueError, match="fit"):
        K.rmsnorm_heads(x, 4 * hd, nh, w, 1e-6)


# ---------------------------------------------------------------- errors

def test_errors():
    f = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="dtype"):
        K.rmsnorm(f, f.astype(np.float64), np.ones(64, np.float32), 1e-5)
    with pytest.raises(ValueError, match="shape"):
        K.rmsnorm(f, f, np.ones(63, np.float32), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        K.silu_mul(f[:, ::4].copy(), f[:, ::2])
    with pytest.raises(ValueError, match="even"):
        K.silu_mul(f[:, :16].copy(), f[:, :33].copy())
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize_q80_act(np.zeros((1, 40), np.int8), np.zeros((1, 1), np.float32), np.zeros((1, 40), np.float32))
    with pytest.raises(ValueError, match="d: expected shape"):
        K.quantize_q80_act(np.zeros((2, 64), np.int8), np.zeros((2, 3), np.float32), f)
    w = Q40Matrix.from_blocks(quantize_q40(np.ones((5, 64), np.float32)))
    xq, xd = np.zeros((2, 64), np.int8), np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="out"):
        K.matmul_q80_q40(np.zeros((2, 6), np.float32), xq, xd, w)
    with pytest.raises(ValueError, match="columns"):
        K.matmul_q80_q40(np.zeros((2, 5), np.float32), np.zeros((2, 96), np.int8), np.zeros((2, 3), np.float32), w)
    with pytest.raises(ValueError, match="dtype"):
        K.matmul_q80_q40(np.zeros((2, 5), np.float32), xq.astype(np.uint8), xd, w)
    with pytest.raises(ValueError, match="Q40Matrix"):
        K.matmul_q80_q40(np.zeros((2, 5), np.float32), xq, xd, np.zeros((5, 64), np.float32))
    with pytest.raises(ValueError, match="positions"):
        K.rope_interleaved(f, np.array([0, 9], np.int32), np.ones((4, 8), np.float32), np.ones((4, 8), np.float32), 16)
    with pytest.raises(ValueError, match="head_dim"):
        K.rope_interleaved(f, np.array([0, 1], np.int32), np.ones((4, 8), np.float32), np.ones((4, 8), np.float32), 15)
    kc = np.zeros((4, 1, 16), np.float32)
    kc4 = kc[np.newaxis].copy()
    with pytest.raises(ValueError, match="positions"):
        K.attention(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32), kc, kc,
                    np.array([0, 4], np.int32), np.zeros(2, np.int32), 1.0)
    with pytest.raises(ValueError, match="kv_of_q"):
        K.attention(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32), kc, kc,
                    np.array([0, 1], np.int32), np.array([0, 1], np.int32), 1.0)
    with pytest.raises(ValueError, match="scratch"):
        K.attention(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32), kc, kc,
                    np.array([0, 3], np.int32), np.zeros(2, np.int32), 1.0, np.zeros((2, 2), np.float32))
    qkv = np.zeros((2, 64), np.float32)
    cos = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        K.attention_block(np.zeros((2, 32), np.float32), qkv, kc4, kc4.copy(), np.array([0, 4], np.int32),
                          None, cos, cos, np.zeros(2, np.int32), 1.0)
    with pytest.raises(ValueError, match="qkv"):
        K.attention_block(np.zeros((2, 32), np.float32), qkv[:, :48].copy(), kc4, kc4.copy(),
                          np.array([0, 1], np.int32), None, cos, cos, np.zeros(2, np.int32), 1.0)
    with pytest.raises(ValueError, match="cos"):
        K.attention_block(np.zeros((2, 32), np.float32), qkv, kc4, kc4.copy(), np.array([0, 1], np.int32),
                          None, cos[:, :4].copy(), cos[:, :4].copy(), np.zeros(2, np.int32), 1.0)
    with pytest.raises(ValueError, match="columns"):
        K.matmul_f32(np.zeros((2, 3), np.float32), f, np.zeros((3, 32), np.float32))


def test_warmup():
    K.warmup()

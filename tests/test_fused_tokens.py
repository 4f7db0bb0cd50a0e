"""The fused token-wise stretches (kernels/fused_tokens.py) give the bits of their steps run
one by one (rmsnorm_q80, the row-tile matmul, silu_mul_q80) on the vnni512, avxvnni and avx2
paths (the lower ones forced on an AVX-512 VNNI host), on 1 and 2 threads; where they cannot be fused, bind_* say so (None)."""
import numpy as np
import pytest

from dllama_mpi import kernels as K
from dllama_mpi.kernels import simd
from dllama_mpi.kernels.fused_tokens import _PATH_TAGS
from dllama_mpi.kernels.matmul import _matmul_unchecked
from dllama_mpi.quant import Q40Matrix, Q41Matrix, Q80Matrix, quantize_q40, quantize_q41, quantize_q80

from test_kernels import threads  # noqa: F401  (the fixture)

FUSED = [p for p in simd.HOST_PATHS if p in _PATH_TAGS]     # vnni512, avxvnni, avx2


def _matrix(kind, rows, cols, r):
    w = (r.standard_normal((rows, cols)) * 0.05 + 0.01).astype(np.float32)
    if kind == "q41":
        return Q41Matrix.from_blocks(quantize_q41(w))
    return Q40Matrix.from_blocks(quantize_q40(w), "rows")


def _acts(T, n):
    return np.full((T, n), np.nan, np.float32), np.zeros((T, n), np.int8), np.zeros((T, n // 32), np.float32)


def _unfused_ffn(x, weight, eps, w13, w2, path):
    T, n = x.shape
    xb, xbq, xbd = _acts(T, n)
    K.rmsnorm_q80(xb, xbq, xbd, x, weight, eps)
    h13 = np.empty((T, w13.rows), np.float32)
    _matmul_unchecked(h13, xbq, xbd, w13, path)
    h, hq, hd = _acts(T, w2.cols)
    K.silu_mul_q80(h, hq, hd, h13)
    out = np.empty((T, w2.rows), np.float32)
    _matmul_unchecked(out, hq, hd, w2, path)
    return out, xb, xbq, xbd, h13, h, hq, hd


@pytest.mark.skipif(not FUSED, reason="the fused stretches run on the vnni512, avxvnni and avx2 paths (none here)")
@pytest.mark.parametrize("path", FUSED)
@pytest.mark.parametrize("kind13,kind2", [("q41", "q41"), ("q40", "q40"), ("q40", "q41")])
@pytest.mark.parametrize("T", [16, 17, 40])
@pytest.mark.parametrize("n,ffn", [(64, 96), (96, 320)])
def test_ffn_and_norm_matmul_give_the_bits_of_their_steps(path, kind13, kind2, T, n, ffn, threads):  # noqa: F811
    r = np.random.default_rng(T * 7 + n + ffn)
    x = r.standard_normal((T, n)).astype(np.float32)
    weight = (1 + 0.1 * r.standard_normal(n)).astype(np.float32)
    w13, w2 = _matrix(kind13, 2 * ffn, n, r), _matrix(kind2, n, ffn, r)
    want = _unfused_ffn(x, weight, 1e-5, w13, w2, path)

    out = np.full((T, n), np.nan, np.float32)
    h13 = np.full((T, 2 * ffn), np.nan, np.float32)
    (h, hq, hd), (xb, xbq, xbd) = _acts(T, ffn), _acts(T, n)
    call = K.bind_ffn(out, h13, h, hq, hd, xb, xbq, xbd, x, weight, 1e-5, w13, w2, path=path)
    assert call is not None
    call()
    for got, ref, name in zip((out, xb, xbq, xbd, h13, h, hq, hd), want,
                              ("out", "xb", "xbq", "xbd", "h13", "h", "hq", "hd")):
        np.testing.assert_array_equal(got, ref, err_msg=name)

    qkv = np.full((T, 2 * ffn), np.nan, np.float32)
    xb, xbq, xbd = _acts(T, n)
    call = K.bind_norm_matmul(qkv, xb, xbq, xbd, x, weight, 1e-5, w13, path=path)
    assert call is not None
    call()
    np.testing.assert_array_equal(qkv, want[4])
    np.testing.assert_array_equal(xbq, want[2])


def test_what_cannot_be_fused_is_said(threads):  # noqa: F811
    """Too few rows a thread, an 8-bit or a slab matrix, the generic path: None."""
    r = np.random.default_rng(0)
    n, ffn = 64, 96
    path = FUSED[0] if FUSED else "generic"
    w13, w2 = _matrix("q41", 2 * ffn, n, r), _matrix("q41", n, ffn, r)

    def ffn_call(T, w13=w13, w2=w2, path=path):
        x = r.standard_normal((T, n)).astype(np.float32)
        return K.bind_ffn(np.empty((T, n), np.float32), np.empty((T, 2 * ffn), np.float32), *_acts(T, ffn),
                          *_acts(T, n), x, np.ones(n, np.float32), 1e-5, w13, w2, path=path)

    rows_a_thread = 8
    assert ffn_call(rows_a_thread * threads - 1) is None
    assert ffn_call(rows_a_thread * threads, path="generic") is None
    w80 = Q80Matrix.from_blocks(quantize_q80(r.standard_normal((n, ffn)).astype(np.float32)))
    assert ffn_call(64, w2=w80) is None
    slab = Q40Matrix.from_blocks(quantize_q40(r.standard_normal((2 * ffn, n)).astype(np.float32)), "slab")
    assert ffn_call(64, w13=slab) is None
    if FUSED:
        assert ffn_call(rows_a_thread * threads) is not None

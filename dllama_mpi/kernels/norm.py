"""RMS norms: of whole rows (``rmsnorm``, fused with the Q80 quantisation in ``rmsnorm_q80``) and
of each head of a fused projection (``rmsnorm_heads``, Qwen3's q/k norms)."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
from numba import prange

from ..quant import QK
from ._checks import _F32, _check, _check_out
from . import _jit
from ._jit import _PAR_MIN_ROWS_WORK, _PAR_MIN_WORK, _parallel, _serial
from .q80 import _check_q80_io, _quantize_q80_act, _quantize_q80_act_f16c
from .simd import HAS_AVX2


@_serial
def _rmsnorm_rows(out, x, weight, eps, t0, t1, n):
    for t in range(t0, t1):
        ss = 0.0                                   # float64 accumulation
        for i in range(n):
            v = np.float64(x[t, i])
            ss += v * v
        inv = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * weight[i]


@_parallel
def _rmsnorm_par(out, x, weight, eps, T, n):
    for t in prange(T):
        _rmsnorm_rows(out, x, weight, eps, t, t + 1, n)


def rmsnorm(out: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight, per row.  mean(x^2) accumulated in float64,
    the scale rounded to float32, the products in float32 (as Hugging Face's LlamaRMSNorm)."""
    _check("x", x, np.float32, ndim=2)
    T, n = x.shape
    _check("weight", weight, np.float32, (n,))
    _check_out("out", out, np.float32, (T, n))
    if T * n >= _PAR_MIN_WORK and T > 1:
        _rmsnorm_par(out, x, weight, float(eps), T, n)
    else:
        _rmsnorm_rows(out, x, weight, float(eps), 0, T, n)


@_parallel
def _rmsnorm_q80_par(out, qs, d, x, weight, eps, T, n, f16c):
    """rmsnorm and its Q80 in one parallel region, row by row (the same bits as the serial pair)."""
    for t in prange(T):
        _rmsnorm_rows(out, x, weight, eps, t, t + 1, n)
        if f16c:
            _quantize_q80_act_f16c(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, n // QK)
        else:
            _quantize_q80_act(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, n // QK)


@_serial
def _rmsnorm_q80_ser(out, qs, d, x, weight, eps, T, n, f16c):
    _rmsnorm_rows(out, x, weight, eps, 0, T, n)
    if f16c:
        _quantize_q80_act_f16c(qs, d, out, T, n // QK)
    else:
        _quantize_q80_act(qs, d, out, T, n // QK)


def rmsnorm_q80(out: np.ndarray, qs: np.ndarray, d: np.ndarray, x: np.ndarray, weight: np.ndarray,
                eps: float) -> None:
    """rmsnorm(out, x, weight, eps) then quantize_q80_act(qs, d, out), in one call (decode: one
    dispatch instead of two).  Same bits as the two kernels."""
    bind_rmsnorm_q80(out, qs, d, x, weight, eps)()


def bind_rmsnorm_q80(out, qs, d, x, weight, eps: float):
    """rmsnorm_q80 for these arrays, checked once, as a call of no arguments (see bind_matmul)."""
    T, n = _check_q80_io(x, out, qs, d)
    if not (type(weight) is np.ndarray and weight.dtype == _F32 and weight.shape == (n,)
            and weight.flags.c_contiguous):
        _check("weight", weight, np.float32, (n,))
    if T * n >= _PAR_MIN_ROWS_WORK and T > 1 and _jit._NUM_THREADS > 1:
        return partial(_rmsnorm_q80_par, out, qs, d, x, weight, float(eps), T, n, HAS_AVX2)
    return partial(_rmsnorm_q80_ser, out, qs, d, x, weight, float(eps), T, n, HAS_AVX2)


@_serial
def _rmsnorm_heads(x, c0, nh, hd, weight, eps, T):
    for t in range(T):
        for h in range(nh):
            o = c0 + h * hd
            ss = 0.0                               # float64 accumulation, as _rmsnorm_rows
            for i in range(hd):
                v = np.float64(x[t, o + i])
                ss += v * v
            inv = np.float32(1.0 / math.sqrt(ss / hd + eps))
            for i in range(hd):
                x[t, o + i] = x[t, o + i] * inv * weight[i]


def rmsnorm_heads(x: np.ndarray, col0: int, n_heads: int, weight: np.ndarray, eps: float) -> None:
    """In place: rmsnorm of each head (len(weight) columns) of x[:, col0 : col0 + n_heads * head_dim]
    (Qwen3's per-head q and k norms on the fused projection)."""
    _check("x", x, np.float32, ndim=2)
    _check_out("x", x, np.float32, x.shape)
    _check("weight", weight, np.float32, ndim=1)
    hd = weight.shape[0]
    if col0 < 0 or hd == 0 or col0 + n_heads * hd > x.shape[1]:
        raise ValueError(f"heads [{col0}, {col0} + {n_heads}*{hd}) do not fit rows of {x.shape[1]}")
    _rmsnorm_heads(x, int(col0), int(n_heads), hd, weight, float(eps), x.shape[0])


"""The SwiGLU feed-forward nonlinearity: silu(g) * u, alone or fused with the Q80 quantisation
of its result (the input of the down projection)."""
from __future__ import annotations

from functools import partial

import numpy as np
from numba import prange

from ..quant import QK
from . import _jit
from ._checks import _F32, _check, _check_out
from ._jit import _PAR_MIN_ROWS_WORK, _PAR_MIN_WORK, _inline, _parallel, _serial
from .q80 import _q80_outputs_ok, _quantize_q80_act, _quantize_q80_act_f16c
from .simd import HAS_AVX2, _exp_f32


@_inline
def _silu_times(g, u):
    return g / (np.float32(1.0) + _exp_f32(-g)) * u   # _exp_f32 clamps: no inf under fastmath


@_serial
def _silu_mul_rows(out, gu, t0, t1, n):
    for t in range(t0, t1):
        for i in range(n):
            out[t, i] = _silu_times(gu[t, i], gu[t, n + i])


@_parallel
def _silu_mul_q80_split(out, qs, d, gu, n, f16c, nch):
    """One row (T = 1): silu·mul and its Q80, the 32-blocks cut into nch chunks over the
    threads (the same bits as _silu_mul_q80_ser: every block is computed alike)."""
    nb = n // QK
    per = (nb + nch - 1) // nch
    o2, q2, d2 = out.reshape((nb, QK)), qs.reshape((nb, QK)), d.reshape((nb, 1))
    for c in prange(nch):
        b0 = min(nb, c * per)
        b1 = min(nb, b0 + per)
        for i in range(b0 * QK, b1 * QK):
            out[0, i] = _silu_times(gu[0, i], gu[0, n + i])
        if f16c:
            _quantize_q80_act_f16c(q2[b0:b1], d2[b0:b1], o2[b0:b1], b1 - b0, 1)
        else:
            _quantize_q80_act(q2[b0:b1], d2[b0:b1], o2[b0:b1], b1 - b0, 1)


_SPLIT_MIN = 4096   # one row splits over the threads from this width (SmolLM2's 1536: serial)


@_parallel
def _silu_mul_par(out, gu, T, n):
    for t in prange(T):
        _silu_mul_rows(out, gu, t, t + 1, n)


@_parallel
def _silu_mul_q80_par(out, qs, d, gu, T, n, f16c):
    """silu·mul and its Q80 in one parallel region, row by row (the same bits as the serial pair)."""
    for t in prange(T):
        _silu_mul_rows(out, gu, t, t + 1, n)
        if f16c:
            _quantize_q80_act_f16c(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, n // QK)
        else:
            _quantize_q80_act(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, n // QK)


def _silu_mul_checks(out, gu) -> tuple[int, int]:
    _check("gate_up", gu, np.float32, ndim=2)
    T, n2 = gu.shape
    if n2 % 2:
        raise ValueError(f"gate_up: row length {n2} must be even (gate then up)")
    _check_out("out", out, np.float32, (T, n2 // 2))
    return T, n2 // 2


def silu_mul(out: np.ndarray, gate_up: np.ndarray) -> None:
    """out = g * sigmoid(g) * u (SwiGLU) where gate_up = [g | u], rows [T, 2n] -> out [T, n]."""
    T, n = _silu_mul_checks(out, gate_up)
    if T * n >= _PAR_MIN_WORK and T > 1:
        _silu_mul_par(out, gate_up, T, n)
    else:
        _silu_mul_rows(out, gate_up, 0, T, n)


@_serial
def _silu_mul_q80_ser(out, qs, d, gu, T, n, f16c):
    _silu_mul_rows(out, gu, 0, T, n)
    if f16c:
        _quantize_q80_act_f16c(qs, d, out, T, n // QK)
    else:
        _quantize_q80_act(qs, d, out, T, n // QK)


def silu_mul_q80(out: np.ndarray, qs: np.ndarray, d: np.ndarray, gate_up: np.ndarray) -> None:
    """silu_mul(out, gate_up) then quantize_q80_act(qs, d, out), in one call.  Same bits as the two."""
    bind_silu_mul_q80(out, qs, d, gate_up)()


def bind_silu_mul_q80(out, qs, d, gate_up):
    """silu_mul_q80 for these arrays, checked once, as a call of no arguments (see bind_matmul)."""
    try:
        T, n = gate_up.shape[0], gate_up.shape[1] // 2
        ok = (type(gate_up) is np.ndarray and gate_up.dtype == _F32 and gate_up.shape[1] == 2 * n
              and gate_up.flags.c_contiguous and _q80_outputs_ok(out, qs, d, T, n))
    except (AttributeError, IndexError, TypeError):
        ok = False
    if not ok:
        T, n = _silu_mul_checks(out, gate_up)
        if n % QK:
            raise ValueError(f"gate_up: half row length {n} must be a multiple of {QK}")
        _check_out("qs", qs, np.int8, (T, n))
        _check_out("d", d, np.float32, (T, n // QK))
    if T * n >= _PAR_MIN_ROWS_WORK and T > 1 and _jit._NUM_THREADS > 1:
        return partial(_silu_mul_q80_par, out, qs, d, gate_up, T, n, HAS_AVX2)
    if T == 1 and n >= _SPLIT_MIN and _jit._NUM_THREADS > 1:
        return partial(_silu_mul_q80_split, out, qs, d, gate_up, n, HAS_AVX2, _jit._NUM_THREADS)
    return partial(_silu_mul_q80_ser, out, qs, d, gate_up, T, n, HAS_AVX2)

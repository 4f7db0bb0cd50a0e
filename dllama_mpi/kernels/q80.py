"""Activation quantisation to Q80 (GGML Q8_0 per 32-block, split form: int8 values, f32 scales).

The rounding must match GGML's bit for bit, so these kernels are ``_exact`` (no fastmath).
Also the Q80 input/output checks the fused kernels (norm, attention, ffn) share.
"""
from __future__ import annotations

import math

import numpy as np

from ..quant import QK
from ._checks import _F32, _I8, _check, _check_out
from ._jit import _exact, _inline, _inline_plain
from .simd import HAS_AVX2, _f32_f16_f32


@_inline_plain
def _f32_to_f16_to_f32(v):
    """Round a finite non-negative float32 to the nearest float16 (ties to even), return as float32."""
    if v == np.float32(0.0):
        return np.float32(0.0)
    if v >= np.float32(65520.0):
        return np.float32(np.inf)
    m, e = math.frexp(np.float64(v))        # v = m * 2**e, 0.5 <= m < 1
    # fp16 normal: 11 significant bits for e >= -13 (v >= 2**-14); subnormal step 2**-24 below
    if e >= -13:
        step = math.ldexp(1.0, e - 11)
    else:
        step = 2.0 ** -24
    q = np.float64(v) / step                # exact (power-of-two scaling)
    r = math.floor(q)
    frac = q - r
    if frac > 0.5 or (frac == 0.5 and (r % 2.0) == 1.0):
        r += 1.0
    return np.float32(r * step)


@_inline_plain
def _round_away(v):
    """v (|v| <= 127.5) rounded half away from zero, as C's roundf, to int8: floor(|v|) plus 1
    when the fraction is >= 1/2, all in float32 (each step exact), so the loop vectorises."""
    a = abs(v)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return np.int8(np.int32(r if v >= np.float32(0.0) else -r))


@_exact
def _quantize_q80_act(qs_out, d_out, x, T, nb):
    for t in range(T):
        for b in range(nb):
            o = b * QK
            amax = np.float32(0.0)
            for i in range(QK):
                a = abs(x[t, o + i])
                if a > amax:
                    amax = a
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            for i in range(QK):
                qs_out[t, o + i] = _round_away(x[t, o + i] * inv)
            d_out[t, b] = _f32_to_f16_to_f32(d)


@_inline
def _absmax32(x, t, o):
    amax = np.float32(0.0)
    for i in range(QK):
        amax = max(amax, abs(x[t, o + i]))
    return amax


@_exact
def _quantize_q80_act_f16c(qs_out, d_out, x, T, nb):
    """_quantize_q80_act with the hardware float16 rounding and a vectorised max (same bits),
    a row at a time: its block maxima, then every block's scale and inverse in one vector loop,
    then the values (no division or float16 rounding between a block's max and its values)."""
    inv = np.empty(nb, np.float32)
    for t in range(T):
        for b in range(nb):
            inv[b] = _absmax32(x, t, b * QK)
        for b in range(nb):
            d = inv[b] / np.float32(127.0)
            d_out[t, b] = _f32_f16_f32(d)
            inv[b] = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        for b in range(nb):
            ib = inv[b]
            o = b * QK
            for i in range(QK):
                qs_out[t, o + i] = _round_away(x[t, o + i] * ib)


def quantize_q80_act(qs_out: np.ndarray, d_out: np.ndarray, x: np.ndarray) -> None:
    """GGML Q8_0 per 32-block: d = max|x|/127, q = roundf(x/d); d_out = float32(float16(d))."""
    T, n = _check_q80_io(x, None, qs_out, d_out)
    (_quantize_q80_act_f16c if HAS_AVX2 else _quantize_q80_act)(qs_out, d_out, x, T, n // QK)


def _check_q80_io(x, out, qs, d) -> tuple[int, int]:
    """x f32 [T, n], n a multiple of 32 -> (out f32 [T, n] unless None), qs int8 [T, n],
    d f32 [T, n/32], contiguous and writeable.  Returns (T, n).  Fast when all is right."""
    try:
        T, n = x.shape
        ok = (type(x) is np.ndarray and x.dtype == _F32 and x.flags.c_contiguous
              and _q80_outputs_ok(x if out is None else out, qs, d, T, n))
    except (AttributeError, ValueError, TypeError):
        ok = False
    if not ok:
        _check("x", x, np.float32, ndim=2)
        T, n = x.shape
        if n % QK:
            raise ValueError(f"x: row length {n} must be a multiple of {QK}")
        if out is not None:
            _check_out("out", out, np.float32, (T, n))
        _check_out("qs", qs, np.int8, (T, n))
        _check_out("d", d, np.float32, (T, n // QK))
    return T, n


def _q80_outputs_ok(out, qs, d, T: int, n: int) -> bool:
    """out f32 [T, n], qs int8 [T, n], d f32 [T, n/32]: contiguous and writeable (fast, no messages)."""
    try:
        return (type(out) is np.ndarray and type(qs) is np.ndarray and type(d) is np.ndarray
                and out.dtype == _F32 and qs.dtype == _I8 and d.dtype == _F32 and n % QK == 0
                and out.shape == (T, n) and qs.shape == (T, n) and d.shape == (T, n // QK)
                and out.flags.c_contiguous and qs.flags.c_contiguous and d.flags.c_contiguous
                and out.flags.writeable and qs.flags.writeable and d.flags.writeable)
    except (AttributeError, TypeError):
        return False

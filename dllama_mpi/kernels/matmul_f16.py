"""F16 weights x F32 activations: ``out[t, r] = sum_c f32(w[r, c]) * x[t, c]``.

The weights stay float16 in memory (half the bytes of f32: what a decode step streams) and are
widened to f32 as they are read (``_h2f``: vcvtph2ps with F16C); products and sums are f32. One
token: a fused convert-multiply-add pass per row. Several: each row is widened once into a
small f32 buffer (L1), then dotted with the tokens four at a time (every weight load feeds
four accumulators). Parallel over bands of rows.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import _inline, _parallel, _serial
from .simd import _h2f

_BAND_ROWS = 16     # rows per parallel work item


@_serial
def _f16_rows_serial(out, x, w, rows, cols, T):
    buf = np.empty(cols, np.float32)
    for r in range(rows):
        _f16_row(out, x, w, r, cols, T, buf)


@_parallel
def _f16_rows_par(out, x, w, rows, cols, T):
    nband = (rows + _BAND_ROWS - 1) // _BAND_ROWS
    for k in prange(nband):
        buf = np.empty(cols, np.float32)
        for r in range(k * _BAND_ROWS, min(rows, (k + 1) * _BAND_ROWS)):
            _f16_row(out, x, w, r, cols, T, buf)


@_inline
def _f16_row(out, x, w, r, cols, T, buf):
    if T == 1:
        acc = np.float32(0)
        for c in range(cols):
            acc += _h2f(w[r, c]) * x[0, c]
        out[0, r] = acc
        return
    for c in range(cols):
        buf[c] = _h2f(w[r, c])
    t = 0
    while t + 4 <= T:
        a0 = a1 = a2 = a3 = np.float32(0)
        for c in range(cols):
            v = buf[c]
            a0 += v * x[t, c]
            a1 += v * x[t + 1, c]
            a2 += v * x[t + 2, c]
            a3 += v * x[t + 3, c]
        out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = a0, a1, a2, a3
        t += 4
    while t < T:
        a = np.float32(0)
        for c in range(cols):
            a += buf[c] * x[t, c]
        out[t, r] = a
        t += 1

"""A layer's token-wise stretches in one parallel region each: RMSNorm then a matmul (the
attention's input projection), and the whole SwiGLU feed-forward (RMSNorm, gate and up, silu·mul,
down).

Every step of such a stretch reads only its own token's row of the step before, so when the
matmuls split their work by token groups (``matmul_rows._grid``: from 8 tokens a thread) each
thread can run its tokens through every step with no barrier between: one parallel region
instead of four (the FFN), or two. A parallel region a step cost the 2-thread FFN of 16
SmolLM2 rows 11% (222 µs a layer against 197 fused) and left its 2 threads at 1.68x one;
fused, 1.90x (1.98x for 128 rows).

The steps are the unfused kernels' own helpers on each thread's rows, so the results are the
same bits. Row-tile Q4 weights (Q40 in the row layout, Q41), on the vnni512, avxvnni and avx2
paths: one body for all, whose row-tile kernel (``_q4_tiles``) numba picks when it compiles from
the type of a tag argument (``_PATH_TAGS``: an empty array whose dtype names the path), so a host
without VNNI never compiles the VNNI tiles. ``bind_*`` return None where a stretch
cannot be fused (other weight types, the portable path, fewer than 8 tokens a thread) and the
caller runs the steps one by one.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from numba import prange, types
from numba.extending import overload

from ..quant import QK
from . import _jit
from ._jit import _inline, _parallel
from .ffn import _silu_mul_rows
from .matmul import q4_row_tiles
from .matmul_rows import _ACC, _RT4, _rbuffers, _rows_prep_range, _rows_q4_tiles
from .matmul_vnni import VNNI_TAGS, _ACCV, _NTV, _q4v_tiles
from .norm import _rmsnorm_rows
from .q80 import _quantize_q80_act_f16c
from .simd import KERNELS

_TOKENS_MIN = _NTV                # tokens a thread from which the matmuls split by tokens


@_inline
def _norm_q80_rows(xb, xbq, xbd, x, weight, eps, t0, t1):
    """Rows t0..t1-1: xb = rmsnorm(x) * weight and its Q80 (rmsnorm_q80's helpers)."""
    _rmsnorm_rows(xb, x, weight, eps, t0, t1, x.shape[1])
    _quantize_q80_act_f16c(xbq[t0:t1], xbd[t0:t1], xb[t0:t1], t1 - t0, x.shape[1] // QK)


@_inline
def _silu_q80_rows(h, hq, hd, h13, t0, t1):
    """Rows t0..t1-1: h = silu(gate) * up from h13 and its Q80 (silu_mul_q80's helpers)."""
    _silu_mul_rows(h, h13, t0, t1, h.shape[1])
    _quantize_q80_act_f16c(hq[t0:t1], hd[t0:t1], h[t0:t1], t1 - t0, h.shape[1] // QK)


@_inline
def _span(T, nch, c):
    per = (T + nch - 1) // nch
    return min(T, c * per), min(T, c * per + per)


# the fused paths as numba types: (tag, per-thread tile sums) of each
_PATH_TAGS = {**{path: (tag, _ACCV) for path, tag in VNNI_TAGS.items()}, "avx2": (np.zeros(0, np.int16), _ACC)}


def _q4_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc):
    """The row tiles k0..k1-1 of tokens t0..t1-1 by the row-tile kernel of the path tag names
    (_PATH_TAGS); chosen when numba compiles the caller."""


@overload(_q4_tiles)
def _q4_tiles_of_path(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc):
    if tag.dtype in (types.int8, types.uint8):
        def vnni(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc):
            _q4v_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc)
        return vnni

    def avx2(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc):
        _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc)
    return avx2


@_inline
def _matmul_rows(tag, out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, t0, t1, acc):
    """Rows t0..t1-1 of out = (xq, xd) · w^T for a row-tile Q4 matrix w (buf ...): their
    activation sums, then every row tile (the path's matmul's own steps)."""
    _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, hasm)
    _q4_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, 0, (rows + _RT4 - 1) // _RT4, t0, t1, acc)


@_parallel
def _norm_matmul_fused(tag, out, xb, xbq, xbd, x, weight, eps, buf, rows, nb, sb, hasm, xi, xf, acc, nch):
    for c in prange(nch):
        t0, t1 = _span(x.shape[0], nch, c)
        _norm_q80_rows(xb, xbq, xbd, x, weight, eps, t0, t1)
        _matmul_rows(tag, out, xbq, xbd, xi, xf, buf, rows, nb, sb, hasm, t0, t1, acc[c])


@_parallel
def _ffn_fused(tag, out, h13, h, hq, hd, xb, xbq, xbd, x, weight, eps, b13, r13, nb13, sb13, m13, xi13, xf13,
               b2, r2, nb2, sb2, m2, xi2, xf2, acc, nch):
    for c in prange(nch):
        t0, t1 = _span(x.shape[0], nch, c)
        _norm_q80_rows(xb, xbq, xbd, x, weight, eps, t0, t1)
        _matmul_rows(tag, h13, xbq, xbd, xi13, xf13, b13, r13, nb13, sb13, m13, t0, t1, acc[c])
        _silu_q80_rows(h, hq, hd, h13, t0, t1)
        _matmul_rows(tag, out, hq, hd, xi2, xf2, b2, r2, nb2, sb2, m2, t0, t1, acc[c])


def _fusable(T: int, path: str, *mats, tokens_min: int = _TOKENS_MIN) -> bool:
    return (path in _PATH_TAGS and T >= tokens_min * _jit._NUM_THREADS
            and all(q4_row_tiles(w) is not None and w.rows for w in mats))


def _q80_rows_ok(a, q, d, n: int, T: int) -> bool:
    """a [T, n] f32 rows and their Q80 (q int8 [T, n], d f32 [T, n/32]), all writeable."""
    return (n % QK == 0 and a.shape == (T, n) and q.shape == (T, n) and d.shape == (T, n // QK)
            and a.dtype == np.float32
            and q.dtype == np.int8 and d.dtype == np.float32
            and all(v.flags.c_contiguous and v.flags.writeable for v in (a, q, d)))


def bind_norm_matmul(out, xb, xbq, xbd, x, weight, eps: float, w, path: str = KERNELS):
    """out = w · Q80(rmsnorm(x) * weight) with xb, (xbq, xbd) = the normed rows and their Q80, in
    one parallel region: the call (no arguments), or None where it cannot be fused (then run
    bind_rmsnorm_q80 and bind_matmul). Arrays the model's own (checked here once)."""
    T, n = x.shape
    if not (_fusable(T, path, w) and w.cols == n and out.shape == (T, w.rows) and out.dtype == np.float32
            and out.flags.c_contiguous and out.flags.writeable and x.dtype == np.float32 and x.flags.c_contiguous
            and weight.shape == (n,) and weight.dtype == np.float32 and _q80_rows_ok(xb, xbq, xbd, n, T)):
        return None
    buf, rows, nb, sb, hasm = q4_row_tiles(w)
    tag, acc = _PATH_TAGS[path]
    return partial(_norm_matmul_fused, tag, out, xb, xbq, xbd, x, weight, float(eps), buf, rows, nb, sb, hasm,
                   *_rbuffers(T, nb), acc, _jit._NUM_THREADS)


def bind_ffn(out, h13, h, hq, hd, xb, xbq, xbd, x, weight, eps: float, w13, w2, path: str = KERNELS):
    """The SwiGLU FFN of every row in one parallel region: xb = rmsnorm(x) * weight (and its
    Q80 xbq, xbd), h13 = w13 · xb, h = silu(gate) * up (and its Q80 hq, hd), out = w2 · h. The
    call (no arguments), or None where it cannot be fused."""
    T, n = x.shape
    if not (_fusable(T, path, w13, w2) and w13.cols == n and w13.rows % 2 == 0 and w2.cols == w13.rows // 2
            and out.shape == (T, w2.rows) and h13.shape == (T, w13.rows)
            and all(a.dtype == np.float32 and a.flags.c_contiguous for a in (out, h13, x))
            and out.flags.writeable and h13.flags.writeable
            and weight.shape == (n,) and weight.dtype == np.float32
            and _q80_rows_ok(xb, xbq, xbd, n, T) and _q80_rows_ok(h, hq, hd, w2.cols, T)):
        return None
    b13, r13, nb13, sb13, m13 = q4_row_tiles(w13)
    b2, r2, nb2, sb2, m2 = q4_row_tiles(w2)
    tag, acc = _PATH_TAGS[path]
    return partial(_ffn_fused, tag, out, h13, h, hq, hd, xb, xbq, xbd, x, weight, float(eps),
                   b13, r13, nb13, sb13, m13, *_rbuffers(T, nb13), b2, r2, nb2, sb2, m2, *_rbuffers(T, nb2),
                   acc, _jit._NUM_THREADS)

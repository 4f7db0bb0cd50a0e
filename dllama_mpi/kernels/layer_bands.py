"""Every decoder layer in one parallel region when the threads split the rows of each matrix:
a step of few rows (a decode step of one sequence, a few sequences on many threads) or one
whose sequences cross the token groups of ``fused_layer``.

On one rank, each thread computes a band of every matmul's output rows for all tokens (the
split the unfused kernels use for few rows), and the threads meet at a barrier (``barrier``)
wherever a step reads the whole of the step before; between barriers every thread works on
what is its own:

    RMSNorm and the Q80 of x      token groups (rows of x)        | barrier
    q|k|v = wqkv · xb             row bands of wqkv                | barrier
    rope, the K and V store       token groups                     | barrier
    attention and its Q80         query heads (whole 32-blocks)    | barrier
    x += wo · att                 row bands of wo (columns of x)   | barrier
    RMSNorm and the Q80 of x      token groups                     | barrier
    h = silu(w1·xb) * w3·xb, Q80  bands of hidden units (32-blocks)| barrier
    x += w2 · h                   row bands of w2                  | barrier

Eight barriers a layer (~0.1 µs each on two cores) where the steps run as ~4 parallel
regions (10-20 µs each to start and join). The helpers are the unfused kernels' own (the
row-tile matmul's tiles, attention's row over a range of heads, the norm, silu·mul and Q80
helpers), each block and row computed alike, so the results are the same bits."""
from __future__ import annotations

from numba import prange

from ..quant import QK
from ._jit import _inline, _parallel
from .attention import _attend_row, _rope_store_row
from .barrier import _barrier, _rendezvous
from .ffn import _silu_times
from .fused_tokens import _norm_q80_rows, _q4_tiles, _span
from .matmul_rows import _RT4, _rows_prep_range
from .q80 import _quantize_q80_act_f16c


@_inline
def _band(n, unit, nch, c):
    """Chunk c's share [lo, hi) of n items, cut at multiples of unit."""
    per = ((n + unit - 1) // unit + nch - 1) // nch * unit
    return min(n, c * per), min(n, c * per + per)


@_inline
def _row(a, t, lo, hi):
    """a[t, lo:hi] as a C-contiguous array of one row (what the row kernels take; a slice of
    several rows' columns is strided, and its loops do not vectorise)."""
    return a[t, lo:hi].reshape((1, hi - lo))


@_inline
def _prep(w, xq, xd, t0, t1, b0, b1):
    """The activation sums of w's input (_rows_prep_range) for tokens t0..t1-1, blocks b0..b1-1."""
    buf, rows, nb, sb, hasm, xi, xf = w
    if b0 == 0 and b1 == nb:
        _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, hasm)
    else:
        for t in range(t0, t1):
            _rows_prep_range(_row(xi, t, b0, b1), xf[t, b0:b1].reshape((1, b1 - b0, 4)),
                             _row(xq, t, b0 * QK, b1 * QK), _row(xd, t, b0, b1), 0, 1, b1 - b0, hasm)


@_inline
def _tile_rows(tag, out, xq, w, k0, k1, T, acc):
    """Rows of out's row tiles k0..k1-1, every token (the input's sums prepared)."""
    buf, rows, nb, sb, hasm, xi, xf = w
    _q4_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, 0, T, acc)


@_inline
def _add_band(x, y, T, r0, r1):
    """Columns r0..r1-1 of x += those of y, every row (a thread's band of a matmul's output)."""
    for t in range(T):
        for i in range(r0, r1):
            x[t, i] += y[t, i]


@_inline
def _matmul_add(tag, x, out, xq, w, T, nch, c, acc):
    """x += w · input on this thread's band of w's row tiles."""
    rows = w[1]
    k0, k1 = _band((rows + _RT4 - 1) // _RT4, 1, nch, c)
    _tile_rows(tag, out, xq, w, k0, k1, T, acc)
    _add_band(x, out, T, min(rows, k0 * _RT4), min(rows, k1 * _RT4))


@_inline
def _q80_blocks(q, d, a, T, b0, b1):
    """The Q80 of blocks b0..b1-1 of every row of a (each block on its own: the whole row's bits)."""
    for t in range(T):
        _quantize_q80_act_f16c(_row(q, t, b0 * QK, b1 * QK), _row(d, t, b0, b1), _row(a, t, b0 * QK, b1 * QK),
                               1, b1 - b0)


@_inline
def _layer_bands(tag, x, eps, acts, layer, attn, T, acc, c, nch, state):
    """This thread's share of one layer of every row (the module's table), x updated in place;
    the times it gave its core away at the barriers."""
    xb, xbq, xbd, qkv, att, attq, attd, attn_out, h13, h, hq, hs, ffn_out = acts
    positions, slots, cos, sin, kv_of_q, scale, scratch, nq, nkv, hd = attn
    attn_norm, ffn_norm, wqkv, wo, w13, w2, k_cache, v_cache = layer
    t0, t1 = _span(T, nch, c)
    nbx = x.shape[1] // QK
    yields = 0
    # attention: x += wo · attention(rope(q), rope(k), v), [q k v] = wqkv · rmsnorm(x)
    _norm_q80_rows(xb, xbq, xbd, x, attn_norm, eps, t0, t1)
    _prep(wqkv, xbq, xbd, t0, t1, 0, nbx)
    yields += _barrier(state, nch)
    k0, k1 = _band((wqkv[1] + _RT4 - 1) // _RT4, 1, nch, c)
    _tile_rows(tag, qkv, xbq, wqkv, k0, k1, T, acc)
    yields += _barrier(state, nch)
    for t in range(t0, t1):
        _rope_store_row(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, t)
    yields += _barrier(state, nch)
    h0, h1 = _band(nq, 1, nch, c)
    for t in range(T):
        _attend_row(att, qkv, k_cache, v_cache, t, slots[t], positions[t] + 1, hd, kv_of_q, h0, h1, scale,
                    scratch, 0)
    b0, b1 = h0 * hd // QK, h1 * hd // QK
    _q80_blocks(attq, attd, att, T, b0, b1)
    _prep(wo, attq, attd, 0, T, b0, b1)
    yields += _barrier(state, nch)
    _matmul_add(tag, x, attn_out, attq, wo, T, nch, c, acc)
    yields += _barrier(state, nch)
    # feed-forward: x += w2 · (silu(w1 · xb) * w3 · xb), xb = rmsnorm(x); h13 = [w1·xb | w3·xb]
    _norm_q80_rows(xb, xbq, xbd, x, ffn_norm, eps, t0, t1)
    _prep(w13, xbq, xbd, t0, t1, 0, nbx)
    yields += _barrier(state, nch)
    n = h.shape[1]
    u0, u1 = _band(n, QK, nch, c)                       # hidden units: whole 32-blocks (and row tiles)
    _tile_rows(tag, h13, xbq, w13, u0 // _RT4, u1 // _RT4, T, acc)
    _tile_rows(tag, h13, xbq, w13, (n + u0) // _RT4, (n + u1) // _RT4, T, acc)
    for t in range(T):
        for i in range(u0, u1):
            h[t, i] = _silu_times(h13[t, i], h13[t, n + i])
    _q80_blocks(hq, hs, h, T, u0 // QK, u1 // QK)
    _prep(w2, hq, hs, 0, T, u0 // QK, u1 // QK)
    yields += _barrier(state, nch)
    _matmul_add(tag, x, ffn_out, hq, w2, T, nch, c, acc)
    yields += _barrier(state, nch)
    return yields


@_parallel
def _layers_banded(tag, x, eps, acts, layers, attn, acc, nch, state, ran):
    """Every layer, the threads splitting each step (_layer_bands): one parallel region a
    forward pass. ran[c, 0] = 1 in every chunk when the chunks met (barrier._rendezvous), else
    0 and nothing was computed; ran[c, 1] = the times chunk c gave its core away waiting."""
    T = x.shape[0]
    for c in prange(nch):
        ran[c, 0] = 0
        ran[c, 1] = 0
        if _rendezvous(state, nch):
            yields = 0
            for i in range(len(layers)):
                yields += _layer_bands(tag, x, eps, acts, layers[i], attn, T, acc[c], c, nch, state)
            ran[c, 0] = 1
            ran[c, 1] = yields

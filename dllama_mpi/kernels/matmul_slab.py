"""Q80 x Q40 matmul on the slab layout (``Q40Matrix`` with ``layout == "slab"``): wide matrices.

The AVX2 kernels (hand-written ``vpmaddubsw`` loops) and their portable twins, which give the
same bits.  The dispatch (which kernel, serial or parallel) is in ``matmul``.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant import QK, SLAB_BLOCKS
from ._jit import _inline, _inline_plain, _parallel, _serial
from .simd import _NT, _h2f, _i8, _i16, _prefetch, _v16i16, _v32i8

# Layout (see quant.Q40Matrix): per slab s (G <= 64 blocks) the rows come in tiles of R rows
# (R = 1 if G >= 16, else 64 // G); a tile is [8, L, 2] nibble bytes with L = R*G lanes, lane =
# (row, block): byte pair p of every lane side by side.  The activation is rearranged once per
# call to match (int8, [slab, token, 8, 64, 2]: the tokens of one slab contiguous; repeated R times
# across the lanes): xl[.., p, lane, e] = xq[t, block, 2p + e], xh[...] = xq[t, block, 16 + 2p + e],
# so that, for 16 lanes at once, AVX2 vpmaddubsw(lo nibbles, xl) + vpmaddubsw(hi, xh) adds 4
# products per lane per 32-byte load.  Each lane accumulates, in int16,
#     a = -8 * sum(xq of the block) + sum_i nibble_i * xq_i  =  sum_i (nibble_i - 8) * xq_i
# which is exact: each vpmaddubsw pair sum is <= 2*15*127 (no saturation), the true block dot lies
# in [-32512, 32512], and int16 addition is exact modulo 2**16.  Then
#     out[t, r] += sum_b float32(a[r, b]) * (d_w[r, b] * xd[t, b])          (float32, per slab)
# When L is not a multiple of 16 the last 16-lane group overlaps the previous one (same lane values
# computed twice); tiles of fewer than 16 lanes (tiny matrices) and every tile when the CPU lacks
# AVX2 go through a plain scalar loop over the same layout.  _NT = 4 tokens share each unpacking
# of the weights (prefill); software prefetch runs PREFETCH_ROWS KB ahead of the weight stream.

_SG = SLAB_BLOCKS
_TT = 8                            # token tile (8 tokens' activation slabs = 16 KB, L1)
_RB = 64                           # row tile (64 rows x 1 KB slab tiles = 64 KB, L2)
_XSLAB = 16 * SLAB_BLOCKS          # activation bytes per slab (xl or xh) = 8 pairs * 64 blocks * 2
PREFETCH_ROWS = 4                  # software prefetch distance, in weight tiles (rows of a slab)


@intrinsic
def _group_dot16(typingctx, s16, so, q, qo, qstride, xl, xh, xo, xi, io):
    """s16[so:so+16] = xi[io:io+16] + sum_{p<8} maddubs(lo(q[qo + p*qstride: +32]), xl[xo + p*128: +32])
                                             + maddubs(hi(q[...]), xh[xo + p*128: +32])      (int16 lanes)"""
    sig = types.void(s16, so, q, qo, qstride, xl, xh, xo, xi, io)

    def codegen(context, builder, signature, args):
        s16v, sov, qv, qov, qsv, xlv, xhv, xov, xiv, iov = args
        s16t, _, qt, _, _, xlt, xht, _, xit, _ = signature.args

        def ptr(aryty, ary, off, vty):
            data = context.make_array(aryty)(context, builder, value=ary).data
            return builder.bitcast(builder.gep(data, [off]), vty.as_pointer())

        fnty = ir.FunctionType(_v16i16, [_v32i8, _v32i8])
        maddubs = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.ub.sw")
        low4 = ir.Constant(_v32i8, [ir.Constant(_i8, 15)] * 32)
        four = ir.Constant(_v16i16, [ir.Constant(_i16, 4)] * 16)
        acc = builder.load(ptr(xit, xiv, iov, _v16i16), align=1)
        for p in range(8):
            qoff = builder.add(qov, builder.mul(qsv, ir.Constant(qsv.type, p)))
            raw = builder.load(ptr(qt, qv, qoff, _v32i8), align=1)
            lo = builder.and_(raw, low4)
            hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(raw, _v16i16), four), _v32i8), low4)
            xoff = builder.add(xov, ir.Constant(xov.type, p * 2 * _SG))
            xlo = builder.load(ptr(xlt, xlv, xoff, _v32i8), align=1)
            xhi = builder.load(ptr(xht, xhv, xoff, _v32i8), align=1)
            acc = builder.add(acc, builder.call(maddubs, [lo, xlo]))
            acc = builder.add(acc, builder.call(maddubs, [hi, xhi]))
        builder.store(acc, ptr(s16t, s16v, sov, _v16i16), align=1)
        return context.get_dummy_value()
    return sig, codegen


def _make_group_dot16_tokens(nt: int):
    """_group_dot16 for nt consecutive tokens: each 32-byte weight load is unpacked once and used by
    all of them.  Token u's activation is at xo + u*_XSLAB, its xinit at io + u*_SG, its lanes go to
    s16[so + u*_SG: +16] (constant displacements: the tokens of a slab are contiguous)."""

    @intrinsic
    def group_dot16_tokens(typingctx, s16, so, q, qo, qstride, xl, xh, xo, xi, io):
        sig = types.void(s16, so, q, qo, qstride, xl, xh, xo, xi, io)

        def codegen(context, builder, signature, args):
            s16v, sov, qv, qov, qsv, xlv, xhv, xov, xiv, iov = args
            s16t, _, qt, _, _, xlt, xht, _, xit, _ = signature.args

            def ptr(aryty, ary, off, vty):
                data = context.make_array(aryty)(context, builder, value=ary).data
                return builder.bitcast(builder.gep(data, [off]), vty.as_pointer())

            def plus(v, k):
                return builder.add(v, ir.Constant(v.type, k))

            fnty = ir.FunctionType(_v16i16, [_v32i8, _v32i8])
            maddubs = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.ub.sw")
            low4 = ir.Constant(_v32i8, [ir.Constant(_i8, 15)] * 32)
            four = ir.Constant(_v16i16, [ir.Constant(_i16, 4)] * 16)
            accs = [builder.load(ptr(xit, xiv, plus(iov, u * _SG), _v16i16), align=1) for u in range(nt)]
            for p in range(8):
                qoff = builder.add(qov, builder.mul(qsv, ir.Constant(qsv.type, p)))
                raw = builder.load(ptr(qt, qv, qoff, _v32i8), align=1)
                lo = builder.and_(raw, low4)
                hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(raw, _v16i16), four), _v32i8), low4)
                for u in range(nt):
                    xoff = plus(xov, u * _XSLAB + p * 2 * _SG)
                    xlo = builder.load(ptr(xlt, xlv, xoff, _v32i8), align=1)
                    xhi = builder.load(ptr(xht, xhv, xoff, _v32i8), align=1)
                    accs[u] = builder.add(accs[u], builder.call(maddubs, [lo, xlo]))
                    accs[u] = builder.add(accs[u], builder.call(maddubs, [hi, xhi]))
            for u in range(nt):
                builder.store(accs[u], ptr(s16t, s16v, plus(sov, u * _SG), _v16i16), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return group_dot16_tokens


_group_dot16_tokens = _make_group_dot16_tokens(_NT)


@_inline_plain
def _rows_per_tile(g):
    """numba twin of quant.rows_per_tile: 1 if g >= 16 else 64 // g."""
    return 1 if g >= 16 else _SG // g


@_serial
def _prep_x(xl, xh, xinit, xq, T, nb):
    """Rearrange the Q80 activation for the slab kernel, slab-major then token (the tokens of a slab
    contiguous: no L1 set conflicts).  Lanes match the weight tiles: lane l = rep*G + b for the
    R = 64 // G rows of a tile (the activation repeated R times).
    xl/xh flat [nslab, T, 8, 64, 2] int8; xinit flat [nslab, T, 64] int16 = -8 * (sum of xq over
    each block), wrapped to int16."""
    for t in range(T):
        xt = xq[t]
        for b in range(nb):
            s = b // _SG
            bl = b - s * _SG
            g = min(_SG, nb - s * _SG)
            nrep = _rows_per_tile(g)
            base = (s * T + t) * _XSLAB
            tot = 0
            for p in range(8):
                for e in range(2):
                    lo = xt[b * QK + 2 * p + e]
                    hi = xt[b * QK + 16 + 2 * p + e]
                    for rep in range(nrep):
                        o = base + p * 2 * _SG + 2 * (rep * g + bl) + e
                        xl[o] = lo
                        xh[o] = hi
                    tot += np.int32(lo) + np.int32(hi)
            for rep in range(nrep):
                xinit[(s * T + t) * _SG + rep * g + bl] = np.int16(-8 * tot)


@_inline
def _lanes_scalar(s16, qs, qo, nl, xl, xh, xo, xinit, io, l_lo, l_hi):
    """The same int16 lane sums as _group_dot16, plain code, for lanes l_lo..l_hi-1 of a tile of nl lanes."""
    for ln in range(l_lo, l_hi):
        a = np.int32(xinit[io + ln])
        for p in range(8):
            for e in range(2):
                byte = np.int32(qs[qo + p * 2 * nl + 2 * ln + e])
                a += (byte & 15) * np.int32(xl[xo + p * 2 * _SG + 2 * ln + e])
                a += (byte >> 4) * np.int32(xh[xo + p * 2 * _SG + 2 * ln + e])
        s16[ln] = np.int16(a)


@_inline
def _scale_lanes(s16, db, xdt, g):
    """sum_b float32(s16[b]) * (d_w[b] * xd[b]) over the g lanes of one row of a slab (float32)."""
    acc = np.float32(0.0)
    for bl in range(g):
        acc += np.float32(s16[bl]) * (_h2f(db[bl]) * xdt[bl])
    return acc


@_inline
def _tile_out(out, t, su, dbits, dbase, tr0, nr, g, xdt, first):
    """out[t, rows of the tile] (+)= their scaled lane sums."""
    for i in range(nr):
        r = tr0 + i
        acc = _scale_lanes(su[i * g:i * g + g], dbits[dbase + r * g:dbase + r * g + g], xdt, g)
        if first:
            out[t, r] = acc
        else:
            out[t, r] += acc


@_inline
def _slab_rows_full(out, xl, xh, xinit, xd, qs, dbits, T, r0, r1, s16, s, g, qbase, dbase, b0):
    """_q40_rows_avx2 for a slab of G >= 16 blocks (one row per tile): the plain per-row loop.
    (The general multi-row tile loop below is slower for these.)"""
    g16 = (g // 16) * 16
    for rb0 in range(r0, r1, _RB):
        for t0 in range(0, T, _TT):
            for r in range(rb0, min(r1, rb0 + _RB)):
                qo = qbase + r * 16 * g
                db = dbits[dbase + r * g:dbase + r * g + g]
                if PREFETCH_ROWS > 0 and t0 == 0:       # the weight tile PREFETCH_ROWS rows ahead
                    for pl in range(0, 16 * g, 64):
                        _prefetch(qs, qo + PREFETCH_ROWS * 16 * g + pl)
                t1 = min(T, t0 + _TT)
                tm = t0 + (t1 - t0) // _NT * _NT
                for t in range(t0, tm, _NT):                # _NT tokens per unpacking
                    xo = (s * T + t) * _XSLAB
                    io = (s * T + t) * _SG
                    for j in range(0, g16, 16):
                        _group_dot16_tokens(s16, j, qs, qo + 2 * j, 2 * g, xl, xh, xo + 2 * j, xinit, io + j)
                    if g16 < g:                             # overlapping last group
                        j = g - 16
                        _group_dot16_tokens(s16, j, qs, qo + 2 * j, 2 * g, xl, xh, xo + 2 * j, xinit, io + j)
                    for u in range(_NT):
                        acc = _scale_lanes(s16[u * _SG:(u + 1) * _SG], db, xd[t + u, b0:b0 + g], g)
                        if s == 0:
                            out[t + u, r] = acc
                        else:
                            out[t + u, r] += acc
                for t in range(tm, t1):
                    xo = (s * T + t) * _XSLAB
                    io = (s * T + t) * _SG
                    for j in range(0, g16, 16):
                        _group_dot16(s16, j, qs, qo + 2 * j, 2 * g, xl, xh, xo + 2 * j, xinit, io + j)
                    if g16 < g:
                        j = g - 16
                        _group_dot16(s16, j, qs, qo + 2 * j, 2 * g, xl, xh, xo + 2 * j, xinit, io + j)
                    acc = _scale_lanes(s16, db, xd[t, b0:b0 + g], g)
                    if s == 0:
                        out[t, r] = acc
                    else:
                        out[t, r] += acc


@_serial
def _q40_rows_avx2(out, xl, xh, xinit, xd, qs, dbits, rows, nb, nslab, T, r0, r1, s16):
    """out[:, r0:r1] for all T tokens (r0 a multiple of every slab's rows per tile).
    Slab-major, so the activation slab stays in L1; tiles of _TT tokens x ~_RB rows."""
    if r0 >= r1:
        return
    for s in range(nslab):
        g = min(_SG, nb - s * _SG)
        R = _rows_per_tile(g)               # rows per weight tile
        qbase = s * rows * 16 * _SG
        dbase = s * rows * _SG
        b0 = s * _SG
        if R == 1:
            _slab_rows_full(out, xl, xh, xinit, xd, qs, dbits, T, r0, r1, s16, s, g, qbase, dbase, b0)
            continue
        k0 = r0 // R
        k1 = (r1 + R - 1) // R
        KB = max(1, _RB // R)
        for kb0 in range(k0, k1, KB):
            for t0 in range(0, T, _TT):
                t1 = min(T, t0 + _TT)
                for k in range(kb0, min(k1, kb0 + KB)):
                    tr0 = k * R
                    nr = min(R, r1 - tr0)
                    L = nr * g                     # lanes in this tile (<= 64)
                    L16 = (L // 16) * 16
                    qo = qbase + tr0 * 16 * g
                    if PREFETCH_ROWS > 0 and t0 == 0:     # weight bytes PREFETCH_ROWS KB ahead
                        for pl in range(0, 16 * L, 64):
                            _prefetch(qs, qo + PREFETCH_ROWS * 16 * _SG + pl)
                    tm = t0 + (t1 - t0) // _NT * _NT if L >= 16 else t0
                    for t in range(t0, tm, _NT):            # _NT tokens per unpacking of the weights
                        xo = (s * T + t) * _XSLAB
                        io = (s * T + t) * _SG
                        for j in range(0, L16, 16):
                            _group_dot16_tokens(s16, j, qs, qo + 2 * j, 2 * L, xl, xh, xo + 2 * j, xinit, io + j)
                        if L16 < L:                         # last group overlaps the previous one
                            j = L - 16
                            _group_dot16_tokens(s16, j, qs, qo + 2 * j, 2 * L, xl, xh, xo + 2 * j, xinit, io + j)
                        for u in range(_NT):
                            _tile_out(out, t + u, s16[u * _SG:(u + 1) * _SG], dbits, dbase, tr0, nr, g,
                                      xd[t + u, b0:b0 + g], s == 0)
                    for t in range(tm, t1):
                        xo = (s * T + t) * _XSLAB
                        io = (s * T + t) * _SG
                        for j in range(0, L16, 16):
                            _group_dot16(s16, j, qs, qo + 2 * j, 2 * L, xl, xh, xo + 2 * j, xinit, io + j)
                        if L16 < L:
                            if L >= 16:
                                j = L - 16
                                _group_dot16(s16, j, qs, qo + 2 * j, 2 * L, xl, xh, xo + 2 * j, xinit, io + j)
                            else:
                                _lanes_scalar(s16, qs, qo, L, xl, xh, xo, xinit, io, 0, L)
                        _tile_out(out, t, s16, dbits, dbase, tr0, nr, g, xd[t, b0:b0 + g], s == 0)


@_serial
def _q40_rows_generic(out, xl, xh, xinit, xd, qs, dbits, rows, nb, nslab, T, r0, r1, s16):
    """Same as _q40_rows_avx2 without the AVX2 intrinsics (any CPU; slow)."""
    if r0 >= r1:
        return
    for s in range(nslab):
        g = min(_SG, nb - s * _SG)
        R = _rows_per_tile(g)
        qbase = s * rows * 16 * _SG
        dbase = s * rows * _SG
        b0 = s * _SG
        for k in range(r0 // R, (r1 + R - 1) // R):
            tr0 = k * R
            nr = min(R, r1 - tr0)
            L = nr * g
            qo = qbase + tr0 * 16 * g
            for t in range(T):
                _lanes_scalar(s16, qs, qo, L, xl, xh, (s * T + t) * _XSLAB, xinit, (s * T + t) * _SG, 0, L)
                _tile_out(out, t, s16, dbits, dbase, tr0, nr, g, xd[t, b0:b0 + g], s == 0)


@_inline
def _band(rows, nb, nslab, nch):
    """rows per thread band: a multiple of the last slab's rows per tile (full slabs have 1)."""
    ru = _rows_per_tile(nb - (nslab - 1) * _SG)
    per = (rows + nch - 1) // nch
    return (per + ru - 1) // ru * ru


@_serial
def _q40_serial_avx2(out, xq, xd, qs, dbits, rows, nb, nslab, xl, xh, xinit, s16):
    T = xq.shape[0]
    _prep_x(xl, xh, xinit, xq, T, nb)
    _q40_rows_avx2(out, xl, xh, xinit, xd, qs, dbits, rows, nb, nslab, T, 0, rows, s16[0])


@_serial
def _q40_serial_generic(out, xq, xd, qs, dbits, rows, nb, nslab, xl, xh, xinit, s16):
    T = xq.shape[0]
    _prep_x(xl, xh, xinit, xq, T, nb)
    _q40_rows_generic(out, xl, xh, xinit, xd, qs, dbits, rows, nb, nslab, T, 0, rows, s16[0])


@_parallel
def _q40_par_avx2(out, xq, xd, qs, dbits, rows, nb, nslab, xl, xh, xinit, s16):
    T = xq.shape[0]
    _prep_x(xl, xh, xinit, xq, T, nb)
    nch = s16.shape[0]                 # NUMBA_NUM_THREADS bands, shared among the active threads
    per = _band(rows, nb, nslab, nch)
    for c in prange(nch):
        _q40_rows_avx2(out, xl, xh, xinit, xd, qs, dbits, rows, nb, nslab, T,
                       min(rows, c * per), min(rows, c * per + per), s16[c])


@_parallel
def _q40_par_generic(out, xq, xd, qs, dbits, rows, nb, nslab, xl, xh, xinit, s16):
    T = xq.shape[0]
    _prep_x(xl, xh, xinit, xq, T, nb)
    nch = s16.shape[0]
    per = _band(rows, nb, nslab, nch)
    for c in prange(nch):
        _q40_rows_generic(out, xl, xh, xinit, xd, qs, dbits, rows, nb, nslab, T,
                          min(rows, c * per), min(rows, c * per + per), s16[c])


_S16 = np.zeros((max(1, numba.config.NUMBA_NUM_THREADS), _NT * SLAB_BLOCKS), np.int16)   # per-thread lanes
_XBUF: dict = {}


def _xbuffers(T: int, nslab: int):
    """Activation buffers (rearranged per call), cached by shape; kernels run from one Python thread."""
    key = (T, nslab)
    bufs = _XBUF.get(key)
    if bufs is None:
        if len(_XBUF) > 64:
            _XBUF.clear()
        xs = nslab * _XSLAB
        bufs = _XBUF[key] = (np.empty(T * xs, np.int8), np.empty(T * xs, np.int8),
                             np.empty(T * nslab * _SG, np.int16))
    return bufs

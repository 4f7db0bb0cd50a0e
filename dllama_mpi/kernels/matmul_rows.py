"""Q80 x (Q4, Q41, Q80) matmul on the row-tile layout (``quant.pack_row_tiles``): narrow matrices.

The AVX2 kernels (hand-written IR loops) and their portable twins.  The dispatch (which kernel,
serial or parallel) is in ``matmul``.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant import QK
from ._jit import _inline, _parallel, _serial
from .simd import (_NT, _as64, _h2f, _i16, _i32, _i64, _ldv, _prefetch_fn, _splat, _v8f32, _v8i32,
                   _v16f32, _v16i16, _v32i8)

# Layout (quant.pack_row_tiles): per (tile of RT rows, block) one record: payload [units, RT, unit]
# then RT fp16 scales (d; Q41 also m).  The activation is used as it is (xq [T, cols]); per token and
# block a small prep gives  xi16 = int16(-8 * sum(xq of the block))  and  xf = (xd, 8*xd*sum, xd*sum, 0).
# Q4 (RT = 16, 2-byte units): 16 lanes = 16 rows; per byte pair p, vpmaddubsw(lo nibbles, broadcast
# (xq[2p], xq[2p+1])) + vpmaddubsw(hi nibbles, broadcast (xq[16+2p], xq[17+2p])), int16 lanes
# initialised with xi16: exact (q - 8) . x as in the slab kernel.  Then, in f32 per lane,
#     acc += float(a) * (d * xd)  [+ (m + 8d) * (xd*sum)]          (the [..] term: Q41 only)
# i.e. Q41's  d*xd*sum(q*x) + m*xd*sum(x)  with no separate offset pass.
# Q80 (RT = 8, 4-byte units): vpmaddubsw(|w|, sign(x, w)) over 4-byte groups, vpmaddwd with ones ->
# exact int32 per row and block; acc += d * (float(a) * xd).

_RT4, _RT8 = 16, 8

# software prefetch distance in the weight stream: a few kB ahead hides the memory latency
# of the small matrices
_PF_AHEAD = 2048


def _q4_scale_block(builder, accs, faccs, bufp, base, xfp, xfo, nb, b, has_m, fma):
    """The float32 end of a block of a 16-row Q4 tile, for each of the tile's tokens u:
    faccs[u] += float(accs[u]) * (d * xd)  [+ (m + 8d) * (xd * sum)  for Q41], d and m the
    tile's 16 fp16 scales after the payload (the layout note above). The AVX2 and the VNNI
    kernels share it, so their float results are the same bits."""
    k = lambda v: ir.Constant(_i64, v)
    dv = builder.fpext(builder.bitcast(_ldv(builder, bufp, builder.add(base, k(256)), _v16i16),
                                       ir.VectorType(ir.HalfType(), 16)), _v16f32)
    fo = [builder.add(xfo, builder.add(builder.mul(k(4 * u), nb), builder.mul(b, k(4))))
          for u in range(len(accs))]
    for u in range(len(accs)):
        xd = _splat(builder, builder.load(builder.gep(xfp, [fo[u]])), 16)
        dxd = builder.fmul(dv, xd)
        builder.store(builder.call(fma, [builder.sitofp(accs[u], _v16f32), dxd,
                                         builder.load(faccs[u])]), faccs[u])
    with builder.if_then(has_m, likely=True):
        mv = builder.fpext(builder.bitcast(_ldv(builder, bufp, builder.add(base, k(288)), _v16i16),
                                           ir.VectorType(ir.HalfType(), 16)), _v16f32)
        off = builder.call(fma, [dv, ir.Constant(_v16f32, [8.0] * 16), mv])     # m + 8d
        for u in range(len(accs)):
            cs = _splat(builder, builder.load(builder.gep(xfp, [builder.add(fo[u], k(2))])), 16)
            builder.store(builder.call(fma, [off, cs, builder.load(faccs[u])]), faccs[u])


def _store_tiles(builder, faccs, accp, width: int) -> None:
    """acc[u*width : (u+1)*width] = faccs[u] for every token u of the tile."""
    vty = ir.VectorType(ir.FloatType(), width)
    for u in range(len(faccs)):
        builder.store(builder.load(faccs[u]),
                      builder.bitcast(builder.gep(accp, [ir.Constant(_i64, width * u)]),
                                      vty.as_pointer()), align=1)


def _make_rows_q4(nt: int):
    """acc[u*16 + i] = sum over blocks of tile rows i, tokens u < nt (see the layout note above)."""

    @intrinsic
    def rows_q4(typingctx, acc, buf, bo, nb, sb, hasm, xq, xo, xs, xi, xio, xf, xfo):
        sig = types.void(acc, buf, bo, nb, sb, hasm, xq, xo, xs, xi, xio, xf, xfo)

        def codegen(context, builder, signature, args):
            tys = signature.args

            def data(i):
                return context.make_array(tys[i])(context, builder, value=args[i]).data
            accp, bufp, xqp, xip, xfp = data(0), data(1), data(6), data(9), data(11)
            bo, nb, sb, hasm, xo, xs, xio, xfo = (_as64(builder, args[i]) for i in (2, 3, 4, 5, 7, 8, 10, 12))
            maddubs = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v16i16, [_v32i8, _v32i8]), "llvm.x86.avx2.pmadd.ub.sw")
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v16f32, [_v16f32] * 3), "llvm.fma.v16f32")
            low4 = ir.Constant(_v32i8, [15] * 32)
            four = ir.Constant(_v16i16, [4] * 16)
            k = lambda v: ir.Constant(_i64, v)
            faccs = [cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None)) for _ in range(nt)]
            has_m = builder.icmp_signed("!=", hasm, k(0))
            prefetch = _prefetch_fn(builder)
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                base = builder.add(bo, builder.mul(b, sb))
                for line in range(0, 320, 64):      # the record _PF_AHEAD bytes ahead (hint; never faults)
                    builder.call(prefetch, [builder.gep(bufp, [builder.add(base, k(_PF_AHEAD + line))]),
                                            ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
                xb = builder.add(xo, builder.mul(b, k(QK)))
                accs = [_splat(builder, builder.load(builder.gep(xip, [builder.add(xio, builder.add(b, builder.mul(k(u), nb)))])), 16)
                        for u in range(nt)]
                for p in range(8):
                    raw = _ldv(builder, bufp, builder.add(base, k(32 * p)), _v32i8)
                    lo = builder.and_(raw, low4)
                    hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(raw, _v16i16), four), _v32i8), low4)
                    for u in range(nt):
                        xu = builder.add(xb, builder.mul(k(u), xs))
                        xl = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(xu, k(2 * p))]), _i16.as_pointer()), align=1)
                        xh = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(xu, k(16 + 2 * p))]), _i16.as_pointer()), align=1)
                        xl = builder.bitcast(_splat(builder, xl, 16), _v32i8)
                        xh = builder.bitcast(_splat(builder, xh, 16), _v32i8)
                        accs[u] = builder.add(accs[u], builder.call(maddubs, [lo, xl]))
                        accs[u] = builder.add(accs[u], builder.call(maddubs, [hi, xh]))
                _q4_scale_block(builder, accs, faccs, bufp, base, xfp, xfo, nb, b, has_m, fma)
            _store_tiles(builder, faccs, accp, 16)
            return context.get_dummy_value()
        return sig, codegen
    return rows_q4


# tokens a Q4 tile takes at once: 2, where the Q80 kernel takes simd._NT = 4. Four tokens' int16
# and float32 sums and the 16 unpacked weight vectors of a block do not fit AVX2's 16 vector
# registers: LLVM spills the weights, and one block's loop (~350 instructions) outgrows what a
# core keeps in flight. On a Zen 3 (1 thread) 2 tokens gave 141-143 GOP/s against 127-131 for
# Q4_0 (Q4_1 130-134 against 124-126), and a 128-token prompt of the synthetic 1.1B model
# 58.7-60.3 -> 68.8-69.1 tok/s; 3 tokens were no faster than 4, and the Q80 kernel was slower
# with 2 (98-104 against 109-117)
_NT_Q4 = 2
_rows_q4_1 = _make_rows_q4(1)
_rows_q4_2 = _make_rows_q4(_NT_Q4)


def _make_rows_q8(nt: int):
    """acc[u*8 + i] = sum over blocks of d_w * xd * (int8 . int8) for the 8 rows of a Q80 tile."""

    @intrinsic
    def rows_q8(typingctx, acc, buf, bo, nb, sb, xq, xo, xs, xf, xfo):
        sig = types.void(acc, buf, bo, nb, sb, xq, xo, xs, xf, xfo)

        def codegen(context, builder, signature, args):
            tys = signature.args

            def data(i):
                return context.make_array(tys[i])(context, builder, value=args[i]).data
            accp, bufp, xqp, xfp = data(0), data(1), data(5), data(8)
            bo, nb, sb, xo, xs, xfo = (_as64(builder, args[i]) for i in (2, 3, 4, 6, 7, 9))
            maddubs = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v16i16, [_v32i8, _v32i8]), "llvm.x86.avx2.pmadd.ub.sw")
            maddwd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v8i32, [_v16i16, _v16i16]), "llvm.x86.avx2.pmadd.wd")
            psign = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v32i8, [_v32i8, _v32i8]), "llvm.x86.avx2.psign.b")
            absb = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v32i8, [_v32i8, ir.IntType(1)]), "llvm.abs.v32i8")
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v8f32, [_v8f32] * 3), "llvm.fma.v8f32")
            ones = ir.Constant(_v16i16, [1] * 16)
            k = lambda v: ir.Constant(_i64, v)
            faccs = [cgutils.alloca_once_value(builder, ir.Constant(_v8f32, None)) for _ in range(nt)]
            prefetch = _prefetch_fn(builder)
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                base = builder.add(bo, builder.mul(b, sb))
                for line in range(0, 272, 64):      # the record _PF_AHEAD bytes ahead
                    builder.call(prefetch, [builder.gep(bufp, [builder.add(base, k(_PF_AHEAD + line))]),
                                            ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
                xb = builder.add(xo, builder.mul(b, k(QK)))
                accs = [ir.Constant(_v8i32, None)] * nt
                for p in range(8):
                    w = _ldv(builder, bufp, builder.add(base, k(32 * p)), _v32i8)
                    aw = builder.call(absb, [w, ir.Constant(ir.IntType(1), 0)])
                    for u in range(nt):
                        xu = builder.add(xb, builder.mul(k(u), xs))
                        x4 = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(xu, k(4 * p))]), _i32.as_pointer()), align=1)
                        x4 = builder.bitcast(_splat(builder, x4, 8), _v32i8)
                        s16 = builder.call(maddubs, [aw, builder.call(psign, [x4, w])])
                        accs[u] = builder.add(accs[u], builder.call(maddwd, [s16, ones]))
                dv = builder.fpext(builder.bitcast(_ldv(builder, bufp, builder.add(base, k(256)), ir.VectorType(_i16, 8)),
                                                   ir.VectorType(ir.HalfType(), 8)), _v8f32)
                for u in range(nt):
                    fo = builder.add(xfo, builder.add(builder.mul(k(4 * u), nb), builder.mul(b, k(4))))
                    xd = _splat(builder, builder.load(builder.gep(xfp, [fo])), 8)
                    v = builder.fmul(builder.sitofp(accs[u], _v8f32), xd)
                    builder.store(builder.call(fma, [dv, v, builder.load(faccs[u])]), faccs[u])
            for u in range(nt):
                builder.store(builder.load(faccs[u]),
                              builder.bitcast(builder.gep(accp, [k(8 * u)]), _v8f32.as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return rows_q8


_rows_q8_1 = _make_rows_q8(1)
_rows_q8_4 = _make_rows_q8(_NT)


@_serial
def _rows_prep(xi, xf, xq, xd, T, nb, hasm):
    """per token and block: xi = int16(-8 * sum xq), xf = (xd, 8*xd*sum if hasm else 0, xd*sum, 0)."""
    _rows_prep_range(xi, xf, xq, xd, 0, T, nb, hasm)


@_serial
def _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, hasm):
    """_rows_prep for tokens t0..t1-1."""
    for t in range(t0, t1):
        for b in range(nb):
            s = 0
            for i in range(QK):
                s += np.int32(xq[t, b * QK + i])
            xi[t, b] = np.int16(-8 * s)
            d = xd[t, b]
            cs = d * np.float32(s)
            xf[t, b, 0] = d
            xf[t, b, 1] = np.float32(8.0) * cs if hasm else np.float32(0.0)
            xf[t, b, 2] = cs
            xf[t, b, 3] = np.float32(0.0)


@_inline
def _grid(T, ntile, nch, tg_min):
    """The parallel split of a row-tile matmul into nch chunks: (token groups, row tiles per
    chunk, tokens per group).  Token groups (each chunk preps its own tokens, streams all the
    rows) when every chunk gets at least tg_min tokens; else row bands over all the tokens."""
    if T >= tg_min * nch:
        per_t = (T + nch - 1) // nch
        return nch, ntile, per_t
    return 1, (ntile + nch - 1) // nch, T


@_inline
def _chunk(c, ntg, per_r, per_t, ntile, T):
    """(first tile, end tile, first token, end token) of chunk c of the _grid split."""
    tg = c % ntg
    rg = c // ntg
    return min(ntile, rg * per_r), min(ntile, rg * per_r + per_r), min(T, tg * per_t), min(T, tg * per_t + per_t)


@_serial
def _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, T, acc):
    cols = xq.shape[1]
    for kt in range(k0, k1):
        bo = kt * nb * sb
        r0 = kt * _RT4
        nr = min(_RT4, rows - r0)
        t = t0
        while t + _NT_Q4 <= T:
            _rows_q4_2(acc, buf, bo, nb, sb, hasm, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4)
            for u in range(_NT_Q4):
                for i in range(nr):
                    out[t + u, r0 + i] = acc[u * _RT4 + i]
            t += _NT_Q4
        while t < T:
            _rows_q4_1(acc, buf, bo, nb, sb, hasm, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4)
            for i in range(nr):
                out[t, r0 + i] = acc[i]
            t += 1


@_serial
def _rows_q4_serial(out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, 0, (rows + _RT4 - 1) // _RT4, 0, T, acc[0])


@_parallel
def _rows_q4_par(out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    """One parallel region: token groups (each chunk preps its own tokens) or row bands (_grid)."""
    T = xq.shape[0]
    ntile = (rows + _RT4 - 1) // _RT4
    nch = acc.shape[0]
    ntg, per_r, per_t = _grid(T, ntile, nch, 2 * _NT)
    if ntg == 1:
        _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    for c in prange(nch):
        k0, k1, t0, t1 = _chunk(c, ntg, per_r, per_t, ntile, T)
        if ntg > 1:
            _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, hasm)
        _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc[c])


@_serial
def _rows_q8_tiles(out, xq, xf, buf, rows, nb, sb, k0, k1, t0, T, acc):
    cols = xq.shape[1]
    for kt in range(k0, k1):
        bo = kt * nb * sb
        r0 = kt * _RT8
        nr = min(_RT8, rows - r0)
        t = t0
        while t + _NT <= T:
            _rows_q8_4(acc, buf, bo, nb, sb, xq, t * cols, cols, xf, t * nb * 4)
            for u in range(_NT):
                for i in range(nr):
                    out[t + u, r0 + i] = acc[u * _RT8 + i]
            t += _NT
        while t < T:
            _rows_q8_1(acc, buf, bo, nb, sb, xq, t * cols, cols, xf, t * nb * 4)
            for i in range(nr):
                out[t, r0 + i] = acc[i]
            t += 1


@_serial
def _rows_q8_serial(out, xq, xd, xi, xf, buf, rows, nb, sb, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, 0)
    _rows_q8_tiles(out, xq, xf, buf, rows, nb, sb, 0, (rows + _RT8 - 1) // _RT8, 0, T, acc[0])


@_parallel
def _rows_q8_par(out, xq, xd, xi, xf, buf, rows, nb, sb, acc):
    T = xq.shape[0]
    ntile = (rows + _RT8 - 1) // _RT8
    nch = acc.shape[0]
    ntg, per_r, per_t = _grid(T, ntile, nch, 2 * _NT)
    if ntg == 1:
        _rows_prep(xi, xf, xq, xd, T, nb, 0)
    for c in prange(nch):
        k0, k1, t0, t1 = _chunk(c, ntg, per_r, per_t, ntile, T)
        if ntg > 1:
            _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, 0)
        _rows_q8_tiles(out, xq, xf, buf, rows, nb, sb, k0, k1, t0, t1, acc[c])


@_inline
def _f16(buf, o):
    return _h2f(np.uint16(buf[o]) | (np.uint16(buf[o + 1]) << np.uint16(8)))


@_serial
def _rows_q4_generic(out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    """Portable twin of _rows_q4_serial (no AVX2): same layout, same integer sums."""
    T, cols = xq.shape
    _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    for kt in range((rows + _RT4 - 1) // _RT4):
        r0 = kt * _RT4
        for i in range(min(_RT4, rows - r0)):
            for t in range(T):
                a = np.float32(0.0)
                for b in range(nb):
                    base = (kt * nb + b) * sb
                    s = np.int32(xi[t, b])
                    for p in range(8):
                        for e in range(2):
                            byte = np.int32(buf[base + 32 * p + 2 * i + e])
                            s += (byte & 15) * np.int32(xq[t, b * QK + 2 * p + e])
                            s += (byte >> 4) * np.int32(xq[t, b * QK + 16 + 2 * p + e])
                    dw = _f16(buf, base + 256 + 2 * i)
                    a += np.float32(s) * (dw * xf[t, b, 0])
                    if hasm:
                        a += (_f16(buf, base + 288 + 2 * i) + np.float32(8.0) * dw) * xf[t, b, 2]
                out[t, r0 + i] = a


@_serial
def _rows_q8_generic(out, xq, xd, xi, xf, buf, rows, nb, sb, acc):
    """Portable twin of _rows_q8_serial (no AVX2)."""
    T, cols = xq.shape
    _rows_prep(xi, xf, xq, xd, T, nb, 0)
    for kt in range((rows + _RT8 - 1) // _RT8):
        r0 = kt * _RT8
        for i in range(min(_RT8, rows - r0)):
            for t in range(T):
                a = np.float32(0.0)
                for b in range(nb):
                    base = (kt * nb + b) * sb
                    s = np.int32(0)
                    for p in range(8):
                        for e in range(4):
                            s += np.int32(np.int8(buf[base + 32 * p + 4 * i + e])) * np.int32(xq[t, b * QK + 4 * p + e])
                    a += _f16(buf, base + 256 + 2 * i) * (np.float32(s) * xd[t, b])
                out[t, r0 + i] = a


_ACC = np.zeros((max(1, numba.config.NUMBA_NUM_THREADS), 64), np.float32)    # per-thread row-tile sums
_RBUF: dict = {}


def _rbuffers(T: int, nb: int):
    key = (T, nb)
    bufs = _RBUF.get(key)
    if bufs is None:
        if len(_RBUF) > 64:
            _RBUF.clear()
        bufs = _RBUF[key] = (np.empty((T, nb), np.int16), np.empty((T, nb, 4), np.float32))
    return bufs


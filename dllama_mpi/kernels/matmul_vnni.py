"""Q80 x (Q4, Q41, Q80) matmul on the row-tile layout with VNNI (``vpdpbusd``).

The same layout, prep and results as ``matmul_rows`` (whose layout note this follows): only the
inner products change.  These kernels are compiled only on the VNNI paths (``simd.KERNELS``
vnni512 or avxvnni: LLVM cannot select ``vpdpbusd`` on a CPU without VNNI; the dispatch in
``matmul`` and the warmup never call them elsewhere).  The Q4 kernels' vectors are 512 bits wide
on vnni512 and two 256-bit halves on avxvnni (AVX-VNNI has no 512-bit form), as the tag argument
(``VNNI_TAGS``) says; the Q80 kernels are 256-bit on both.  Either way the int32 block sums are
the same exact integers, hence the same float32 results.

Q4 (RT = 16 rows, 2-byte units): the units of byte pairs p and p+1 of the 16 rows are
interleaved (one shufflevector per pair of 32-byte loads, shared by all the tile's tokens) into
64 bytes = 16 int32 lanes, lane i = row i's nibble bytes (2p, 2p+1) of both pairs; then per
token  ``vpdpbusd(acc, lo nibbles, broadcast xq[4q:4q+4])`` and the same for the high nibbles
and xq[16+4q:...]: 8 instructions per token and block (16 rows), int32 lanes initialised with
-8 * sum(xq of the block): the exact block dot sum (q - 8) * x, the same integer as the AVX2
kernel's int16 lanes (both exact), hence the same float32 results bit for bit.

Q80 (RT = 8 rows, 4-byte units): 256-bit ``vpdpbusd`` on (w xor 0x80) = w + 128 as unsigned
bytes (computed once per load, shared by the tokens) against the signed activation, int32 lanes
initialised with -128 * sum(xq of the block): again the exact int32 block dot.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant import QK
from ._jit import _parallel, _serial
from .matmul_rows import (_PF_AHEAD, _RT4, _RT8, _chunk, _grid, _q4_scale_block, _rows_prep,
                          _rows_prep_range, _store_tiles)
from .simd import _as64, _i8, _i16, _i32, _i64, _ldv, _prefetch_fn, _splat, _v8f32, _v8i32, _v16f32, _v16i16, _v32i8

_NTV = 8                          # tokens per tile of the VNNI kernels (8 int32 + 8 f32 accumulators)
# the VNNI paths as numba types (an empty array whose dtype names the path): the Q4 kernels'
# vpdpbusd on 512-bit vectors (AVX-512 VNNI) or on 256-bit ones (AVX-VNNI, or AVX-512 VNNI + VL)
VNNI_TAGS = {"vnni512": np.zeros(0, np.int8), "avxvnni": np.zeros(0, np.uint8)}
_TAG_WIDTH = {"int8": 512, "uint8": 256}
_v16i32 = ir.VectorType(_i32, 16)
_v64i8 = ir.VectorType(_i8, 64)
_v32i16 = ir.VectorType(_i16, 32)
# word interleave of two v16i16: lane i = (a[i], b[i]) as one 4-byte group
_ILV = ir.Constant(ir.VectorType(_i32, 32), [j for i in range(16) for j in (i, 16 + i)])


def _vpdpbusd(builder, width: int):
    vt = _v16i32 if width == 512 else _v8i32
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt] * 3),
                                          f"llvm.x86.avx512.vpdpbusd.{width}")


_LOW8, _HIGH8 = list(range(8)), list(range(8, 16))


def _dot_16_rows(builder, width: int):
    """(acc, w, x4) -> acc + the 4-byte dots of w's 16 int32 lanes (unsigned bytes) with the
    4 signed bytes x4 in every lane: one 512-bit vpdpbusd, or one on each 256-bit half (AVX-VNNI,
    whose VEX form LLVM selects for the same intrinsic where AVX-512 is missing)."""
    if width == 512:
        dp = _vpdpbusd(builder, 512)
        return lambda acc, w, x4: builder.call(dp, [acc, w, _splat(builder, x4, 16)])
    dp = _vpdpbusd(builder, 256)

    def dot(acc, w, x4):
        xv = _splat(builder, x4, 8)
        halves = [builder.call(dp, [builder.shuffle_vector(acc, acc, ir.Constant(ir.VectorType(_i32, 8), h)),
                                    builder.shuffle_vector(w, w, ir.Constant(ir.VectorType(_i32, 8), h)), xv])
                  for h in (_LOW8, _HIGH8)]
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_i32, 16), list(range(16))))
    return dot


def _make_rows_q4_vnni(nt: int):
    """acc[u*16 + i] = sum over blocks of tile rows i, tokens u < nt (as matmul_rows._make_rows_q4),
    with ``vpdpbusd`` as wide as the tag says (VNNI_TAGS: 512 bits, or two 256-bit halves)."""

    @intrinsic
    def rows_q4_vnni(typingctx, tag, acc, buf, bo, nb, sb, hasm, xq, xo, xs, xi, xio, xf, xfo, nbs, init):
        sig = types.void(tag, acc, buf, bo, nb, sb, hasm, xq, xo, xs, xi, xio, xf, xfo, nbs, init)
        width = _TAG_WIDTH[str(tag.dtype)]

        def codegen(context, builder, signature, args):
            tys, args = signature.args[1:], args[1:]

            def data(i):
                return context.make_array(tys[i])(context, builder, value=args[i]).data
            accp, bufp, xqp, xip, xfp = data(0), data(1), data(6), data(9), data(11)
            bo, nb, sb, hasm, xo, xs, xio, xfo, nbs, init = (
                _as64(builder, args[i]) for i in (2, 3, 4, 5, 7, 8, 10, 12, 13, 14))
            dp = _dot_16_rows(builder, width)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v16f32, [_v16f32] * 3), "llvm.fma.v16f32")
            low4 = ir.Constant(_v64i8, [15] * 64)
            four = ir.Constant(_v32i16, [4] * 32)
            k = lambda v: ir.Constant(_i64, v)
            faccs = [cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None)) for _ in range(nt)]
            with builder.if_then(builder.icmp_signed("!=", init, k(0))):      # continue a partial sum
                for u in range(nt):
                    builder.store(builder.load(builder.bitcast(builder.gep(accp, [k(16 * u)]), _v16f32.as_pointer()),
                                               align=1), faccs[u])
            has_m = builder.icmp_signed("!=", hasm, k(0))
            prefetch = _prefetch_fn(builder)
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                base = builder.add(bo, builder.mul(b, sb))
                for line in range(0, 320, 64):      # the record _PF_AHEAD bytes ahead (hint; never faults)
                    builder.call(prefetch, [builder.gep(bufp, [builder.add(base, k(_PF_AHEAD + line))]),
                                            ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
                xb = builder.add(xo, builder.mul(b, k(QK)))
                accs = []
                for u in range(nt):
                    x16 = builder.load(builder.gep(xip, [builder.add(xio, builder.add(b, builder.mul(k(u), nbs)))]))
                    accs.append(_splat(builder, builder.sext(x16, _i32), 16))
                for q in range(4):                  # byte pairs 2q and 2q+1
                    r0 = builder.bitcast(_ldv(builder, bufp, builder.add(base, k(64 * q)), _v32i8), _v16i16)
                    r1 = builder.bitcast(_ldv(builder, bufp, builder.add(base, k(64 * q + 32)), _v32i8), _v16i16)
                    w = builder.shuffle_vector(r0, r1, _ILV)                        # v32i16
                    lo = builder.bitcast(builder.and_(builder.bitcast(w, _v64i8), low4), _v16i32)
                    hi = builder.bitcast(builder.and_(builder.bitcast(builder.lshr(w, four), _v64i8), low4), _v16i32)
                    for u in range(nt):
                        xu = builder.add(xb, builder.mul(k(u), xs))
                        xl = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(xu, k(4 * q))]), _i32.as_pointer()), align=1)
                        xh = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(xu, k(16 + 4 * q))]), _i32.as_pointer()), align=1)
                        accs[u] = dp(accs[u], lo, xl)
                        accs[u] = dp(accs[u], hi, xh)
                _q4_scale_block(builder, accs, faccs, bufp, base, xfp, xfo, nbs, b, has_m, fma)
            _store_tiles(builder, faccs, accp, 16)
            return context.get_dummy_value()
        return sig, codegen
    return rows_q4_vnni


_rows_q4v_1 = _make_rows_q4_vnni(1)
_rows_q4v_4 = _make_rows_q4_vnni(4)
_rows_q4v_8 = _make_rows_q4_vnni(_NTV)


def _make_rows_q8_vnni(nt: int):
    """acc[u*8 + i] = sum over blocks of d_w * xd * (int8 . int8) for the 8 rows of a Q80 tile."""

    @intrinsic
    def rows_q8_vnni(typingctx, acc, buf, bo, nb, sb, xq, xo, xs, xi, xio, xf, xfo):
        sig = types.void(acc, buf, bo, nb, sb, xq, xo, xs, xi, xio, xf, xfo)

        def codegen(context, builder, signature, args):
            tys = signature.args

            def data(i):
                return context.make_array(tys[i])(context, builder, value=args[i]).data
            accp, bufp, xqp, xip, xfp = data(0), data(1), data(5), data(8), data(10)
            bo, nb, sb, xo, xs, xio, xfo = (_as64(builder, args[i]) for i in (2, 3, 4, 6, 7, 9, 11))
            dp = _vpdpbusd(builder, 256)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_v8f32, [_v8f32] * 3), "llvm.fma.v8f32")
            flip = ir.Constant(_v32i8, [-128] * 32)
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
                accs = []
                for u in range(nt):                 # -128 * sum(x) = 16 * xi (xi = -8 * sum, exact)
                    x16 = builder.load(builder.gep(xip, [builder.add(xio, builder.add(b, builder.mul(k(u), nb)))]))
                    accs.append(_splat(builder, builder.shl(builder.sext(x16, _i32), ir.Constant(_i32, 4)), 8))
                for p in range(8):
                    w = builder.bitcast(builder.xor(_ldv(builder, bufp, builder.add(base, k(32 * p)), _v32i8), flip), _v8i32)
                    for u in range(nt):
                        xu = builder.add(xb, builder.mul(k(u), xs))
                        x4 = builder.load(builder.bitcast(builder.gep(xqp, [builder.add(xu, k(4 * p))]), _i32.as_pointer()), align=1)
                        accs[u] = builder.call(dp, [accs[u], w, _splat(builder, x4, 8)])
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
    return rows_q8_vnni


_rows_q8v_1 = _make_rows_q8_vnni(1)
_rows_q8v_4 = _make_rows_q8_vnni(4)
_rows_q8v_8 = _make_rows_q8_vnni(_NTV)


@_serial
def _q4v_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc):
    """out[t0:t1, rows of tiles k0..k1-1], 8 tokens per unpacking of the weights.  A last group
    of fewer than 8 tokens reuses the 8-token kernel on the range's last 8 tokens (the
    overlapping ones get the same values again, not stored twice); a range of fewer than 8
    tokens goes 4 then 1 at a time.  One call site per kernel: each intrinsic call site is a
    full unrolled copy of its loop (compile time)."""
    cols = xq.shape[1]
    for kt in range(k0, k1):
        bo = kt * nb * sb
        r0 = kt * _RT4
        nr = min(_RT4, rows - r0)
        t = t0
        while t < t1:
            if t + _NTV <= t1 or t1 - t0 >= _NTV:
                ts = min(t, t1 - _NTV)
                _rows_q4v_8(tag, acc, buf, bo, nb, sb, hasm, xq, ts * cols, cols, xi, ts * nb, xf, ts * nb * 4, nb, 0)
                for u in range(t - ts, _NTV):
                    for i in range(nr):
                        out[ts + u, r0 + i] = acc[u * _RT4 + i]
                t = ts + _NTV
            elif t + 4 <= t1:
                _rows_q4v_4(tag, acc, buf, bo, nb, sb, hasm, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4, nb, 0)
                for u in range(4):
                    for i in range(nr):
                        out[t + u, r0 + i] = acc[u * _RT4 + i]
                t += 4
            else:
                _rows_q4v_1(tag, acc, buf, bo, nb, sb, hasm, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4, nb, 0)
                for i in range(nr):
                    out[t, r0 + i] = acc[i]
                t += 1


@_serial
def _q8v_tiles(out, xq, xi, xf, buf, rows, nb, sb, k0, k1, t0, t1, acc):
    """As _q4v_tiles for the Q80 row tiles (8 rows)."""
    cols = xq.shape[1]
    for kt in range(k0, k1):
        bo = kt * nb * sb
        r0 = kt * _RT8
        nr = min(_RT8, rows - r0)
        t = t0
        while t < t1:
            if t + _NTV <= t1 or t1 - t0 >= _NTV:
                ts = min(t, t1 - _NTV)
                _rows_q8v_8(acc, buf, bo, nb, sb, xq, ts * cols, cols, xi, ts * nb, xf, ts * nb * 4)
                for u in range(t - ts, _NTV):
                    for i in range(nr):
                        out[ts + u, r0 + i] = acc[u * _RT8 + i]
                t = ts + _NTV
            elif t + 4 <= t1:
                _rows_q8v_4(acc, buf, bo, nb, sb, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4)
                for u in range(4):
                    for i in range(nr):
                        out[t + u, r0 + i] = acc[u * _RT8 + i]
                t += 4
            else:
                _rows_q8v_1(acc, buf, bo, nb, sb, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4)
                for i in range(nr):
                    out[t, r0 + i] = acc[i]
                t += 1


@_serial
def _rows_q4_serial_vnni(tag, out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    _q4v_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, 0, (rows + _RT4 - 1) // _RT4, 0, T, acc[0])


@_parallel
def _rows_q4_par_vnni(tag, out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    """One parallel region: token groups (each chunk preps its own tokens) or row bands (_grid)."""
    T = xq.shape[0]
    ntile = (rows + _RT4 - 1) // _RT4
    nch = acc.shape[0]
    ntg, per_r, per_t = _grid(T, ntile, nch, _NTV)
    if ntg == 1:
        _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    for c in prange(nch):
        k0, k1, t0, t1 = _chunk(c, ntg, per_r, per_t, ntile, T)
        if ntg > 1:
            _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, hasm)
        _q4v_tiles(tag, out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, t0, t1, acc[c])


@_serial
def _rows_q8_serial_vnni(out, xq, xd, xi, xf, buf, rows, nb, sb, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, 0)
    _q8v_tiles(out, xq, xi, xf, buf, rows, nb, sb, 0, (rows + _RT8 - 1) // _RT8, 0, T, acc[0])


@_parallel
def _rows_q8_par_vnni(out, xq, xd, xi, xf, buf, rows, nb, sb, acc):
    T = xq.shape[0]
    ntile = (rows + _RT8 - 1) // _RT8
    nch = acc.shape[0]
    ntg, per_r, per_t = _grid(T, ntile, nch, _NTV)
    if ntg == 1:
        _rows_prep(xi, xf, xq, xd, T, nb, 0)
    for c in prange(nch):
        k0, k1, t0, t1 = _chunk(c, ntg, per_r, per_t, ntile, T)
        if ntg > 1:
            _rows_prep_range(xi, xf, xq, xd, t0, t1, nb, 0)
        _q8v_tiles(out, xq, xi, xf, buf, rows, nb, sb, k0, k1, t0, t1, acc[c])


_ACCV = np.zeros((max(1, numba.config.NUMBA_NUM_THREADS), _NTV * _RT4), np.float32)   # per-thread tile sums

"""Numba kernels: every hot loop of the forward pass, output array first.

Each public function is a thin wrapper that checks dtypes, shapes and contiguity (raising
``ValueError`` with a clear message) and then calls a private ``@njit`` body that trusts its
inputs and allocates nothing.  Numba flags live in one place (``_serial`` / ``_parallel``).

Conventions: activations are ``float32 [T, n]`` (T tokens), weights ``[rows, cols]`` = ``[out, in]``.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .quant import QK, SLAB_BLOCKS, Q40Matrix

# ---------------------------------------------------------------- numba flags (the one place)

_FLAGS = dict(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)
_serial = njit(parallel=False, **_FLAGS)
_parallel = njit(parallel=True, **_FLAGS)
# exact IEEE semantics (rounding must match GGML bit for bit)
_exact = njit(parallel=False, cache=True, fastmath=False, nogil=True, error_model="numpy", boundscheck=False)

# elements of work under which a serial call beats a ~3 us parallel launch
_PAR_MIN_WORK = 1 << 16


def set_num_threads(n: int) -> None:
    """Set the number of numba threads used by the parallel kernels (1..NUMBA_NUM_THREADS)."""
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    return numba.get_num_threads()


# ---------------------------------------------------------------- checks

def _check(name: str, arr, dtype, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    return arr


def _check_out(name: str, arr, dtype, shape) -> np.ndarray:
    _check(name, arr, dtype, shape)
    if not arr.flags.writeable:
        raise ValueError(f"{name}: array must be writeable")
    return arr


# ---------------------------------------------------------------- fp16 -> f32

@intrinsic
def _h2f(typingctx, h):
    """float16 bit pattern (uint16) -> float32 (LLVM fpext half; vcvtph2ps with F16C, vectorisable)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


# ---------------------------------------------------------------- activation quantisation (Q80)

@njit(inline="always", cache=True)
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
                v = x[t, o + i] * inv
                a = abs(v)
                fl = math.floor(a)
                r = np.float32(fl + math.floor(np.float32(2.0) * (a - fl)))
                qs_out[t, o + i] = np.int8(r) if v >= 0 else np.int8(-r)
            d_out[t, b] = _f32_to_f16_to_f32(d)


def quantize_q80_act(qs_out: np.ndarray, d_out: np.ndarray, x: np.ndarray) -> None:
    """GGML Q8_0 per 32-block: d = max|x|/127, q = roundf(x/d); d_out = float32(float16(d))."""
    _check("x", x, np.float32, ndim=2)
    T, n = x.shape
    if n % QK:
        raise ValueError(f"x: row length {n} must be a multiple of {QK}")
    _check_out("qs_out", qs_out, np.int8, (T, n))
    _check_out("d_out", d_out, np.float32, (T, n // QK))
    _quantize_q80_act(qs_out, d_out, x, T, n // QK)


# ---------------------------------------------------------------- Q80 x Q40 matmul
#
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


def _has_avx2() -> bool:
    try:
        feats = llvm_binding.get_host_cpu_features()
        cpu = (numba.config.CPU_NAME or "host").lower()
        return bool(feats.get("avx2", False)) and cpu in ("host", "native") and not numba.config.CPU_FEATURES
    except Exception:               # pragma: no cover - exotic llvmlite builds
        return False


HAS_AVX2 = _has_avx2()

_i8, _i16 = ir.IntType(8), ir.IntType(16)
_v32i8, _v16i16 = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16)


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


_NT = 4                            # tokens sharing one unpacking of the weights (4 accumulators)
_group_dot16_tokens = _make_group_dot16_tokens(_NT)


@njit(inline="always", cache=True)
def _rows_per_tile(g):
    """numba twin of quant.rows_per_tile: 1 if g >= 16 else 64 // g."""
    return 1 if g >= 16 else _SG // g


@intrinsic
def _prefetch(typingctx, ary, off):
    """Software prefetch of ary[off] into the cache (a hint: never faults, even past the end)."""
    sig = types.void(ary, off)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        p = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [p.type, i32, i32, i32])
        name = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


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


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
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


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _scale_lanes(s16, db, xdt, g):
    """sum_b float32(s16[b]) * (d_w[b] * xd[b]) over the g lanes of one row of a slab (float32)."""
    acc = np.float32(0.0)
    for bl in range(g):
        acc += np.float32(s16[bl]) * (_h2f(db[bl]) * xdt[bl])
    return acc


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _tile_out(out, t, su, dbits, dbase, tr0, nr, g, xdt, first):
    """out[t, rows of the tile] (+)= their scaled lane sums."""
    for i in range(nr):
        r = tr0 + i
        acc = _scale_lanes(su[i * g:i * g + g], dbits[dbase + r * g:dbase + r * g + g], xdt, g)
        if first:
            out[t, r] = acc
        else:
            out[t, r] += acc


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _slab_rows_full(out, xl, xh, xinit, xd, qs, dbits, T, r0, r1, s16, s, g, qbase, dbase, b0):
    """_q40_rows_avx2 for a slab of G >= 16 blocks (one row per tile): the plain per-row loop.
    (Measured: the general multi-row tile loop below runs several times slower for these.)"""
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


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
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
_I8, _F32 = np.dtype(np.int8), np.dtype(np.float32)


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


def matmul_q80_q40(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w: Q40Matrix) -> None:
    """out[t, r] = sum_b d_w[r,b] * xd[t,b] * sum_i (nib - 8) * xq[t, i]  (exact int block dots, f32 scales).

    xq, xd: the activation in split Q80 form (``quantize_q80_act``); w: a Q40Matrix [rows, cols].
    Parallel (numba threads over row bands) when the matrix is large enough to pay for it.
    """
    try:                                   # fast path when everything is right (well under 1 us)
        T = xq.shape[0]
        ok = (type(w) is Q40Matrix and xq.dtype == _I8 and xd.dtype == _F32 and out.dtype == _F32
              and xq.ndim == 2 and xq.shape[1] == w.cols and xd.shape == (T, w.nb) and out.shape == (T, w.rows)
              and xq.flags.c_contiguous and xd.flags.c_contiguous and out.flags.c_contiguous
              and out.flags.writeable)
    except (AttributeError, IndexError, TypeError):
        ok = False
    if not ok:
        _matmul_q80_q40_checks(out, xq, xd, w)
        T = xq.shape[0]
    if T == 0 or w.rows == 0:
        return
    _matmul_q80_q40(out, xq, xd, w, HAS_AVX2)


def _matmul_q80_q40_checks(out, xq, xd, w) -> None:
    if not isinstance(w, Q40Matrix):
        raise ValueError(f"w: expected a Q40Matrix, got {type(w).__name__}")
    _check("xq", xq, np.int8, ndim=2)
    T, cols = xq.shape
    if cols != w.cols:
        raise ValueError(f"xq: has {cols} columns but w is {w.rows}x{w.cols}")
    _check("xd", xd, np.float32, (T, cols // QK))
    _check_out("out", out, np.float32, (T, w.rows))


def _matmul_q80_q40(out, xq, xd, w, use_avx2: bool) -> None:
    T = xq.shape[0]
    xl, xh, xinit = _xbuffers(T, w.nslab)
    args = (out, xq, xd, w.qs, w.d.view(np.uint16), w.rows, w.nb, w.nslab, xl, xh, xinit, _S16)
    if w.rows * w.cols * T < 1 << 18 or w.rows < 16:
        (_q40_serial_avx2 if use_avx2 else _q40_serial_generic)(*args)
    else:
        (_q40_par_avx2 if use_avx2 else _q40_par_generic)(*args)


# ---------------------------------------------------------------- f32 matmul

def matmul_f32(out: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """out[T, rows] = x[T, cols] @ w[rows, cols].T  (numpy / OpenBLAS sgemm)."""
    _check("x", x, np.float32, ndim=2)
    _check("w", w, np.float32, ndim=2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} columns but w is {w.shape[0]}x{w.shape[1]}")
    _check_out("out", out, np.float32, (x.shape[0], w.shape[0]))
    np.matmul(x, w.T, out=out)


# ---------------------------------------------------------------- rmsnorm

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


# ---------------------------------------------------------------- rope (interleaved pairs)

@_serial
def _rope_rows(x, positions, cos, sin, hd, nh, t0, t1):
    half = hd // 2
    for t in range(t0, t1):
        p = positions[t]
        for h in range(nh):
            o = h * hd
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                a = x[t, o + 2 * i]
                b = x[t, o + 2 * i + 1]
                x[t, o + 2 * i] = a * c - b * s
                x[t, o + 2 * i + 1] = a * s + b * c


@_parallel
def _rope_par(x, positions, cos, sin, hd, nh, T):
    for t in prange(T):
        _rope_rows(x, positions, cos, sin, hd, nh, t, t + 1)


def rope_interleaved(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                     head_dim: int) -> None:
    """In place: rotate pairs (x[2i], x[2i+1]) of every head by angle table row positions[t]."""
    _check("x", x, np.float32, ndim=2)
    T, width = x.shape
    hd = int(head_dim)
    if hd <= 0 or hd % 2 or width % hd:
        raise ValueError(f"head_dim {hd} must be even and divide the row length {width}")
    if not x.flags.writeable:
        raise ValueError("x: array must be writeable")
    _check("positions", positions, np.int32, (T,))
    _check("cos", cos, np.float32, ndim=2)
    _check("sin", sin, np.float32, cos.shape)
    if cos.shape[1] != hd // 2:
        raise ValueError(f"cos/sin: expected {hd // 2} columns, got {cos.shape[1]}")
    if T and (positions.min() < 0 or positions.max() >= cos.shape[0]):
        raise ValueError(f"positions: must lie in [0, {cos.shape[0]}), got [{positions.min()}, {positions.max()}]")
    nh = width // hd
    if T * width >= _PAR_MIN_WORK and T > 1:
        _rope_par(x, positions, cos, sin, hd, nh, T)
    else:
        _rope_rows(x, positions, cos, sin, hd, nh, 0, T)


# ---------------------------------------------------------------- attention

@_serial
def _attend_one(out, q, k_cache, v_cache, t, h, kvh, hd, npos, scale, sc):
    """out[t, h*hd:(h+1)*hd] = softmax(scale * q.K[:npos]) @ V[:npos]; sc: scratch row >= npos."""
    qo = h * hd
    m = np.float32(-3.0e38)                    # not -inf: fastmath assumes no infinities
    for j in range(npos):
        s = np.float32(0.0)
        for i in range(hd):
            s += q[t, qo + i] * k_cache[j, kvh, i]
        s *= scale
        sc[j] = s
        if s > m:
            m = s
    tot = np.float32(0.0)
    for j in range(npos):
        e = np.float32(math.exp(sc[j] - m))
        sc[j] = e
        tot += e
    inv = np.float32(1.0) / tot
    for i in range(hd):
        out[t, qo + i] = np.float32(0.0)
    for j in range(npos):
        p = sc[j] * inv
        for i in range(hd):
            out[t, qo + i] += p * v_cache[j, kvh, i]


@_parallel
def _attention_par(out, q, k_cache, v_cache, positions, kv_of_q, scale, scratch, T, nq, hd, p0, p1):
    for p in prange(p0, p1):
        t = p // nq
        h = p - t * nq
        _attend_one(out, q, k_cache, v_cache, t, h, kv_of_q[h], hd, positions[t] + 1, scale, scratch[p - p0])


@_serial
def _attention_ser(out, q, k_cache, v_cache, positions, kv_of_q, scale, scratch, T, nq, hd):
    for p in range(T * nq):
        t = p // nq
        h = p - t * nq
        _attend_one(out, q, k_cache, v_cache, t, h, kv_of_q[h], hd, positions[t] + 1, scale, scratch[0])


_ATT_SCRATCH: dict = {}


def attention_scratch(T: int, nq: int, seq_len: int) -> np.ndarray:
    """A scratch buffer for ``attention`` (rows = concurrent (token, head) pairs, bounded)."""
    return np.empty((max(1, min(T * nq, 256)), seq_len), dtype=np.float32)


def attention(out: np.ndarray, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              positions: np.ndarray, kv_of_q: np.ndarray, scale: float,
              scratch: np.ndarray | None = None) -> None:
    """Causal GQA attention over a KV cache; token t attends to cache rows 0..positions[t].

    q: [T, nq*hd]; k_cache, v_cache: [S, nkv, hd]; kv_of_q: [nq] KV head of each local query head.
    scratch (optional): float32 [R, >= max(positions)+1], R >= 1 rows; R pairs run concurrently.
    """
    _check("k_cache", k_cache, np.float32, ndim=3)
    S, nkv, hd = k_cache.shape
    _check("v_cache", v_cache, np.float32, (S, nkv, hd))
    _check("q", q, np.float32, ndim=2)
    T, width = q.shape
    if width % hd:
        raise ValueError(f"q: row length {width} is not a multiple of head_dim {hd}")
    nq = width // hd
    _check_out("out", out, np.float32, (T, width))
    _check("positions", positions, np.int32, (T,))
    _check("kv_of_q", kv_of_q, np.int32, (nq,))
    if T == 0:
        return
    pmin, pmax = int(positions.min()), int(positions.max())
    if pmin < 0 or pmax >= S:
        raise ValueError(f"positions: must lie in [0, {S}), got [{pmin}, {pmax}]")
    if nq and (kv_of_q.min() < 0 or kv_of_q.max() >= nkv):
        raise ValueError(f"kv_of_q: must lie in [0, {nkv})")
    if scratch is None:                   # cached per (rows, S): no page faults on every call
        key = (max(1, min(T * nq, 256)), S)
        scratch = _ATT_SCRATCH.get(key)
        if scratch is None:
            if len(_ATT_SCRATCH) > 8:
                _ATT_SCRATCH.clear()
            scratch = _ATT_SCRATCH[key] = np.empty(key, np.float32)
    _check("scratch", scratch, np.float32, ndim=2)
    if scratch.shape[1] < pmax + 1 or scratch.shape[0] < 1:
        raise ValueError(f"scratch: needs >= 1 row and >= {pmax + 1} columns, got {scratch.shape}")
    npairs = T * nq
    work = npairs * (pmax + 1) * hd
    if work < _PAR_MIN_WORK or scratch.shape[0] == 1:
        _attention_ser(out, q, k_cache, v_cache, positions, kv_of_q, np.float32(scale), scratch, T, nq, hd)
        return
    R = scratch.shape[0]
    for p0 in range(0, npairs, R):
        _attention_par(out, q, k_cache, v_cache, positions, kv_of_q, np.float32(scale), scratch,
                       T, nq, hd, p0, min(npairs, p0 + R))


# ---------------------------------------------------------------- silu * mul

@_serial
def _silu_mul_rows(out, a, b, t0, t1, n):
    for t in range(t0, t1):
        for i in range(n):
            v = a[t, i]
            # clamp: fastmath assumes no inf, and exp(-v) overflows f32 for v < -88
            out[t, i] = v / (np.float32(1.0) + np.exp(min(-v, np.float32(88.0)))) * b[t, i]


@_parallel
def _silu_mul_par(out, a, b, T, n):
    for t in prange(T):
        _silu_mul_rows(out, a, b, t, t + 1, n)


def silu_mul(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """out = a * sigmoid(a) * b (SwiGLU gate)."""
    _check("a", a, np.float32, ndim=2)
    _check("b", b, np.float32, a.shape)
    _check_out("out", out, np.float32, a.shape)
    T, n = a.shape
    if T * n >= _PAR_MIN_WORK and T > 1:
        _silu_mul_par(out, a, b, T, n)
    else:
        _silu_mul_rows(out, a, b, 0, T, n)


# ---------------------------------------------------------------- warm-up

def warmup() -> None:
    """Call every kernel once on tiny inputs so compilation (or cache loading) happens up front."""
    rng = np.random.default_rng(0)
    T, n, rows = 2, 64, 40
    x = rng.standard_normal((T, n)).astype(np.float32)
    xq = np.empty((T, n), np.int8)
    xd = np.empty((T, n // QK), np.float32)
    quantize_q80_act(xq, xd, x)
    w = Q40Matrix.from_f32(rng.standard_normal((rows, n)).astype(np.float32))
    out = np.empty((T, rows), np.float32)
    matmul_q80_q40(out, xq, xd, w)
    matmul_q80_q40(out[:1].copy(), xq[:1].copy(), xd[:1].copy(), w)
    for fn in ((_q40_serial_avx2, _q40_par_avx2) if HAS_AVX2 else (_q40_serial_generic, _q40_par_generic)):
        xl, xh, xi = _xbuffers(T, w.nslab)
        fn(out, xq, xd, w.qs, w.d.view(np.uint16), w.rows, w.nb, w.nslab, xl, xh, xi, _S16)
    y = np.empty_like(x)
    rmsnorm(y, x, np.ones(n, np.float32), 1e-5)
    _rmsnorm_par(y, x, np.ones(n, np.float32), 1e-5, T, n)
    pos = np.arange(T, dtype=np.int32)
    cos = np.ones((4, 8), np.float32)
    sin = np.zeros((4, 8), np.float32)
    rope_interleaved(x, pos, cos, sin, 16)
    _rope_par(x, pos, cos, sin, 16, n // 16, T)
    kc = rng.standard_normal((4, 2, 16)).astype(np.float32)
    kvq = np.array([0, 0, 1, 1], np.int32)
    o = np.empty_like(x)
    sc = attention_scratch(T, 4, 4)
    attention(o, x, kc, kc, pos, kvq, 0.25, sc)
    _attention_par(o, x, kc, kc, pos, kvq, np.float32(0.25), sc, T, 4, 16, 0, T * 4)
    silu_mul(y, x, x)
    _silu_mul_par(y, x, x, T, n)

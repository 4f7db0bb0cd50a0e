"""Numba kernels: every hot loop of the forward pass, output array first.

Each public function is a thin wrapper that checks dtypes, shapes and contiguity (raising
``ValueError`` with a clear message) and then calls a private ``@njit`` body that trusts its
inputs and allocates nothing.  Numba flags live in one place (``_serial`` / ``_parallel``).

Conventions: activations are ``float32 [T, n]`` (T tokens), weights ``[rows, cols]`` = ``[out, in]``.
"""
from __future__ import annotations

import math
from functools import partial

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
# row-tile matmuls go parallel from this many weight blocks x tokens (set with the thread
# count): OpenMP threads start a region in ~µs; waking workqueue threads costs tens of µs,
# more than a SmolLM2 FFN matrix (27648 blocks) takes on one core
_PAR_MIN_BLOCKS = 1 << 17


def choose_threading_layer(weights_float_type: str) -> None:
    """Before the first parallel call: OpenMP for 4-bit weights (cheap parallel regions; no
    BLAS in the hot path), workqueue for f32 weights (OpenMP's idle threads spin and starve
    numpy's BLAS threads: F32 SmolLM2 decoded at 0.7 tok/s instead of 26). A user's
    NUMBA_THREADING_LAYER wins; once threads are running the layer is fixed.

    OpenMP (GNU libgomp) threads spin ~300000 times before sleeping when they wait: with
    another busy process on the node, every parallel region then waits for a thread that
    spins or is descheduled, and SmolLM2 on 2 threads fell from 180 to 1.6 tok/s. We set
    GOMP_SPINCOUNT=1000 unless the user chose a wait policy: measured 171-182 tok/s alone
    (unchanged) and 74-77 beside a busy process (100: 150 / 114; 10000: 180 / 18)."""
    import os
    if "NUMBA_THREADING_LAYER" in os.environ or numba.np.ufunc.parallel._is_initialized:
        return
    numba.config.THREADING_LAYER = "workqueue" if weights_float_type == "f32" else "omp"
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = "1000"    # read by libgomp when numba first loads it


_NUM_THREADS = numba.config.NUMBA_NUM_THREADS   # as numba.get_num_threads(), which costs ~2 us a call


def set_num_threads(n: int) -> None:
    """Set the number of numba threads used by the parallel kernels (1..NUMBA_NUM_THREADS)."""
    global _PAR_MIN_BLOCKS, _NUM_THREADS
    numba.set_num_threads(int(n))
    _NUM_THREADS = int(n)
    _PAR_MIN_BLOCKS = (1 << 14) if numba.threading_layer() == "omp" else (1 << 17)


def get_num_threads() -> int:
    return _NUM_THREADS


# ---------------------------------------------------------------- checks

_I8, _F32, _I32 = np.dtype(np.int8), np.dtype(np.float32), np.dtype(np.int32)
_DTYPES = {t: np.dtype(t) for t in (np.float32, np.int8, np.int16, np.int32, np.uint8, np.uint16, np.float16)}


def _check(name: str, arr, dtype, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
    # hot (several calls per kernel call at decode): cheap comparisons first, messages only on failure
    if type(arr) is not np.ndarray and not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    dt = _DTYPES.get(dtype)
    if arr.dtype != (dt if dt is not None else np.dtype(dtype)):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if shape is not None and arr.shape != shape and arr.shape != tuple(shape):
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


@intrinsic
def _i2f(typingctx, v):
    """int32 bit pattern -> float32 (bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@intrinsic
def _f32_f16_f32(typingctx, v):
    """float32 -> nearest float16 (ties to even, IEEE fptrunc; vcvtps2ph with F16C) -> float32."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
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


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _absmax32(x, t, o):
    amax = np.float32(0.0)
    for i in range(QK):
        amax = max(amax, abs(x[t, o + i]))
    return amax


@_exact
def _quantize_q80_act_f16c(qs_out, d_out, x, T, nb):
    """_quantize_q80_act with the hardware float16 rounding and a vectorised max (same bits)."""
    for t in range(T):
        for b in range(nb):
            o = b * QK
            amax = _absmax32(x, t, o)
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            for i in range(QK):
                v = x[t, o + i] * inv
                a = abs(v)
                fl = math.floor(a)
                r = fl + math.floor(np.float32(2.0) * (a - fl))
                qs_out[t, o + i] = np.int8(math.copysign(r, v))
            d_out[t, b] = _f32_f16_f32(d)


def quantize_q80_act(qs_out: np.ndarray, d_out: np.ndarray, x: np.ndarray) -> None:
    """GGML Q8_0 per 32-block: d = max|x|/127, q = roundf(x/d); d_out = float32(float16(d))."""
    T, n = _check_q80_io(x, None, qs_out, d_out)
    (_quantize_q80_act_f16c if HAS_AVX2 else _quantize_q80_act)(qs_out, d_out, x, T, n // QK)


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
    _check_matmul(out, xq, xd, w, Q40Matrix)
    _bound_matmul(out, xq, xd, w, HAS_AVX2)()


def matmul_q80_q41(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w) -> None:
    """out[t, r] = sum_b xd[t,b] * (d[r,b] * sum_i q_i xq[t,i] + m[r,b] * sum_i xq[t,i])  for a Q41Matrix
    (GGML Q4_1 weights d*q + m): exact int block dots, the offsets fused into the f32 scaling."""
    from .quant import Q41Matrix
    _check_matmul(out, xq, xd, w, Q41Matrix)
    _bound_matmul(out, xq, xd, w, HAS_AVX2)()


def matmul_q80_q80(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w) -> None:
    """out[t, r] = sum_b d_w[r,b] * xd[t,b] * sum_i wq[r,i] xq[t,i]  for a Q80Matrix (int8 weights):
    exact int32 block dots, f32 scales."""
    from .quant import Q80Matrix
    _check_matmul(out, xq, xd, w, Q80Matrix)
    _bound_matmul(out, xq, xd, w, HAS_AVX2)()


def bind_matmul(out: np.ndarray, xq: np.ndarray, xd: np.ndarray, w):
    """Check once, then return the kernel call out = (xq, xd) · w^T for these very arrays and
    matrix (Q40, Q41 or Q80), as a function of no arguments: what matmul_q80_* do, without
    their checks and dispatch on every call (~6 us each: a visible share of a SmolLM2 token).
    The call is right as long as the arrays keep their shapes (the caller owns them) and the
    thread count stays as it was."""
    from .quant import Q41Matrix, Q80Matrix
    cls = type(w) if type(w) in (Q40Matrix, Q41Matrix, Q80Matrix) else Q40Matrix
    _check_matmul(out, xq, xd, w, cls)
    return _bound_matmul(out, xq, xd, w, HAS_AVX2)


def _check_matmul(out, xq, xd, w, cls) -> None:
    if not _fast_ok(out, xq, xd, w, cls):
        _checks(out, xq, xd, w, cls)


def _noop() -> None:
    return None


def _bound_matmul(out, xq, xd, w, use_avx2: bool):
    """The kernel call for checked arguments (functools.partial: no Python frame of ours)."""
    from .quant import Q41Matrix
    T = xq.shape[0]
    if T == 0 or w.rows == 0:
        return _noop
    if type(w) is Q41Matrix:
        return _bound_rows_q4(out, xq, xd, w.buf, w.rows, w.nb, w.stride, 1, use_avx2)
    if type(w) is not Q40Matrix:                       # Q80Matrix
        xi, xf = _rbuffers(T, w.nb)
        args = (out, xq, xd, xi, xf, w.buf, w.rows, w.nb, w.stride, _ACC)
        if not use_avx2:
            return partial(_rows_q8_generic, *args)
        serial = w.rows * w.nb * T < _PAR_MIN_BLOCKS or w.rows <= 2 * _RT8 or _NUM_THREADS == 1
        return partial(_rows_q8_serial if serial else _rows_q8_par, *args)
    if w.layout == "rows":
        return _bound_rows_q4(out, xq, xd, w.qs, w.rows, w.nb, 288, 0, use_avx2)
    xl, xh, xinit = _xbuffers(T, w.nslab)
    args = (out, xq, xd, w.qs, w.d.view(np.uint16), w.rows, w.nb, w.nslab, xl, xh, xinit, _S16)
    if w.rows * w.cols * T < 1 << 18 or w.rows < 16:
        return partial(_q40_serial_avx2 if use_avx2 else _q40_serial_generic, *args)
    return partial(_q40_par_avx2 if use_avx2 else _q40_par_generic, *args)


def _matmul_unchecked(out, xq, xd, w, use_avx2: bool) -> None:
    """matmul_q80_* without the checks, on the AVX2 or the portable kernels (tests)."""
    _bound_matmul(out, xq, xd, w, use_avx2)()


# ---------------------------------------------------------------- row-tile kernels (narrow Q4, Q41, Q80 weights)
#
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
_v8i32, _v16f32, _v8f32 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.FloatType(), 8)
_i32, _i64 = ir.IntType(32), ir.IntType(64)


def _splat(builder, val, n):
    vty = ir.VectorType(val.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_i32, n), [0] * n))


def _ldv(builder, ptr, off, vty):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), vty.as_pointer()), align=1)


def _as64(builder, v):
    return v if v.type == _i64 else builder.sext(v, _i64)


# row-tile kernels: software prefetch distance in the weight stream.  Measured on SmolLM2's 210
# layer matrices (0.1-0.6 MB each, 1 thread): 7.3-7.8 ms/token without, 6.1-6.5 with 1-4 kB
_PF_AHEAD = 2048


def _prefetch_fn(builder):
    p8 = ir.IntType(8).as_pointer()
    name = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [p8, _i32, _i32, _i32]), name)


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
                dv = builder.fpext(builder.bitcast(_ldv(builder, bufp, builder.add(base, k(256)), _v16i16),
                                                   ir.VectorType(ir.HalfType(), 16)), _v16f32)
                fo = [builder.add(xfo, builder.add(builder.mul(k(4 * u), nb), builder.mul(b, k(4)))) for u in range(nt)]
                for u in range(nt):
                    xd = _splat(builder, builder.load(builder.gep(xfp, [fo[u]])), 16)
                    dxd = builder.fmul(dv, xd)
                    builder.store(builder.call(fma, [builder.sitofp(accs[u], _v16f32), dxd, builder.load(faccs[u])]), faccs[u])
                with builder.if_then(has_m, likely=True):
                    mv = builder.fpext(builder.bitcast(_ldv(builder, bufp, builder.add(base, k(288)), _v16i16),
                                                       ir.VectorType(ir.HalfType(), 16)), _v16f32)
                    off = builder.call(fma, [dv, ir.Constant(_v16f32, [8.0] * 16), mv])     # m + 8d
                    for u in range(nt):
                        cs = _splat(builder, builder.load(builder.gep(xfp, [builder.add(fo[u], k(2))])), 16)
                        builder.store(builder.call(fma, [off, cs, builder.load(faccs[u])]), faccs[u])
            for u in range(nt):
                builder.store(builder.load(faccs[u]),
                              builder.bitcast(builder.gep(accp, [k(16 * u)]), _v16f32.as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return rows_q4


_rows_q4_1 = _make_rows_q4(1)
_rows_q4_4 = _make_rows_q4(_NT)


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
    for t in range(T):
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


@_serial
def _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, k0, k1, acc):
    T, cols = xq.shape
    for kt in range(k0, k1):
        bo = kt * nb * sb
        r0 = kt * _RT4
        nr = min(_RT4, rows - r0)
        t = 0
        while t + _NT <= T:
            _rows_q4_4(acc, buf, bo, nb, sb, hasm, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4)
            for u in range(_NT):
                for i in range(nr):
                    out[t + u, r0 + i] = acc[u * _RT4 + i]
            t += _NT
        while t < T:
            _rows_q4_1(acc, buf, bo, nb, sb, hasm, xq, t * cols, cols, xi, t * nb, xf, t * nb * 4)
            for i in range(nr):
                out[t, r0 + i] = acc[i]
            t += 1


@_serial
def _rows_q4_serial(out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, 0, (rows + _RT4 - 1) // _RT4, acc[0])


@_parallel
def _rows_q4_par(out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, hasm)
    ntile = (rows + _RT4 - 1) // _RT4
    nch = acc.shape[0]
    per = (ntile + nch - 1) // nch
    for c in prange(nch):
        _rows_q4_tiles(out, xq, xi, xf, buf, rows, nb, sb, hasm, min(ntile, c * per), min(ntile, c * per + per), acc[c])


@_serial
def _rows_q8_tiles(out, xq, xf, buf, rows, nb, sb, k0, k1, acc):
    T, cols = xq.shape
    for kt in range(k0, k1):
        bo = kt * nb * sb
        r0 = kt * _RT8
        nr = min(_RT8, rows - r0)
        t = 0
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
    _rows_q8_tiles(out, xq, xf, buf, rows, nb, sb, 0, (rows + _RT8 - 1) // _RT8, acc[0])


@_parallel
def _rows_q8_par(out, xq, xd, xi, xf, buf, rows, nb, sb, acc):
    T = xq.shape[0]
    _rows_prep(xi, xf, xq, xd, T, nb, 0)
    ntile = (rows + _RT8 - 1) // _RT8
    nch = acc.shape[0]
    per = (ntile + nch - 1) // nch
    for c in prange(nch):
        _rows_q8_tiles(out, xq, xf, buf, rows, nb, sb, min(ntile, c * per), min(ntile, c * per + per), acc[c])


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
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


def _fast_ok(out, xq, xd, w, cls) -> bool:
    try:
        T = xq.shape[0]
        return (type(w) is cls and xq.dtype == _I8 and xd.dtype == _F32 and out.dtype == _F32
                and xq.ndim == 2 and xq.shape[1] == w.cols and xd.shape == (T, w.nb) and out.shape == (T, w.rows)
                and xq.flags.c_contiguous and xd.flags.c_contiguous and out.flags.c_contiguous
                and out.flags.writeable)
    except (AttributeError, IndexError, TypeError):
        return False


def _checks(out, xq, xd, w, cls) -> None:
    if not isinstance(w, cls):
        raise ValueError(f"w: expected a {cls.__name__}, got {type(w).__name__}")
    _check("xq", xq, np.int8, ndim=2)
    T, cols = xq.shape
    if cols != w.cols:
        raise ValueError(f"xq: has {cols} columns but w is {w.rows}x{w.cols}")
    _check("xd", xd, np.float32, (T, cols // QK))
    _check_out("out", out, np.float32, (T, w.rows))


def _bound_rows_q4(out, xq, xd, buf, rows, nb, sb, hasm, use_avx2: bool):
    T = xq.shape[0]
    xi, xf = _rbuffers(T, nb)
    args = (out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, _ACC)
    if not use_avx2:
        return partial(_rows_q4_generic, *args)
    serial = rows * nb * T < _PAR_MIN_BLOCKS or rows <= 2 * _RT4 or _NUM_THREADS == 1
    return partial(_rows_q4_serial if serial else _rows_q4_par, *args)


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


@_serial
def _rmsnorm_q80_ser(out, qs, d, x, weight, eps, T, n, f16c):
    _rmsnorm_rows(out, x, weight, eps, 0, T, n)
    if f16c:
        _quantize_q80_act_f16c(qs, d, out, T, n // QK)
    else:
        _quantize_q80_act(qs, d, out, T, n // QK)


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
    quantize = _quantize_q80_act_f16c if HAS_AVX2 else _quantize_q80_act
    if T * n >= _PAR_MIN_WORK and T > 1:
        def call():
            _rmsnorm_par(out, x, weight, float(eps), T, n)
            quantize(qs, d, out, T, n // QK)
        return call
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


# ---------------------------------------------------------------- rope (interleaved pairs)

@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _rotate(src, so, dst, do, cos, sin, p, half):
    """dst[do + 2i, do + 2i + 1] = the pair src[so + 2i, so + 2i + 1] rotated by angle row p."""
    for i in range(half):
        c = cos[p, i]
        s = sin[p, i]
        a = src[so + 2 * i]
        b = src[so + 2 * i + 1]
        dst[do + 2 * i] = a * c - b * s
        dst[do + 2 * i + 1] = a * s + b * c


@_serial
def _rope_rows(x, positions, cos, sin, hd, nh, t0, t1):
    for t in range(t0, t1):
        for h in range(nh):
            _rotate(x[t], h * hd, x[t], h * hd, cos, sin, positions[t], hd // 2)


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
    if T:
        pmin, pmax = (int(positions[0]),) * 2 if T == 1 else (int(positions.min()), int(positions.max()))
        if pmin < 0 or pmax >= cos.shape[0]:
            raise ValueError(f"positions: must lie in [0, {cos.shape[0]}), got [{pmin}, {pmax}]")
    nh = width // hd
    if T * width >= _PAR_MIN_WORK and T > 1:
        _rope_par(x, positions, cos, sin, hd, nh, T)
    else:
        _rope_rows(x, positions, cos, sin, hd, nh, 0, T)


# ---------------------------------------------------------------- attention

@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _exp_neg(x):
    """exp(x) for x <= 0 in float32 (rel. error ~2e-7; 0 below -87): 2**n * poly(r), vectorisable."""
    x = max(x, np.float32(-87.0))
    n = math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693145751953125)
    r = r - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    bits = np.int32(n + 127) << np.int32(23)
    return p * _i2f(bits)


@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
def _exp_f32(x):
    """exp(x) in float32 for any x (clamped to [-87, 88]; rel. error ~2e-7), vectorisable."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693145751953125)
    r = r - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _i2f(np.int32(n + 127) << np.int32(23))


@_serial
def _attend_one(out, q, k_cache, v_cache, t, h, kvh, hd, npos, scale, sc):
    """out[t, h*hd:(h+1)*hd] = softmax(scale * q.K[:npos]) @ V[:npos]; sc: scratch row >= npos."""
    qo = h * hd
    qv = q[t, qo:qo + hd]
    m = np.float32(-3.0e38)                    # not -inf: fastmath assumes no infinities
    j4 = npos // 4 * 4
    for j in range(0, j4, 4):                  # 4 positions per pass over q (4 independent sums)
        k0, k1, k2, k3 = k_cache[j, kvh], k_cache[j + 1, kvh], k_cache[j + 2, kvh], k_cache[j + 3, kvh]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for i in range(hd):
            s0 += qv[i] * k0[i]
            s1 += qv[i] * k1[i]
            s2 += qv[i] * k2[i]
            s3 += qv[i] * k3[i]
        sc[j], sc[j + 1], sc[j + 2], sc[j + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        m = max(m, max(max(sc[j], sc[j + 1]), max(sc[j + 2], sc[j + 3])))
    for j in range(j4, npos):
        kr = k_cache[j, kvh]
        s = np.float32(0.0)
        for i in range(hd):
            s += qv[i] * kr[i]
        s *= scale
        sc[j] = s
        m = max(m, s)
    tot = np.float32(0.0)
    for j in range(npos):
        e = _exp_neg(sc[j] - m)
        sc[j] = e
        tot += e
    inv = np.float32(1.0) / tot
    acc = out[t, qo:qo + hd]
    for i in range(hd):
        acc[i] = np.float32(0.0)
    j4 = npos // 4 * 4
    for j in range(0, j4, 4):                  # 4 rows per pass over the accumulator
        p0, p1, p2, p3 = sc[j] * inv, sc[j + 1] * inv, sc[j + 2] * inv, sc[j + 3] * inv
        v0, v1, v2, v3 = v_cache[j, kvh], v_cache[j + 1, kvh], v_cache[j + 2, kvh], v_cache[j + 3, kvh]
        for i in range(hd):
            acc[i] += (p0 * v0[i] + p1 * v1[i]) + (p2 * v2[i] + p3 * v3[i])
    for j in range(j4, npos):
        p = sc[j] * inv
        vr = v_cache[j, kvh]
        for i in range(hd):
            acc[i] += p * vr[i]


@_parallel
def _attention_par(out, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq, hd, p0, p1):
    for p in prange(p0, p1):
        t = p // nq
        h = p - t * nq
        _attend_one(out, q, k_cache[slots[t]], v_cache[slots[t]], t, h, kv_of_q[h], hd, positions[t] + 1,
                    scale, scratch[p - p0])


@_serial
def _attention_ser(out, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq, hd):
    for p in range(T * nq):
        t = p // nq
        h = p - t * nq
        _attend_one(out, q, k_cache[slots[t]], v_cache[slots[t]], t, h, kv_of_q[h], hd, positions[t] + 1,
                    scale, scratch[0])


@_serial
def _kv_ok(kv_of_q, nkv):
    for h in range(kv_of_q.shape[0]):
        if kv_of_q[h] < 0 or kv_of_q[h] >= nkv:
            return False
    return True


_ATT_SCRATCH: dict = {}
_KV_OK: set = set()                  # (nkv, kv_of_q bytes) already validated


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
    try:                                   # fast path when everything is right
        S, nkv, hd = k_cache.shape
        T, width = q.shape
        nq = width // hd
        ok = (type(q) is np.ndarray and k_cache.dtype == _F32 and v_cache.dtype == _F32 and q.dtype == _F32
              and out.dtype == _F32 and positions.dtype == _I32 and kv_of_q.dtype == _I32
              and v_cache.shape == k_cache.shape and width % hd == 0 and out.shape == q.shape
              and positions.shape == (T,) and kv_of_q.shape == (nq,)
              and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous and q.flags.c_contiguous
              and out.flags.c_contiguous and out.flags.writeable and positions.flags.c_contiguous
              and kv_of_q.flags.c_contiguous)
    except (AttributeError, ValueError, TypeError, ZeroDivisionError):
        ok = False
    if not ok:
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
    pmax = _check_positions(positions, T, S, nkv, kv_of_q)
    scratch = _scratch(scratch, T, nq, S, pmax)
    _attention_run(out, q, k_cache[np.newaxis], v_cache[np.newaxis], positions, _slots0(T), kv_of_q,
                   np.float32(scale), scratch, T, nq, hd, pmax)


_SLOTS0: dict = {}


def _slots0(T: int) -> np.ndarray:
    """int32 zeros [T]: every row in cache slot 0 (cached)."""
    z = _SLOTS0.get(T)
    if z is None:
        if len(_SLOTS0) > 64:
            _SLOTS0.clear()
        z = _SLOTS0[T] = np.zeros(T, np.int32)
    return z


def _max_position(positions, T: int, S: int) -> int:
    pmin, pmax = (int(positions[0]),) * 2 if T == 1 else (int(positions.min()), int(positions.max()))
    if pmin < 0 or pmax >= S:
        raise ValueError(f"positions: must lie in [0, {S}), got [{pmin}, {pmax}]")
    return pmax


def _check_positions(positions, T: int, S: int, nkv: int, kv_of_q) -> int:
    """positions in [0, S) and kv_of_q in [0, nkv) (validated once per distinct map); max position."""
    pmax = _max_position(positions, T, S)
    if kv_of_q.shape[0] and (nkv, kv_of_q.tobytes()) not in _KV_OK:
        if not _kv_ok(kv_of_q, nkv):
            raise ValueError(f"kv_of_q: must lie in [0, {nkv})")
        if len(_KV_OK) > 64:
            _KV_OK.clear()
        _KV_OK.add((nkv, kv_of_q.tobytes()))
    return pmax


def _scratch(scratch, T: int, nq: int, S: int, pmax: int) -> np.ndarray:
    if scratch is None:                   # cached per (rows, S): no page faults on every call
        key = (max(1, min(T * nq, 256)), S)
        scratch = _ATT_SCRATCH.get(key)
        if scratch is None:
            if len(_ATT_SCRATCH) > 8:
                _ATT_SCRATCH.clear()
            scratch = _ATT_SCRATCH[key] = np.empty(key, np.float32)
        return scratch                    # made here: right by construction
    _check("scratch", scratch, np.float32, ndim=2)
    if scratch.shape[1] < pmax + 1 or scratch.shape[0] < 1:
        raise ValueError(f"scratch: needs >= 1 row and >= {pmax + 1} columns, got {scratch.shape}")
    return scratch


def _attention_serial_ok(T: int, nq: int, hd: int, pmax: int, scratch) -> bool:
    return T * nq * (pmax + 1) * hd < _PAR_MIN_WORK or scratch.shape[0] == 1 or _NUM_THREADS == 1


def _attention_run(out, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq, hd,
                   pmax) -> None:
    if _attention_serial_ok(T, nq, hd, pmax, scratch):
        _attention_ser(out, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq, hd)
        return
    npairs, R = T * nq, scratch.shape[0]
    for p0 in range(0, npairs, R):
        _attention_par(out, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch,
                       T, nq, hd, p0, min(npairs, p0 + R))


# ---------------------------------------------------------------- attention block (rope + KV store + attention)

@_serial
def _rope_store(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, T):
    """Rotate q in place and k into the cache row of its position (the arithmetic of _rope_rows);
    copy v into the cache."""
    half = hd // 2
    kc0 = nq * hd
    vc0 = kc0 + nkv * hd
    for t in range(T):
        p = positions[t]
        row = qkv[t]
        for h in range(nq):
            _rotate(row, h * hd, row, h * hd, cos, sin, p, half)
        for h in range(nkv):
            _rotate(row, kc0 + h * hd, k_cache[slots[t], p, h], 0, cos, sin, p, half)
            vr = v_cache[slots[t], p, h]
            o = vc0 + h * hd
            for i in range(hd):
                vr[i] = row[o + i]


@_serial
def _attention_block_ser(out, qs, d, quant, qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin,
                         kv_of_q, scale, scratch, T, hd):
    _rope_store(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, T)
    _attention_ser(out, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq, hd)
    if quant == 2:
        _quantize_q80_act_f16c(qs, d, out, T, nq * hd // QK)
    elif quant == 1:
        _quantize_q80_act(qs, d, out, T, nq * hd // QK)


_NO_Q80 = (np.zeros((1, 1), np.int8), np.zeros((1, 1), np.float32))


def attention_block(out: np.ndarray, qkv: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                    positions: np.ndarray, slots: np.ndarray | None, cos: np.ndarray, sin: np.ndarray,
                    kv_of_q: np.ndarray, scale: float,
                    q80: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """A layer's attention on this rank's heads, from its fused projection qkv = [q | k | v]
    ([T, (nq + 2*nkv) * hd]).  Row t belongs to the sequence in cache slot slots[t] (None: all
    in slot 0) at position positions[t]: rotate its q (in place) and k by rope_interleaved's
    arithmetic, store k and v in the caches ([n_slots, S, nkv, hd]) at [slot, position], then
    ``attention`` over rows 0..positions[t] of its slot, into out [T, nq*hd].  Rows of one
    sequence come in position order.  q80 = (qs, d): also quantise out to Q80
    (quantize_q80_act), at decode in the same call."""
    bind_attention_block(out, qkv, k_cache, v_cache, positions, slots, cos, sin, kv_of_q, scale, q80)()


def bind_attention_block(out, qkv, k_cache, v_cache, positions, slots, cos, sin, kv_of_q,
                         scale: float, q80=None):
    """attention_block for these arrays as a call of no arguments (see bind_matmul): shapes
    are checked once; positions and slots are read, and checked, at every call."""
    try:                                   # fast path when everything is right
        n_slots, S, nkv, hd = k_cache.shape
        T, nq = out.shape[0], out.shape[1] // hd
        ok = (type(qkv) is np.ndarray and k_cache.dtype == _F32 and v_cache.dtype == _F32
              and qkv.dtype == _F32 and out.dtype == _F32 and positions.dtype == _I32
              and kv_of_q.dtype == _I32 and cos.dtype == _F32 and sin.dtype == _F32
              and v_cache.shape == k_cache.shape and out.shape[1] == nq * hd
              and qkv.shape == (T, (nq + 2 * nkv) * hd) and positions.shape == (T,)
              and kv_of_q.shape == (nq,) and cos.shape == sin.shape and cos.shape[1] * 2 == hd
              and cos.shape[0] >= S and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous
              and qkv.flags.c_contiguous and qkv.flags.writeable and out.flags.c_contiguous
              and out.flags.writeable and positions.flags.c_contiguous and kv_of_q.flags.c_contiguous
              and cos.flags.c_contiguous and sin.flags.c_contiguous
              and k_cache.flags.writeable and v_cache.flags.writeable)
    except (AttributeError, ValueError, TypeError, ZeroDivisionError, IndexError):
        ok = False
    if not ok:
        _check("k_cache", k_cache, np.float32, ndim=4)
        n_slots, S, nkv, hd = k_cache.shape
        _check_out("k_cache", k_cache, np.float32, (n_slots, S, nkv, hd))
        if hd % 2:
            raise ValueError(f"k_cache: head_dim {hd} must be even")
        _check_out("v_cache", v_cache, np.float32, (n_slots, S, nkv, hd))
        _check("out", out, np.float32, ndim=2)
        T, width = out.shape
        if width % hd:
            raise ValueError(f"out: row length {width} is not a multiple of head_dim {hd}")
        nq = width // hd
        _check_out("out", out, np.float32, (T, width))
        _check_out("qkv", qkv, np.float32, (T, (nq + 2 * nkv) * hd))
        _check("positions", positions, np.int32, (T,))
        _check("kv_of_q", kv_of_q, np.int32, (nq,))
        _check("cos", cos, np.float32, ndim=2)
        _check("sin", sin, np.float32, cos.shape)
        if cos.shape[1] * 2 != hd or cos.shape[0] < S:
            raise ValueError(f"cos/sin: expected >= {S} rows of {hd // 2}, got {cos.shape}")
    if q80 is not None and not _q80_outputs_ok(out, q80[0], q80[1], T, nq * hd):
        if hd * nq % QK:
            raise ValueError(f"q80: row length {hd * nq} must be a multiple of {QK}")
        _check_out("qs", q80[0], np.int8, (T, nq * hd))
        _check_out("d", q80[1], np.float32, (T, nq * hd // QK))
    if slots is None:
        slots = _slots0(T)
    else:
        _check("slots", slots, np.int32, (T,))
    if T == 0:
        return _noop
    if nq and not _kv_ok(kv_of_q, nkv):
        raise ValueError(f"kv_of_q: must lie in [0, {nkv})")
    scale = np.float32(scale)
    qs, d = q80 if q80 is not None else _NO_Q80
    quant = 0 if q80 is None else (2 if HAS_AVX2 else 1)

    def call() -> None:
        pmax = _max_position(positions, T, S)
        lo, hi = (int(slots[0]),) * 2 if T == 1 else (int(slots.min()), int(slots.max()))
        if lo < 0 or hi >= n_slots:
            raise ValueError(f"slots: must lie in [0, {n_slots}), got [{lo}, {hi}]")
        scratch = _scratch(None, T, nq, S, pmax)
        if _attention_serial_ok(T, nq, hd, pmax, scratch):
            _attention_block_ser(out, qs, d, quant, qkv, nq, nkv, k_cache, v_cache, positions, slots,
                                 cos, sin, kv_of_q, scale, scratch, T, hd)
            return
        _rope_store(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, T)
        _attention_run(out, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq,
                       hd, pmax)
        if q80 is not None:
            quantize_q80_act(qs, d, out)
    return call


# ---------------------------------------------------------------- silu * mul (SwiGLU)

@njit(inline="always", cache=True, fastmath=True, boundscheck=False, error_model="numpy")
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


def _q41_blocks(w):
    from .quant import quantize_q41
    return quantize_q41(w)


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
    quantize = _quantize_q80_act_f16c if HAS_AVX2 else _quantize_q80_act
    if T * n >= _PAR_MIN_WORK and T > 1:
        def call():
            _silu_mul_par(out, gate_up, T, n)
            quantize(qs, d, out, T, n // QK)
        return call
    if T == 1 and n >= _SPLIT_MIN and _NUM_THREADS > 1:
        return partial(_silu_mul_q80_split, out, qs, d, gate_up, n, HAS_AVX2, _NUM_THREADS)
    return partial(_silu_mul_q80_ser, out, qs, d, gate_up, T, n, HAS_AVX2)


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
    from .quant import Q41Matrix, Q80Matrix
    wr = Q40Matrix.from_f32(rng.standard_normal((rows, n)).astype(np.float32))        # row-tile layout
    w41 = Q41Matrix.from_blocks(_q41_blocks(rng.standard_normal((rows, n)).astype(np.float32)))
    w80 = Q80Matrix.from_f32(rng.standard_normal((rows, n)).astype(np.float32))
    for T_ in (1, 5):
        o = np.empty((T_, rows), np.float32)
        xq_, xd_ = np.zeros((T_, n), np.int8), np.ones((T_, n // QK), np.float32)
        matmul_q80_q40(o, xq_, xd_, wr)
        matmul_q80_q41(o, xq_, xd_, w41)
        matmul_q80_q80(o, xq_, xd_, w80)
        if HAS_AVX2:
            xi, xf = _rbuffers(T_, n // QK)
            _rows_q4_par(o, xq_, xd_, xi, xf, w41.buf, rows, n // QK, w41.stride, 1, _ACC)
            _rows_q8_par(o, xq_, xd_, xi, xf, w80.buf, rows, n // QK, w80.stride, _ACC)
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
    kc4 = np.stack([kc, kc])
    slots = np.array([1, 0], np.int32)
    _attention_par(o, x, kc4, kc4, pos, slots, kvq, np.float32(0.25), sc, T, 4, 16, 0, T * 4)
    qkv = np.concatenate([x, x[:, :64]], axis=1)
    oq, od = np.empty((T, n), np.int8), np.empty((T, n // QK), np.float32)
    attention_block(o, qkv, kc4, kc4.copy(), pos, slots, cos, sin, kvq, 0.25, (oq, od))
    attention_block(o, qkv, kc4, kc4.copy(), pos, None, cos, sin, kvq, 0.25)
    _rope_store(qkv, 4, 2, kc4, kc4.copy(), pos, slots, cos, sin, 16, T)
    rmsnorm_heads(x, 16, 2, np.ones(16, np.float32), 1e-6)
    gu = np.concatenate([x, x], axis=1)
    silu_mul(y, gu)
    _silu_mul_par(y, gu, T, n)
    rmsnorm_q80(y, xq, xd, x, np.ones(n, np.float32), 1e-5)
    silu_mul_q80(y, xq, xd, gu)
    _silu_mul_q80_split(y[:1].copy(), xq[:1].copy(), xd[:1].copy(), gu[:1].copy(), n, HAS_AVX2, 2)

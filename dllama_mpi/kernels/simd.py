"""Low-level building blocks of the kernels: llvmlite intrinsics and vectorisable float math.

* fp16 <-> f32 conversions (``_h2f``, ``_f32_f16_f32``) and bit casts (``_i2f``); KV cache
  elements of either type (``_kv_value``: f32, or f16 held as uint16);
* software prefetch (``_prefetch``, and ``_prefetch_fn`` for hand-written IR);
* the kernel path (``KERNELS``: vnni512, avx2 or generic, from the host's features, or forced
  lower with ``DLLAMA_MPI_KERNELS``; ``HAS_AVX2``, ``HAS_VNNI512``);
* the IR types and helpers of the hand-written vector loops (``_splat``, ``_ldv``, ``_as64``);
* float32 exp (``_exp_neg``, ``_exp_f32``): polynomial, vectorisable under fastmath;
* attention's row products over a KV cache of either type (``_dot4``/``_dot1``: q . k,
  ``_axpy4``/``_axpy1``: out += p * v) and a sum in a fixed order (``_vsum``).
"""
from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import _inline

# ---------------------------------------------------------------- fp16 <-> f32, bit casts

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


@intrinsic
def _kv_value(typingctx, v, ary):
    """float32 v as an element of array `ary`: v for a float32 array, its nearest f16 (ties
    to even, as numpy's astype) as a uint16 bit pattern for a uint16 (f16 KV cache) array."""
    if not isinstance(ary, types.Array) or v != types.float32:
        return None
    if ary.dtype == types.float32:
        def codegen(context, builder, signature, args):
            return args[0]
        return types.float32(v, ary), codegen
    if ary.dtype == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return types.uint16(v, ary), codegen
    return None


# ---------------------------------------------------------------- CPU features: which kernel path

KERNEL_PATHS = ("vnni512", "avx2", "generic")    # best first


def _host_paths() -> tuple:
    """The kernel paths this host can run (always "generic"): hand-written IR only on a host
    build (numba's CPU_NAME host/native, no CPU_FEATURES override)."""
    try:
        feats = llvm_binding.get_host_cpu_features()
        cpu = (numba.config.CPU_NAME or "host").lower()
        if cpu not in ("host", "native") or numba.config.CPU_FEATURES:
            return ("generic",)
    except Exception:               # pragma: no cover - exotic llvmlite builds
        return ("generic",)
    paths = ["generic"]
    if feats.get("avx2", False) and feats.get("fma", False) and feats.get("f16c", False):
        paths.insert(0, "avx2")
        if all(feats.get(f, False) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni")):
            paths.insert(0, "vnni512")
    return tuple(paths)


def _choose_path(host: tuple, env: str | None) -> str:
    """The best host path, or the one DLLAMA_MPI_KERNELS asks for (avx2 | generic | vnni512 |
    auto) if the host can run it; never a path the host lacks (LLVM could not select it)."""
    want = (env or "auto").strip().lower()
    if want in ("", "auto"):
        return host[0]
    if want not in KERNEL_PATHS:
        raise ValueError(f"DLLAMA_MPI_KERNELS={env!r}: expected one of auto, {', '.join(KERNEL_PATHS)}")
    return want if want in host else host[0]


HOST_PATHS = _host_paths()
# the one place the environment variable is read (at import, before any kernel is compiled)
KERNELS = _choose_path(HOST_PATHS, os.environ.get("DLLAMA_MPI_KERNELS"))
HAS_AVX2 = KERNELS in ("vnni512", "avx2")      # the AVX2 (256-bit) kernels and F16C conversions
HAS_VNNI512 = KERNELS == "vnni512"             # AVX-512 VNNI row-tile matmuls (matmul_vnni)


# ---------------------------------------------------------------- IR types and helpers (hand-written vector loops)

_i8, _i16 = ir.IntType(8), ir.IntType(16)
_v32i8, _v16i16 = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16)
_v8i32, _v16f32, _v8f32 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.FloatType(), 8)
_i32, _i64 = ir.IntType(32), ir.IntType(64)

_NT = 4                            # tokens sharing one unpacking of the weights (4 accumulators)


def _splat(builder, val, n):
    vty = ir.VectorType(val.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_i32, n), [0] * n))


def _ldv(builder, ptr, off, vty):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), vty.as_pointer()), align=1)


def _as64(builder, v):
    return v if v.type == _i64 else builder.sext(v, _i64)


# ---------------------------------------------------------------- software prefetch

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


def _prefetch_fn(builder):
    """The llvm.prefetch declaration, for hand-written IR loops (the call never faults)."""
    p8 = ir.IntType(8).as_pointer()
    name = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [p8, _i32, _i32, _i32]), name)


# ---------------------------------------------------------------- float32 exp

@_inline
def _exp_neg(x):
    """exp(x) for x <= 0 in float32 (rel. error ~2e-7; 0 below -87): 2**n * poly(r), vectorisable."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))   # float32 (math.floor: int64, float64 after)
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
    bits = (np.int32(n) + np.int32(127)) << np.int32(23)
    return p * _i2f(bits)


@_inline
def _exp_f32(x):
    """exp(x) in float32 for any x (clamped to [-87, 88]; rel. error ~2e-7), vectorisable."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
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
    return p * _i2f((np.int32(n) + np.int32(127)) << np.int32(23))


# ---------------------------------------------------------------- attention's row products (any length)
#
# q . k for 1 or 4 cache rows, and out += p * v over 1 or 4 rows: 16 float32 lanes at a time
# (one zmm, two ymm or four xmm: LLVM splits the vector for the host), a scalar loop for the
# last n % 16; a cache of f16 bit patterns (uint16) is widened as it is loaded. Hand-written IR
# because numba's loops over row slices compile to runtime alias checks and reference counts.

_vhalf16 = ir.VectorType(ir.HalfType(), 16)


def _row_ptr(context, builder, ty, val):
    return context.make_array(ty)(context, builder, value=val).data


def _f32x16(builder, ptr, off, f16: bool):
    if f16:
        return builder.fpext(builder.bitcast(_ldv(builder, ptr, off, _v16i16), _vhalf16), _v16f32)
    return _ldv(builder, ptr, off, _v16f32)


def _f32x1(builder, ptr, off, f16: bool):
    v = builder.load(builder.gep(ptr, [off]))
    return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType()) if f16 else v


def _hsum16(builder, v):
    for n in (8, 4, 2, 1):
        ix = ir.VectorType(_i32, n)
        v = builder.fadd(builder.shuffle_vector(v, v, ir.Constant(ix, list(range(n)))),
                         builder.shuffle_vector(v, v, ir.Constant(ix, list(range(n, 2 * n)))))
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _fma16(builder):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16f32, [_v16f32] * 3),
                                          "llvm.fma.v16f32")


def _kv_ok_type(q, kv) -> bool:
    return (isinstance(q, types.Array) and q.dtype == types.float32 and isinstance(kv, types.Array)
            and kv.dtype in (types.float32, types.uint16))


def _k64(v: int):
    return ir.Constant(_i64, v)


def _row_args(context, builder, signature, args, nrows: int):
    """The shared arguments (a, ao, kv, ko, stride, n) of the row products: pointers of the
    float32 array a and of the cache kv (f16: uint16 bits), a's offset, the cache offsets of
    the nrows rows, n and n rounded down to 16 lanes."""
    tys = signature.args
    ap, kp = _row_ptr(context, builder, tys[0], args[0]), _row_ptr(context, builder, tys[2], args[2])
    ao, ko, stride, n = (_as64(builder, args[i]) for i in (1, 3, 4, 5))
    rows = [builder.add(ko, builder.mul(stride, _k64(r))) for r in range(nrows)]
    return ap, kp, tys[2].dtype == types.uint16, ao, rows, n, builder.and_(n, _k64(-16))


def _dots_codegen(nrows: int):
    def codegen(context, builder, signature, args):
        qp, kp, f16, qo, rows, n, n16 = _row_args(context, builder, signature, args, nrows)
        k = _k64
        n32 = builder.and_(n, k(-32))
        # two accumulators a row (even and odd 16-lane chunks): FMA chains half as long
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None)) for _ in range(2)]
                for _ in range(nrows)]
        fma = _fma16(builder)

        def chunk(i, half):
            qv = _ldv(builder, qp, builder.add(qo, i), _v16f32)
            for r in range(nrows):
                kv = _f32x16(builder, kp, builder.add(rows[r], i), f16)
                builder.store(builder.call(fma, [qv, kv, builder.load(accs[r][half])]), accs[r][half])
        with cgutils.for_range_slice(builder, k(0), n32, k(32), intp=_i64) as (i, _):
            chunk(i, 0)
            chunk(builder.add(i, k(16)), 1)
        with cgutils.for_range_slice(builder, n32, n16, k(16), intp=_i64) as (i, _):
            chunk(i, 0)
        sums = [cgutils.alloca_once_value(builder, _hsum16(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))))
                for a in accs]
        with cgutils.for_range_slice(builder, n16, n, k(1), intp=_i64) as (i, _):
            qs = builder.load(builder.gep(qp, [builder.add(qo, i)]))
            for r in range(nrows):
                ks = _f32x1(builder, kp, builder.add(rows[r], i), f16)
                builder.store(builder.fadd(builder.load(sums[r]), builder.fmul(qs, ks)), sums[r])
        vals = [builder.load(s) for s in sums]
        return vals[0] if nrows == 1 else context.make_tuple(builder, signature.return_type, vals)
    return codegen


@intrinsic
def _dot4(typingctx, q, qo, kv, ko, stride, n):
    """(q[qo:qo+n] . kv[ko + r*stride:][:n] for r in 0..3) as float32 (flat element offsets)."""
    if not _kv_ok_type(q, kv):
        return None
    return types.UniTuple(types.float32, 4)(q, qo, kv, ko, stride, n), _dots_codegen(4)


@intrinsic
def _dot1(typingctx, q, qo, kv, ko, stride, n):
    """q[qo:qo+n] . kv[ko:ko+n] as float32 (stride unused: the signature of _dot4)."""
    if not _kv_ok_type(q, kv):
        return None
    return types.float32(q, qo, kv, ko, stride, n), _dots_codegen(1)


@intrinsic
def _vsum(typingctx, x, xo, n):
    """x[xo:xo+n] summed in a fixed order (16 lanes, then their tree, then the last n % 16 in
    turn) in every kernel it is inlined into: fastmath loops may vectorise a sum differently
    from one caller to the next, and two kernels must give the same bits."""
    if not (isinstance(x, types.Array) and x.dtype == types.float32):
        return None

    def codegen(context, builder, signature, args):
        xp = _row_ptr(context, builder, signature.args[0], args[0])
        xo, n = _as64(builder, args[1]), _as64(builder, args[2])
        k = _k64
        n16 = builder.and_(n, k(-16))
        acc = cgutils.alloca_once_value(builder, ir.Constant(_v16f32, None))
        with cgutils.for_range_slice(builder, k(0), n16, k(16), intp=_i64) as (i, _):
            builder.store(builder.fadd(builder.load(acc), _ldv(builder, xp, builder.add(xo, i), _v16f32)), acc)
        tot = cgutils.alloca_once_value(builder, _hsum16(builder, builder.load(acc)))
        with cgutils.for_range_slice(builder, n16, n, k(1), intp=_i64) as (i, _):
            builder.store(builder.fadd(builder.load(tot), builder.load(builder.gep(xp, [builder.add(xo, i)]))), tot)
        return builder.load(tot)
    return types.float32(x, xo, n), codegen


def _axpys_codegen(nrows: int):
    def codegen(context, builder, signature, args):
        op, vp, f16, oo, rows, n, n16 = _row_args(context, builder, signature, args, nrows)
        k = _k64
        ps = list(args[6:6 + nrows])
        pv = [_splat(builder, p, 16) for p in ps]
        fma = _fma16(builder)
        with cgutils.for_range_slice(builder, k(0), n16, k(16), intp=_i64) as (i, _):
            optr = builder.bitcast(builder.gep(op, [builder.add(oo, i)]), _v16f32.as_pointer())
            terms = [_f32x16(builder, vp, builder.add(rows[r], i), f16) for r in range(nrows)]
            if nrows == 4:          # (p0 v0 + p1 v1) + (p2 v2 + p3 v3): short dependency chains
                a = builder.call(fma, [pv[1], terms[1], builder.fmul(pv[0], terms[0])])
                b = builder.call(fma, [pv[3], terms[3], builder.fmul(pv[2], terms[2])])
                acc = builder.fadd(builder.load(optr, align=1), builder.fadd(a, b))
            else:
                acc = builder.call(fma, [pv[0], terms[0], builder.load(optr, align=1)])
            builder.store(acc, optr, align=1)
        with cgutils.for_range_slice(builder, n16, n, k(1), intp=_i64) as (i, _):
            optr = builder.gep(op, [builder.add(oo, i)])
            acc = builder.load(optr)
            for r in range(nrows):
                acc = builder.fadd(acc, builder.fmul(ps[r], _f32x1(builder, vp, builder.add(rows[r], i), f16)))
            builder.store(acc, optr)
        return context.get_dummy_value()
    return codegen


@intrinsic
def _axpy4(typingctx, out, oo, v, vo, stride, n, p0, p1, p2, p3):
    """out[oo:oo+n] += sum over r < 4 of p_r * v[vo + r*stride:][:n] (flat element offsets)."""
    if not _kv_ok_type(out, v) or any(p != types.float32 for p in (p0, p1, p2, p3)):
        return None
    return types.void(out, oo, v, vo, stride, n, p0, p1, p2, p3), _axpys_codegen(4)


@intrinsic
def _axpy1(typingctx, out, oo, v, vo, stride, n, p0):
    """out[oo:oo+n] += p0 * v[vo:vo+n] (stride unused: the signature of _axpy4)."""
    if not _kv_ok_type(out, v) or p0 != types.float32:
        return None
    return types.void(out, oo, v, vo, stride, n, p0), _axpys_codegen(1)

"""Low-level building blocks of the kernels: llvmlite intrinsics and vectorisable float math.

* fp16 <-> f32 conversions (``_h2f``, ``_f32_f16_f32``) and bit casts (``_i2f``); KV cache
  elements of either type (``_kv_value``: f32, or f16 held as uint16);
* software prefetch (``_prefetch``, and ``_prefetch_fn`` for hand-written IR);
* the kernel path (``KERNELS``: vnni512, avxvnni, avx2 or generic, from the host's features, or
  forced lower with ``DLLAMA_MPI_KERNELS``; ``HAS_AVX2``, ``HAS_VNNI``);
* the IR types and helpers of the hand-written vector loops (``_splat``, ``_ldv``, ``_as64``);
* float32 exp (``_exp_neg``, ``_exp_f32``): polynomial, vectorisable under fastmath;
* attention's products over a KV cache of either type, for up to 4 query heads sharing a
  cache row (``_qk_heads``: q . k, ``_pv_heads``: out += p * v), and a sum in a fixed order
  (``_vsum``).
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

from ..errors import DllamaError
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

KERNEL_PATHS = ("vnni512", "avxvnni", "avx2", "generic")    # best first


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
        avx512 = all(feats.get(f, False) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni"))
        # 256-bit vpdpbusd: VEX-encoded with AVX-VNNI (Intel client and E-core Xeon CPUs, which
        # lack AVX-512), EVEX-encoded with AVX-512 VNNI + VL (so an AVX-512 host tests it)
        if avx512 or feats.get("avxvnni", False):
            paths.insert(0, "avxvnni")
        if avx512:
            paths.insert(0, "vnni512")
    return tuple(paths)


def _choose_path(host: tuple, env: str | None) -> str:
    """The best host path, or the one DLLAMA_MPI_KERNELS asks for (vnni512 | avxvnni | avx2 |
    generic | auto) if the host can run it; never a path the host lacks (LLVM could not select it)."""
    want = (env or "auto").strip().lower()
    if want in ("", "auto"):
        return host[0]
    if want not in KERNEL_PATHS:
        raise DllamaError(f"DLLAMA_MPI_KERNELS={env!r}: expected one of auto, {', '.join(KERNEL_PATHS)}")
    return want if want in host else host[0]


HOST_PATHS = _host_paths()
# the one place the environment variable is read (at import, before any kernel is compiled)
KERNELS = _choose_path(HOST_PATHS, os.environ.get("DLLAMA_MPI_KERNELS"))
HAS_AVX2 = KERNELS != "generic"                # the AVX2 (256-bit) kernels and F16C conversions
HAS_VNNI = KERNELS in ("vnni512", "avxvnni")   # the VNNI row-tile matmuls (matmul_vnni)


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


# ---------------------------------------------------------------- attention's head products (any length)
#
# One cache row (a position's K or V segment of one KV head, n elements) against up to 4 query
# heads that share it: q . k for each head (_qk_heads), and out += p * v into each head's
# output (_pv_heads). The segment is loaded once for the heads, 16 float32 lanes at a time
# (one zmm, two ymm or four xmm: LLVM splits the vector for the host), widened as it is loaded
# from a cache of f16 bit patterns (uint16); a scalar loop takes the last n % 16. Attention
# calls them position after position, so the cache streams in address order (what the
# hardware prefetchers follow). Hand-written IR because numba's loops over row slices compile
# to runtime alias checks and reference counts.

_vhalf16 = ir.VectorType(ir.HalfType(), 16)
_NH = 4                            # query heads per call


def _row_ptr(context, builder, ty, val):
    return context.make_array(ty)(context, builder, value=val).data


def _f32x16(builder, ptr, off, f16: bool):
    if f16:
        return builder.fpext(builder.bitcast(_ldv(builder, ptr, off, _v16i16), _vhalf16), _v16f32)
    return _ldv(builder, ptr, off, _v16f32)


def _f32x1(builder, ptr, off, f16: bool):
    v = builder.load(builder.gep(ptr, [off]))
    return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType()) if f16 else v


def _shuf(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(lanes)), lanes))


def _hsum16(builder, v):
    for n in (8, 4, 2, 1):
        ix = ir.VectorType(_i32, n)
        v = builder.fadd(builder.shuffle_vector(v, v, ir.Constant(ix, list(range(n)))),
                         builder.shuffle_vector(v, v, ir.Constant(ix, list(range(n, 2 * n)))))
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _hsum16x4(builder, vs):
    """The lane sums of four v16f32, in one tree: [sum(vs[0]), ..., sum(vs[3])] as scalars."""
    ab = builder.fadd(_shuf(builder, vs[0], vs[1], list(range(8)) + list(range(16, 24))),
                      _shuf(builder, vs[0], vs[1], list(range(8, 16)) + list(range(24, 32))))
    cd = builder.fadd(_shuf(builder, vs[2], vs[3], list(range(8)) + list(range(16, 24))),
                      _shuf(builder, vs[2], vs[3], list(range(8, 16)) + list(range(24, 32))))
    # lanes 0-3: vs[0]'s 4 partials, 4-7: vs[1]'s, 8-11: vs[2]'s, 12-15: vs[3]'s
    lo4 = [0, 1, 2, 3, 8, 9, 10, 11]
    abcd = builder.fadd(_shuf(builder, ab, cd, lo4 + [16 + i for i in lo4]),
                        _shuf(builder, ab, cd, [i + 4 for i in lo4] + [20 + i for i in lo4]))
    und = ir.Constant(_v16f32, ir.Undefined)
    e = builder.fadd(abcd, _shuf(builder, abcd, und, [i ^ 2 for i in range(16)]))
    f = builder.fadd(e, _shuf(builder, e, und, [i ^ 1 for i in range(16)]))
    return [builder.extract_element(f, ir.Constant(_i32, 4 * r)) for r in range(4)]


def _fma16(builder):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16f32, [_v16f32] * 3),
                                          "llvm.fma.v16f32")


def _kv_ok_type(q, kv) -> bool:
    return (isinstance(q, types.Array) and q.dtype == types.float32 and isinstance(kv, types.Array)
            and kv.dtype in (types.float32, types.uint16))


def _k64(v: int):
    return ir.Constant(_i64, v)


def _by_heads(builder, nh, body):
    """body(m) for m = nh heads (1 <= nh; 4 or more: 4), one code path per m (loops free of
    per-head branches), chosen by one switch."""
    end = builder.append_basic_block("heads.end")
    blocks = [builder.append_basic_block(f"heads.{m}") for m in range(1, _NH + 1)]
    switch = builder.switch(nh, blocks[-1])
    for m, block in enumerate(blocks[:-1], 1):
        switch.add_case(_k64(m), block)
    for m, block in enumerate(blocks, 1):
        builder.position_at_end(block)
        body(m)
        builder.branch(end)
    builder.position_at_end(end)


@intrinsic
def _qk_heads(typingctx, sc, so, ss, q, qo, kv, ko, n, nh, scale):
    """sc[so + i*ss] = scale * (q[qo + i*n:][:n] . kv[ko:ko+n]) for the nh <= 4 heads i < nh
    (flat element offsets; the sums of the heads in one reduction tree, the same bits everywhere)."""
    if not (_kv_ok_type(q, kv) and isinstance(sc, types.Array) and sc.dtype == types.float32
            and scale == types.float32):
        return None

    def codegen(context, builder, signature, args):
        tys = signature.args
        sp, qp, kp = (_row_ptr(context, builder, tys[i], args[i]) for i in (0, 3, 5))
        f16 = tys[5].dtype == types.uint16
        so, ss, qo, ko, n, nh = (_as64(builder, args[i]) for i in (1, 2, 4, 6, 7, 8))
        scale = args[9]
        k = _k64
        n16 = builder.and_(n, k(-16))
        fma = _fma16(builder)
        zero = ir.Constant(_v16f32, None)

        def body(m):
            heads = [builder.add(qo, builder.mul(n, k(r))) for r in range(m)]
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(m)]
            with cgutils.for_range_slice(builder, k(0), n16, k(16), intp=_i64) as (i, _):
                kv16 = _f32x16(builder, kp, builder.add(ko, i), f16)
                for r in range(m):
                    qv = _ldv(builder, qp, builder.add(heads[r], i), _v16f32)
                    builder.store(builder.call(fma, [qv, kv16, builder.load(accs[r])]), accs[r])
            vs = [builder.load(a) for a in accs]
            tot = [_hsum16(builder, vs[0])] if m == 1 else _hsum16x4(builder, vs + [zero] * (4 - m))[:m]
            sums = [cgutils.alloca_once_value(builder, v) for v in tot]
            with cgutils.for_range_slice(builder, n16, n, k(1), intp=_i64) as (i, _):
                ks = _f32x1(builder, kp, builder.add(ko, i), f16)
                for r in range(m):
                    qs = builder.load(builder.gep(qp, [builder.add(heads[r], i)]))
                    builder.store(builder.fadd(builder.load(sums[r]), builder.fmul(qs, ks)), sums[r])
            for r in range(m):
                builder.store(builder.fmul(builder.load(sums[r]), scale),
                              builder.gep(sp, [builder.add(so, builder.mul(ss, k(r)))]))
        _by_heads(builder, nh, body)
        return context.get_dummy_value()
    return types.void(sc, so, ss, q, qo, kv, ko, n, nh, scale), codegen


@intrinsic
def _pv_heads(typingctx, out, oo, v, vo, n, nh, p0, p1, p2, p3):
    """out[oo + i*n:][:n] += p_i * v[vo:vo+n] for the nh <= 4 heads i < nh (flat offsets)."""
    if not _kv_ok_type(out, v) or any(p != types.float32 for p in (p0, p1, p2, p3)):
        return None

    def codegen(context, builder, signature, args):
        tys = signature.args
        op, vp = _row_ptr(context, builder, tys[0], args[0]), _row_ptr(context, builder, tys[2], args[2])
        f16 = tys[2].dtype == types.uint16
        oo, vo, n, nh = (_as64(builder, args[i]) for i in (1, 3, 4, 5))
        ps = list(args[6:10])
        k = _k64
        n16 = builder.and_(n, k(-16))
        fma = _fma16(builder)

        def body(m):
            pv = [_splat(builder, p, 16) for p in ps[:m]]
            heads = [builder.add(oo, builder.mul(n, k(r))) for r in range(m)]
            with cgutils.for_range_slice(builder, k(0), n16, k(16), intp=_i64) as (i, _):
                v16 = _f32x16(builder, vp, builder.add(vo, i), f16)
                for r in range(m):
                    optr = builder.bitcast(builder.gep(op, [builder.add(heads[r], i)]), _v16f32.as_pointer())
                    builder.store(builder.call(fma, [pv[r], v16, builder.load(optr, align=1)]), optr, align=1)
            with cgutils.for_range_slice(builder, n16, n, k(1), intp=_i64) as (i, _):
                vs = _f32x1(builder, vp, builder.add(vo, i), f16)
                for r in range(m):
                    optr = builder.gep(op, [builder.add(heads[r], i)])
                    builder.store(builder.fadd(builder.load(optr), builder.fmul(ps[r], vs)), optr)
        _by_heads(builder, nh, body)
        return context.get_dummy_value()
    return types.void(out, oo, v, vo, n, nh, p0, p1, p2, p3), codegen


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

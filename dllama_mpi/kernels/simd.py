"""Low-level building blocks of the kernels: llvmlite intrinsics and vectorisable float math.

* fp16 <-> f32 conversions (``_h2f``, ``_f32_f16_f32``) and bit casts (``_i2f``); KV cache
  elements of either type (``_kv_load``, ``_kv_value``: f32, or f16 held as uint16);
* software prefetch (``_prefetch``, and ``_prefetch_fn`` for hand-written IR);
* the kernel path (``KERNELS``: vnni512, avx2 or generic, from the host's features, or forced
  lower with ``DLLAMA_MPI_KERNELS``; ``HAS_AVX2``, ``HAS_VNNI512``);
* the IR types and helpers of the hand-written vector loops (``_splat``, ``_ldv``, ``_as64``);
* float32 exp (``_exp_neg``, ``_exp_f32``): polynomial, vectorisable under fastmath.
"""
from __future__ import annotations

import math
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
def _kv_load(typingctx, x):
    """An element of a KV cache as float32: a float32 as it is, a uint16 as the f16 it holds
    (one kernel body serves both cache types; the f32 one compiles to what it was)."""
    if x == types.float32:
        def codegen(context, builder, signature, args):
            return args[0]
        return types.float32(x), codegen
    if x == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(x), codegen
    return None


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


@_inline
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

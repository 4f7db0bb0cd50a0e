"""Numba kernels: every hot loop of the forward pass, output array first.

Each public function is a thin wrapper that checks dtypes, shapes and contiguity (raising
``ValueError`` with a clear message) and then calls a private ``@njit`` body that trusts its
inputs and allocates nothing.  The ``bind_*`` forms check once and return the bound call.

Conventions: activations are ``float32 [T, n]`` (T tokens), weights ``[rows, cols]`` = ``[out, in]``.

Modules, bottom up: ``_jit`` (numba flags, threads), ``simd`` (llvmlite intrinsics), ``q80``
(activation quantisation), ``matmul_slab`` / ``matmul_rows`` (Q80 x Q4/Q41/Q80 kernels) and
``matmul`` (their dispatch), ``norm``, ``attention`` (rope, attention), ``ffn`` (SwiGLU).
This package re-exports the public names and adds ``warmup`` (compile, or load from numba's
cache, the kernels a run needs, up front: ``needed`` says which).
"""
from __future__ import annotations

import numpy as np

from ..quant import QK, ROW_TILE_MAX_COLS, Q40Matrix, Q41Matrix, Q80Matrix, quantize_q40, quantize_q41
from ._jit import choose_threading_layer, get_num_threads, max_threads, set_num_threads
from .attention import attention, attention_block, attention_scratch, bind_attention_block, rope_interleaved
from .ffn import bind_silu_mul_q80, silu_mul, silu_mul_q80
from .fused_layer import bind_layers
from .fused_tokens import bind_ffn, bind_norm_matmul
from .moe import route
from .matmul import bind_matmul, matmul_f16, matmul_f32, matmul_q80_q40, matmul_q80_q41, matmul_q80_q80
from .matmul_slab import PREFETCH_ROWS
from .norm import bind_rmsnorm_q80, rmsnorm, rmsnorm_heads, rmsnorm_q80
from .q80 import quantize_q80_act
from .simd import HAS_AVX2, HAS_VNNI, KERNELS

# the private kernels warmup() compiles as well (parallel twins, the other ISA path)
from .attention import (_attention_block_par, _attention_block_ser, _attention_long_par, _attention_rows_par,
                        _attention_ser, _ranges, _rope_par, _rope_rows, _rope_store)
from .fused_layer import _layers_fused
from .layer_bands import _layers_banded
from .fused_tokens import _ffn_fused, _norm_matmul_fused
from .ffn import _SPLIT_MIN, _silu_mul_par, _silu_mul_q80_par, _silu_mul_q80_ser, _silu_mul_q80_split, _silu_mul_rows
from .matmul_rows import (_ACC, _rbuffers, _rows_q4_generic, _rows_q4_par, _rows_q4_serial, _rows_q8_generic,
                          _rows_q8_par, _rows_q8_serial)
from .matmul_vnni import (VNNI_TAGS, _ACCV, _rows_q4_par_vnni, _rows_q4_serial_vnni, _rows_q8_par_vnni,
                          _rows_q8_serial_vnni)
from .matmul_f16 import _f16_rows_par, _f16_rows_serial
from .moe import _route
from .matmul_slab import _S16, _q40_par_avx2, _q40_par_generic, _q40_serial_avx2, _q40_serial_generic, _xbuffers
from .norm import _rmsnorm_heads, _rmsnorm_par, _rmsnorm_q80_par, _rmsnorm_q80_ser, _rmsnorm_rows
from .q80 import _quantize_q80_act, _quantize_q80_act_f16c

__all__ = [
    "HAS_AVX2", "HAS_VNNI", "KERNELS", "PREFETCH_ROWS",
    "attention", "attention_block", "attention_scratch", "bind_attention_block", "bind_ffn", "bind_matmul",
    "bind_layers", "bind_norm_matmul", "bind_rmsnorm_q80", "bind_silu_mul_q80", "choose_threading_layer", "get_num_threads", "matmul_f16", "matmul_f32",
    "max_threads", "needed", "route", "warmup_is_cached",
    "matmul_q80_q40", "matmul_q80_q41", "matmul_q80_q80", "quantize_q80_act", "rmsnorm", "rmsnorm_heads",
    "rmsnorm_q80", "rope_interleaved", "set_num_threads", "silu_mul", "silu_mul_q80", "warmup",
]


# ---------------------------------------------------------------- warmup: compile what a run needs

# What a run can need, by name (see `needed`):
#   q80act     activations quantised to Q80 (matmul inputs, the Q80 wire)      every run
#   attention  rope + KV-cache store + attention (+ its Q80), long prompts      every run
#   kv_f16     the same on an f16 KV cache                                      --kv-cache-float-type f16
#   fused      rmsnorm and silu·mul with their Q80 in one pass                  4-bit weights
#   silu_split one-row silu·mul·Q80 split over the threads                      wide FFN, > 1 thread
#   f32        rmsnorm and silu·mul on f32 activations                          f32 weights or output
#   f16        F16 weights widened as read (f32 activations)                    f16 weights
#   qk_norm    per-head RMSNorm of q and k                                      Qwen3
#   moe        the router's top-k choice                                        experts
#   q4rows     Q80 x Q4_0/Q4_1 on the row-tile layout                           q41, q40
#   q4tokens   rmsnorm -> q4 matmul, and the FFN, fused by token groups         q4rows on a SIMD path
#   q4layer    every layer in one parallel region (one rank)                    q4tokens, plain layers
#   q40slab    Q80 x Q4_0 on the slab layout                                    q40 > ROW_TILE_MAX_COLS cols
#   q8rows     Q80 x Q8_0 (the 8-bit output matrix)                             q80 output
#   tests      the stand-alone rope and attention (tests and benchmarks only)
ALL_NEEDS = ("q80act", "attention", "kv_f16", "fused", "silu_split", "f32", "f16", "qk_norm", "moe", "q4rows",
             "q4tokens", "q4layer", "q40slab", "q8rows", "tests")


def needed(matrices, ffn_width: int, nthreads: int, qk_norm: bool = False,
           experts: bool = False, whole_layers: bool = False) -> set[str]:
    """The kernels (ALL_NEEDS names) a run uses. matrices: (runtime type, columns) of every
    weight matrix of this rank ("q40", "q41", "q80" or "f32"); ffn_width: its FFN hidden
    units; nthreads: its threads; whole_layers: one rank with plain Llama layers (no biases,
    per-head norms or experts), whose layers can run in one parallel region each."""
    needs = {"q80act", "attention"}
    types = {t for t, _ in matrices}
    if types & {"q40", "q41"}:
        needs.add("fused")
        if ffn_width >= _SPLIT_MIN and nthreads > 1:
            needs.add("silu_split")
    if types & {"f32", "f16"}:
        needs.add("f32")
    if "f16" in types:
        needs.add("f16")
    if qk_norm:
        needs.add("qk_norm")
    if experts:
        needs.add("moe")
    if "q41" in types or any(t == "q40" and cols <= ROW_TILE_MAX_COLS for t, cols in matrices):
        needs.add("q4rows")
        if HAS_AVX2:                     # (every path but the portable one)
            needs.add("q4tokens")
            if whole_layers:
                needs.add("q4layer")
    if any(t == "q40" and cols > ROW_TILE_MAX_COLS for t, cols in matrices):
        needs.add("q40slab")
    if "q80" in types:
        needs.add("q8rows")
    return needs


_WARMED: set[str] = set()      # needs this process has run the warmup steps of


def _steps(needs, skip_warmed: bool = True) -> list[tuple[str, float, list, object]]:
    """(name, rough seconds to compile on one core, the numba dispatchers it compiles, the
    call) for each step of the warmup of `needs` not run yet in this process, in order. The seconds were measured on a
    shared 2-core Zen 3 (numba 0.68): only for the estimate printed before a first run."""
    rng = np.random.default_rng(0)
    T, n, rows = 2, 64, 40
    x = rng.standard_normal((T, n)).astype(np.float32)
    xq = np.empty((T, n), np.int8)
    xd = np.empty((T, n // QK), np.float32)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    ones = np.ones(n, np.float32)
    ones_ro = np.ones(n, np.float32)
    ones_ro.flags.writeable = False     # the model's norm weights are read-only views: numba
    steps = []                          # compiles those separately

    def step(need, name, seconds, dispatchers):
        def add(fn):
            if need in needs and not (skip_warmed and need in _WARMED):
                steps.append((name, seconds, dispatchers, _marking(need, fn)))
            return fn
        return add

    @step("q80act", "q80 activations", 1.0, [_quantize_q80_act_f16c, _quantize_q80_act])
    def _():
        quantize_q80_act(xq, xd, x)

    @step("q4rows", "q4 matmul (row tiles)", 6.0, [_rows_q4_serial, _rows_q4_par, _rows_q4_generic,
                                                   _rows_q4_serial_vnni, _rows_q4_par_vnni])
    def _():
        w41 = Q41Matrix.from_blocks(quantize_q41(f32(rows, n)))
        wr = Q40Matrix.from_blocks(quantize_q40(f32(rows, n)), layout="rows")
        for T_ in (1, 9):
            o = np.empty((T_, rows), np.float32)
            xq_, xd_ = np.zeros((T_, n), np.int8), np.ones((T_, n // QK), np.float32)
            matmul_q80_q41(o, xq_, xd_, w41)
            matmul_q80_q40(o, xq_, xd_, wr)
            xi, xf = _rbuffers(T_, n // QK)
            if HAS_VNNI:                     # (the VNNI kernels only where the CPU has them)
                _rows_q4_par_vnni(VNNI_TAGS[KERNELS], o, xq_, xd_, xi, xf, w41.buf, rows, n // QK, w41.stride, 1, _ACCV)
            elif HAS_AVX2:
                _rows_q4_par(o, xq_, xd_, xi, xf, w41.buf, rows, n // QK, w41.stride, 1, _ACC)

    @step("q4tokens", "rmsnorm + q4 matmul, the FFN (fused)", 12.0, [_norm_matmul_fused, _ffn_fused])
    def _():
        T_, ffn = 8 * get_num_threads(), 2 * n       # rows enough for every thread's token group
        w13 = Q41Matrix.from_blocks(quantize_q41(f32(2 * ffn, n)))
        w2 = Q41Matrix.from_blocks(quantize_q41(f32(n, ffn)))
        x_ = f32(T_, n)

        def acts(width):
            return (np.empty((T_, width), np.float32), np.empty((T_, width), np.int8),
                    np.empty((T_, width // QK), np.float32))
        for w in (ones, ones_ro):
            for call in (bind_norm_matmul(np.empty((T_, 2 * ffn), np.float32), *acts(n), x_, w, 1e-5, w13),
                         bind_ffn(np.empty((T_, n), np.float32), np.empty((T_, 2 * ffn), np.float32),
                                  *acts(ffn), *acts(n), x_, w, 1e-5, w13, w2)):
                if call is not None:                 # (None on the portable path)
                    call()

    def whole_layer(cache_dtype, T_, by):
        """A model of one layer of 2 query heads, 1 KV head of 32, T_ tokens (distinct slots),
        run `by` token groups or row bands."""
        hd, ffn = 32, 2 * n
        x_ = f32(T_, n)
        w = {name: Q41Matrix.from_blocks(quantize_q41(f32(r, c)))
             for name, r, c in (("wqkv", 4 * hd, n), ("wo", n, 2 * hd), ("w13", 2 * ffn, n), ("w2", n, ffn))}
        cache = np.zeros((T_, 4, 1, hd), cache_dtype)

        def acts(width):
            return (np.empty((T_, width), np.float32), np.empty((T_, width), np.int8),
                    np.empty((T_, width // QK), np.float32))
        layer = (ones, ones, w["wqkv"], w["wo"], w["w13"], w["w2"], cache, cache.copy())
        call = bind_layers(x_, 1e-5, *acts(n), np.empty((T_, 4 * hd), np.float32), *acts(2 * hd),
                           np.empty((T_, n), np.float32), np.empty((T_, 2 * ffn), np.float32), *acts(ffn),
                           np.empty((T_, n), np.float32), [layer], np.zeros(T_, np.int32),
                           np.arange(T_, dtype=np.int32), np.ones((4, hd // 2), np.float32),
                           np.zeros((4, hd // 2), np.float32), np.zeros(2, np.int32), 0.25, by=by)
        if call is not None:                     # (None on the portable path)
            call()

    @step("q4layer", "every layer in one region (fused)", 12.0, [_layers_fused, _layers_banded])
    def _():
        for T_, by in ((8 * get_num_threads(), "groups"), (1, "bands")):
            whole_layer(np.float32, T_, by)
            if "kv_f16" in needs:
                whole_layer(np.float16, T_, by)

    @step("q40slab", "q40 matmul (slabs)", 29.0, [_q40_serial_avx2, _q40_par_avx2,
                                                  _q40_serial_generic, _q40_par_generic])
    def _():
        w = Q40Matrix.from_blocks(quantize_q40(f32(rows, n)), layout="slab")
        out = np.empty((T, rows), np.float32)
        matmul_q80_q40(out, xq, xd, w)
        matmul_q80_q40(out[:1].copy(), xq[:1].copy(), xd[:1].copy(), w)
        for fn in ((_q40_serial_avx2, _q40_par_avx2) if HAS_AVX2 else (_q40_serial_generic, _q40_par_generic)):
            xl, xh, xi = _xbuffers(T, w.nslab)
            fn(out, xq, xd, w.qs, w.d.view(np.uint16), w.rows, w.nb, w.nslab, xl, xh, xi, _S16)

    @step("q8rows", "q8 matmul (output matrix)", 4.0, [_rows_q8_serial, _rows_q8_par, _rows_q8_generic,
                                                       _rows_q8_serial_vnni, _rows_q8_par_vnni])
    def _():
        w80 = Q80Matrix.from_f32(f32(rows, n))
        for T_ in (1, 9):
            o = np.empty((T_, rows), np.float32)
            xq_, xd_ = np.zeros((T_, n), np.int8), np.ones((T_, n // QK), np.float32)
            matmul_q80_q80(o, xq_, xd_, w80)
            xi, xf = _rbuffers(T_, n // QK)
            if HAS_VNNI:
                _rows_q8_par_vnni(o, xq_, xd_, xi, xf, w80.buf, rows, n // QK, w80.stride, _ACCV)
            elif HAS_AVX2:
                _rows_q8_par(o, xq_, xd_, xi, xf, w80.buf, rows, n // QK, w80.stride, _ACC)

    @step("fused", "rmsnorm + q80", 2.0, [_rmsnorm_q80_ser, _rmsnorm_q80_par])
    def _():
        y = np.empty_like(x)
        for w in (ones, ones_ro):
            rmsnorm_q80(y, xq, xd, x, w, 1e-5)
            _rmsnorm_q80_par(y, xq, xd, x, w, 1e-5, T, n, HAS_AVX2)

    @step("fused", "silu·mul + q80", 2.0, [_silu_mul_q80_ser, _silu_mul_q80_par])
    def _():
        y, gu = np.empty_like(x), np.concatenate([x, x], axis=1)
        silu_mul_q80(y, xq, xd, gu)
        _silu_mul_q80_par(y, xq, xd, gu, T, n, HAS_AVX2)

    @step("silu_split", "silu·mul + q80 (split)", 3.5, [_silu_mul_q80_split])
    def _():
        y, gu = np.empty((1, n), np.float32), np.concatenate([x[:1], x[:1]], axis=1)
        _silu_mul_q80_split(y, xq[:1].copy(), xd[:1].copy(), gu, n, HAS_AVX2, 2)

    @step("f32", "rmsnorm", 1.6, [_rmsnorm_rows, _rmsnorm_par])
    def _():
        y = np.empty_like(x)
        for w in (ones, ones_ro):
            rmsnorm(y, x, w, 1e-5)
            _rmsnorm_par(y, x, w, 1e-5, T, n)

    @step("f32", "silu·mul", 1.6, [_silu_mul_rows, _silu_mul_par])
    def _():
        y, gu = np.empty_like(x), np.concatenate([x, x], axis=1)
        silu_mul(y, gu)
        _silu_mul_par(y, gu, T, n)

    @step("f16", "f16 matmul", 2.0, [_f16_rows_serial, _f16_rows_par])
    def _():
        w16 = f32(rows, n).astype(np.float16)
        for T_ in (1, 5):
            o = np.empty((T_, rows), np.float32)
            for fn in (_f16_rows_serial, _f16_rows_par):
                fn(o, x[:1].repeat(T_, 0), w16.view(np.uint16), rows, n, T_)

    @step("qk_norm", "per-head rmsnorm", 0.5, [_rmsnorm_heads])
    def _():
        for w in (ones, ones_ro):
            rmsnorm_heads(x.copy(), 16, 2, w[:16], 1e-6)

    @step("moe", "expert routing", 0.5, [_route])
    def _():
        router = f32(4, n)
        router_ro = router.copy()
        router_ro.flags.writeable = False   # a router read from the file may be read-only
        for r in (router, router_ro):
            route(x, r, 2, True)

    def attention_calls(cache_dtype):
        """The attention block's kernels on a cache of this element type (f32, or f16 whose
        raw kernels take its uint16 bits)."""
        kc4 = np.stack([f32(4, 2, 16)] * 2).astype(cache_dtype)
        kb = kc4.view(np.uint16) if cache_dtype == np.float16 else kc4
        pos, slots = np.arange(T, dtype=np.int32), np.array([1, 0], np.int32)
        cos, sin = np.ones((4, 8), np.float32), np.zeros((4, 8), np.float32)
        kvq = np.array([0, 0, 1, 1], np.int32)
        o, sc = np.empty_like(x), np.empty((T * 4, 4), np.float32)   # rows for 2 rows of 4 heads at once
        qkv = np.concatenate([x, x[:, :64]], axis=1)
        oq, od = np.empty((T, n), np.int8), np.empty((T, n // QK), np.float32)
        attention_block(o, qkv, kc4, kc4.copy(), pos, slots, cos, sin, kvq, 0.25, (oq, od))
        attention_block(o, qkv, kc4, kc4.copy(), pos, None, cos, sin, kvq, 0.25)
        quant = 2 if HAS_AVX2 else 1
        _attention_rows_par(o, oq, od, quant, qkv, kb, kb.copy(), pos, slots, kvq, np.float32(0.25),
                            sc, T, 4, 16, 2)
        _attention_long_par(o[:1], oq[:1], od[:1], quant, qkv[:1], kb, kb.copy(), pos[:1], slots[:1], kvq,
                            np.float32(0.25), sc, 4, 16)
        _attention_block_par(o, oq, od, quant, qkv, 4, 2, kb, kb.copy(), pos, slots, cos, sin, kvq,
                             np.float32(0.25), sc, T, 16, 2)
        _rope_store(qkv, 4, 2, kb, kb.copy(), pos, slots, cos, sin, 16, T)
        _ranges(pos, slots, T)
        return o, x, kc4, pos, kvq, sc

    @step("attention", "attention block", 6.0, [_attention_block_ser, _rope_store, _attention_rows_par,
                                                _attention_long_par, _attention_block_par, _ranges])
    def _():
        attention_calls(np.float32)

    @step("kv_f16", "attention block (f16 KV cache)", 6.0, [_attention_block_ser, _rope_store,
                                                            _attention_ser, _attention_rows_par,
                                                            _attention_long_par, _attention_block_par])
    def _():
        o, x_, kc4, pos, kvq, sc = attention_calls(np.float16)
        attention(o, x_, kc4[0], kc4[0], pos, kvq, 0.25, sc)

    @step("tests", "rope and attention (tests)", 4.0, [_rope_rows, _rope_par, _attention_ser])
    def _():
        pos = np.arange(T, dtype=np.int32)
        cos, sin = np.ones((4, 8), np.float32), np.zeros((4, 8), np.float32)
        y = x.copy()
        rope_interleaved(y, pos, cos, sin, 16)
        _rope_par(y, pos, cos, sin, 16, n // 16, T)
        kc = f32(4, 2, 16)
        attention(np.empty_like(x), x, kc, kc, pos, np.array([0, 0, 1, 1], np.int32), 0.25,
                  attention_scratch(T, 4, 4))
    return steps


def _marking(need: str, fn):
    def run():
        fn()
        _WARMED.add(need)
    return run


def _cached(dispatcher) -> bool:
    """Whether numba's cache holds code of this kernel for this machine (a hint for the
    message before compiling: private numba API, so any surprise counts as cached)."""
    try:
        index = dispatcher._cache._cache_file._load_index()
        magic = dispatcher.targetctx.codegen().magic_tuple()
        return any(key[1] == magic for key in index)
    except Exception:
        return True


def warmup_is_cached(needs=None) -> tuple[bool, float]:
    """(every kernel of `needs` is in numba's cache, rough seconds to compile the others)."""
    missing = [s for s in _steps(ALL_NEEDS if needs is None else needs)
               if not all(_cached(d) for d in s[2] if _wanted(d))]
    return not missing, sum(s[1] for s in missing)


def _wanted(dispatcher) -> bool:
    """The kernels of this machine's path (simd.KERNELS) only: the VNNI row-tile kernels replace
    the AVX2 ones on a VNNI host (the slab kernel stays AVX2), the portable twins run without
    AVX2, the fused stretches with either's tiles."""
    generic = dispatcher in (_rows_q4_generic, _rows_q8_generic, _q40_serial_generic, _q40_par_generic)
    vnni = dispatcher in (_rows_q4_serial_vnni, _rows_q4_par_vnni, _rows_q8_serial_vnni, _rows_q8_par_vnni)
    avx2_rows = dispatcher in (_rows_q4_serial, _rows_q4_par, _rows_q8_serial, _rows_q8_par)
    fused = dispatcher in (_norm_matmul_fused, _ffn_fused, _layers_fused, _layers_banded)    # (VNNI or avx2 tiles)
    avx2 = avx2_rows or fused or dispatcher in (_q40_serial_avx2, _q40_par_avx2)
    if vnni:
        return HAS_VNNI
    if avx2_rows and HAS_VNNI:
        return False
    return not (generic and HAS_AVX2 or avx2 and not HAS_AVX2)


def warmup(needs=None, progress=None) -> None:
    """Call the kernels of `needs` (names of ALL_NEEDS; None: all of them) once on tiny inputs,
    so that compilation (or loading from numba's cache) happens up front. progress(done,
    total, name) is called before each step and once at the end."""
    steps = _steps(ALL_NEEDS if needs is None else needs)
    for i, (name, _, _, fn) in enumerate(steps):
        if progress is not None:
            progress(i, len(steps), name)
        fn()
    if progress is not None:
        progress(len(steps), len(steps), "")

"""Numba kernels: every hot loop of the forward pass, output array first.

Each public function is a thin wrapper that checks dtypes, shapes and contiguity (raising
``ValueError`` with a clear message) and then calls a private ``@njit`` body that trusts its
inputs and allocates nothing.  The ``bind_*`` forms check once and return the bound call.

Conventions: activations are ``float32 [T, n]`` (T tokens), weights ``[rows, cols]`` = ``[out, in]``.

Modules, bottom up: ``_jit`` (numba flags, threads), ``simd`` (llvmlite intrinsics), ``q80``
(activation quantisation), ``matmul_slab`` / ``matmul_rows`` (Q80 x Q4/Q41/Q80 kernels) and
``matmul`` (their dispatch), ``norm``, ``attention`` (rope, attention), ``ffn`` (SwiGLU).
This package re-exports the public names and adds ``warmup``.
"""
from __future__ import annotations

import numpy as np

from ..quant import QK, Q40Matrix, Q41Matrix, Q80Matrix, quantize_q41
from ._jit import choose_threading_layer, get_num_threads, max_threads, set_num_threads
from .attention import attention, attention_block, attention_scratch, bind_attention_block, rope_interleaved
from .ffn import bind_silu_mul_q80, silu_mul, silu_mul_q80
from .matmul import bind_matmul, matmul_f32, matmul_q80_q40, matmul_q80_q41, matmul_q80_q80
from .matmul_slab import PREFETCH_ROWS
from .norm import bind_rmsnorm_q80, rmsnorm, rmsnorm_heads, rmsnorm_q80
from .q80 import quantize_q80_act
from .simd import HAS_AVX2

# the private kernels warmup() compiles as well (parallel twins, the other ISA path)
from .attention import _attention_par, _rope_par, _rope_store
from .ffn import _silu_mul_par, _silu_mul_q80_split
from .matmul_rows import _ACC, _rbuffers, _rows_q4_par, _rows_q8_par
from .matmul_slab import _S16, _q40_par_avx2, _q40_par_generic, _q40_serial_avx2, _q40_serial_generic, _xbuffers
from .norm import _rmsnorm_par

__all__ = [
    "HAS_AVX2", "PREFETCH_ROWS",
    "attention", "attention_block", "attention_scratch", "bind_attention_block", "bind_matmul",
    "bind_rmsnorm_q80", "bind_silu_mul_q80", "choose_threading_layer", "get_num_threads", "matmul_f32", "max_threads",
    "matmul_q80_q40", "matmul_q80_q41", "matmul_q80_q80", "quantize_q80_act", "rmsnorm", "rmsnorm_heads",
    "rmsnorm_q80", "rope_interleaved", "set_num_threads", "silu_mul", "silu_mul_q80", "warmup",
]


def warmup(kv_float_type: str = "f32") -> None:
    """Call every kernel once on tiny inputs so compilation (or cache loading) happens up front
    (attention for an f16 KV cache too when `kv_float_type` is "f16")."""
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
    wr = Q40Matrix.from_f32(rng.standard_normal((rows, n)).astype(np.float32))        # row-tile layout
    w41 = Q41Matrix.from_blocks(quantize_q41(rng.standard_normal((rows, n)).astype(np.float32)))
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
    if kv_float_type == "f16":
        h4 = kc4.astype(np.float16)
        attention_block(o, qkv, h4, h4.copy(), pos, slots, cos, sin, kvq, 0.25, (oq, od))
        attention_block(o, qkv, h4, h4.copy(), pos, None, cos, sin, kvq, 0.25)
        hb = h4.view(np.uint16)
        _attention_par(o, x, hb, hb, pos, slots, kvq, np.float32(0.25), sc, T, 4, 16, 0, T * 4)
        _rope_store(qkv, 4, 2, hb, hb.copy(), pos, slots, cos, sin, 16, T)
        attention(o, x, kc.astype(np.float16), kc.astype(np.float16), pos, kvq, 0.25, sc)
    _rope_store(qkv, 4, 2, kc4, kc4.copy(), pos, slots, cos, sin, 16, T)
    rmsnorm_heads(x, 16, 2, np.ones(16, np.float32), 1e-6)
    gu = np.concatenate([x, x], axis=1)
    silu_mul(y, gu)
    _silu_mul_par(y, gu, T, n)
    rmsnorm_q80(y, xq, xd, x, np.ones(n, np.float32), 1e-5)
    silu_mul_q80(y, xq, xd, gu)
    _silu_mul_q80_split(y[:1].copy(), xq[:1].copy(), xd[:1].copy(), gu[:1].copy(), n, HAS_AVX2, 2)

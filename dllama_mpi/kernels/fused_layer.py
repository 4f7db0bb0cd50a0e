"""Every decoder layer in one parallel region, on one rank whose token groups are independent.

On one rank nothing is summed between a layer's steps (no other rank's partial sums), and in
a step where every token's sequence lies in one thread's token group (the sequences decoding
together each have one row; any step on one thread), each thread can take its tokens
through the whole layer with no barrier: RMSNorm, q|k|v, rope and the KV-cache store, attention
(every row reads only its own sequence's K and V rows, which its own thread wrote), wo and the
residual add, then the FFN stretch of ``fused_tokens`` and the second residual add -- and on
through every layer: one parallel region a forward pass instead of four a layer, and no Python
between them.

The steps are the unfused kernels' own helpers on each thread's rows (the row-tile matmul, the
fused norm and silu·mul with their Q80, ``attention``'s row and its rope and store), so the
results are the same bits as the layers run step by step. Row-tile Q4 weights on the SIMD
paths (vnni512, avxvnni, avx2), as ``fused_tokens``; ``bind_layers`` returns None where the layers cannot run so,
and a step of fewer than 8 rows a thread runs by ``layer_bands`` (the threads splitting each step,
meeting at barriers). The call returns False for a step it cannot run (one of 8 rows a thread or
more whose sequences cross token groups): then the caller runs the steps."""
from __future__ import annotations

import numpy as np
from numba import prange
from numba.typed import List

from ..quant import QK
from . import _jit
from ._checks import _F32, _I32
from ._jit import _inline, _parallel, _serial
from .attention import _KV_DTYPES, _attend_row, _check_ranges, _kv_bits, _kv_ok, _quantize_row, _rope_store_row
from .attention import _scratch, scratch_rows
from .barrier import barrier_state, reset_state
from .fused_tokens import (_PATH_TAGS, _TOKENS_MIN, _fusable, _matmul_rows, _norm_q80_rows, _q80_rows_ok,
                           _silu_q80_rows, _span)
from .layer_bands import _layers_banded
from .matmul import q4_row_tiles
from .matmul_rows import _rbuffers
from .simd import KERNELS

# steps run by the steps' own regions once row bands' threads gave their cores away to another
# process at barriers (a busy node; see call()): SmolLM2, 2 threads beside a busy process, 82-84
# tok/s by row bands every step against 92-96 by the steps
_BUSY_STEPS = 64


@_inline
def _tiles(tag, out, xq, xd, w, t0, t1, acc):
    """Rows t0..t1-1 of out = (xq, xd) · w^T, w = (buffer, rows, blocks, record bytes, has
    offsets, xi, xf): a matrix's row tiles and its activation-sum buffers."""
    buf, rows, nb, sb, hasm, xi, xf = w
    _matmul_rows(tag, out, xq, xd, xi, xf, buf, rows, nb, sb, hasm, t0, t1, acc)


@_inline
def _add_rows(x, y, t0, t1):
    for t in range(t0, t1):
        for i in range(x.shape[1]):
            x[t, i] += y[t, i]


@_inline
def _layer_rows(tag, x, eps, acts, layer, attn, t0, t1, acc, c):
    """Rows t0..t1-1 of x through one layer (the model's forward, step by step, on these rows).
    acts: the activation buffers; attn: attention's arguments (a call of more than 30
    arguments is one of *args in Python's bytecode, which numba cannot inline)."""
    xb, xbq, xbd, qkv, att, attq, attd, attn_out, h13, h, hq, hs, ffn_out = acts
    positions, slots, cos, sin, kv_of_q, scale, scratch, nq, nkv, hd = attn
    attn_norm, ffn_norm, wqkv, wo, w13, w2, k_cache, v_cache = layer
    # attention: x += wo · attention(rope(q), rope(k), v), [q k v] = wqkv · rmsnorm(x)
    _norm_q80_rows(xb, xbq, xbd, x, attn_norm, eps, t0, t1)
    _tiles(tag, qkv, xbq, xbd, wqkv, t0, t1, acc)
    for t in range(t0, t1):                     # every row's k and v stored before any attends
        _rope_store_row(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, t)
    for t in range(t0, t1):
        _attend_row(att, qkv, k_cache, v_cache, t, slots[t], positions[t] + 1, hd, kv_of_q, 0, nq, scale,
                    scratch, c * nq)
        _quantize_row(attq, attd, att, t, 2, nq * hd // QK)
    _tiles(tag, attn_out, attq, attd, wo, t0, t1, acc)
    _add_rows(x, attn_out, t0, t1)
    # feed-forward: x += w2 · (silu(w1 · xb) * w3 · xb), xb = rmsnorm(x)
    _norm_q80_rows(xb, xbq, xbd, x, ffn_norm, eps, t0, t1)
    _tiles(tag, h13, xbq, xbd, w13, t0, t1, acc)
    _silu_q80_rows(h, hq, hs, h13, t0, t1)
    _tiles(tag, ffn_out, hq, hs, w2, t0, t1, acc)
    _add_rows(x, ffn_out, t0, t1)


@_parallel
def _layers_fused(tag, x, eps, acts, layers, attn, acc, nch):
    """Every layer, each thread its token group (_span) through all of them: one parallel
    region a forward pass."""
    for c in prange(nch):
        t0, t1 = _span(x.shape[0], nch, c)
        for i in range(len(layers)):
            _layer_rows(tag, x, eps, acts, layers[i], attn, t0, t1, acc[c], c)


@_serial
def _groups_apart(slots, T, nch, n_slots):
    """No cache slot has rows in two of the nch token groups (_span): each group's rows then
    attend only to K and V rows that its own thread stores."""
    group = np.full(n_slots, -1, np.int32)
    for c in range(nch):
        t0, t1 = _span(T, nch, c)
        for t in range(t0, t1):
            s = slots[t]
            if group[s] != -1 and group[s] != c:
                return False
            group[s] = c
    return True


def _f32_rows(T: int, *arrays) -> bool:
    return all(a.dtype == _F32 and a.ndim == 2 and a.shape[0] == T and a.flags.c_contiguous and a.flags.writeable
               for a in arrays)


def _layer_ok(layer, dim: int, nq: int, nkv: int, hd: int, cache_shape, T: int, path: str) -> bool:
    attn_norm, ffn_norm, wqkv, wo, w13, w2, k_cache, v_cache = layer
    return (_fusable(T, path, wqkv, wo, w13, w2, tokens_min=0)
            and wqkv.cols == dim and wqkv.rows == (nq + 2 * nkv) * hd and wo.cols == nq * hd and wo.rows == dim
            and w13.cols == dim and w13.rows % 2 == 0 and w2.cols == w13.rows // 2 and w2.rows == dim
            and all(w.shape == (dim,) and w.dtype == _F32 for w in (attn_norm, ffn_norm))
            and k_cache.dtype in _KV_DTYPES and v_cache.dtype == k_cache.dtype
            and k_cache.shape == v_cache.shape == cache_shape
            and all(c.flags.c_contiguous and c.flags.writeable for c in (k_cache, v_cache)))


def bind_layers(x, eps: float, xb, xbq, xbd, qkv, att, attq, attd, attn_out, h13, h, hq, hs, ffn_out, layers,
                positions, slots, cos, sin, kv_of_q, scale: float, path: str = KERNELS, by: str = ""):
    """Every Llama layer on one rank, x [T, dim] updated in place, in one parallel region: the
    call (no arguments; True when it ran, False when it could not and the caller must run the
    layers step by step), or None where they cannot run so. Each thread takes its token group
    through every layer where the step's sequences keep to token groups of at least 8 rows
    (any rows on one thread); with fewer rows a thread, the threads split each step
    (``layer_bands``).
    layers: per layer (attn_norm, ffn_norm, wqkv, wo, w13, w2, k_cache, v_cache). The other
    arrays are the activations (the model's buffers: xb, qkv, att, attn_out, h13, h, ffn_out
    and the Q80 of xb, att, h) and attention's arguments as ``bind_attention_block``'s
    (positions and slots read, and checked, at every call). Checked here once. by: "groups" or
    "bands" runs only that way (tests and the warmup; "bands" on one thread too)."""
    T, dim = x.shape
    if not layers:
        return None
    cache_shape = layers[0][6].shape
    n_slots, S, nkv, hd = cache_shape
    nq = att.shape[1] // hd if hd else 0
    nch = _jit._NUM_THREADS
    if not (nq and hd % 2 == 0 and nq * hd == att.shape[1]
            and all(_layer_ok(layer, dim, nq, nkv, hd, cache_shape, T, path) for layer in layers)
            and _f32_rows(T, x, qkv, attn_out, h13, ffn_out)
            and (x.shape, qkv.shape, attn_out.shape, h13.shape, ffn_out.shape)
            == ((T, dim), (T, layers[0][2].rows), (T, dim), (T, layers[0][4].rows), (T, dim))
            and _q80_rows_ok(xb, xbq, xbd, dim, T) and _q80_rows_ok(att, attq, attd, nq * hd, T)
            and _q80_rows_ok(h, hq, hs, layers[0][5].cols, T)
            and positions.dtype == _I32 and slots.dtype == _I32 and positions.shape == slots.shape == (T,)
            and kv_of_q.dtype == _I32 and kv_of_q.shape == (nq,) and _kv_ok(kv_of_q, nkv)
            and cos.dtype == sin.dtype == _F32 and cos.shape == sin.shape and cos.shape[1] * 2 == hd
            and cos.shape[0] >= S and cos.flags.c_contiguous and sin.flags.c_contiguous):
        return None
    by_groups = (by != "bands" and T >= (1 if nch == 1 else _TOKENS_MIN) * nch
                 and scratch_rows(T, nq) >= nch * nq)
    # by row bands where a thread has fewer than 8 rows (a prompt across token groups runs
    # faster by the steps' token-group matmuls: 95-111 against 132-139 ms for 128 SmolLM2 rows)
    by_bands = (by == "bands" or by != "groups" and 1 < nch and T < _TOKENS_MIN * nch) and hd % QK == 0
    if not (by_groups or by_bands):
        return None

    def tiles(w, sums=None):
        return (*q4_row_tiles(w), *(sums or _rbuffers(T, w.cols // QK)))
    # w2's activation sums apart: by row bands a thread prepares its blocks of them while another
    # may still read w13's, the same shared buffers when the FFN is as wide as the model
    nb2 = layers[0][5].cols // QK
    w2_sums = (np.empty((T, nb2), np.int16), np.empty((T, nb2, 4), np.float32))
    def writeable(norm):   # one numba type whether a norm is a read-only view of the file or
        return norm if norm.flags.writeable else norm.copy()   # not (each a kernel compiled apart)
    kernel_layers = List()
    for attn_norm, ffn_norm, wqkv, wo, w13, w2, k_cache, v_cache in layers:
        kernel_layers.append((writeable(attn_norm), writeable(ffn_norm), tiles(wqkv), tiles(wo), tiles(w13),
                              tiles(w2, w2_sums), _kv_bits(k_cache), _kv_bits(v_cache)))
    tag, acc = _PATH_TAGS[path]
    acts = (xb, xbq, xbd, qkv, att, attq, attd, attn_out, h13, h, hq, hs, ffn_out)
    eps, scale = np.float32(eps), np.float32(scale)

    state, ran = barrier_state(), np.zeros((nch, 2), np.int64)
    bands_failed = False    # the threads did not all run at once (barrier._rendezvous): not again
    skip_steps = busy = 0   # steps left to run another way (a busy node); the busy score

    def call() -> bool:
        nonlocal bands_failed, skip_steps, busy
        pmax = _check_ranges(positions, slots, T, S, n_slots)
        attn = (positions, slots, cos, sin, kv_of_q, scale, _scratch(None, T, nq, S, pmax), nq, nkv, hd)
        if by_groups and _groups_apart(slots, T, nch, n_slots):
            _layers_fused(tag, x, eps, acts, kernel_layers, attn, acc, nch)
            return True
        if not by_bands or bands_failed:
            return False
        if skip_steps:
            skip_steps -= 1
            return False
        reset_state(state)
        _layers_banded(tag, x, eps, acts, kernel_layers, attn, acc, nch, state, ran)
        if not ran[:, 0].all():
            bands_failed = True
            return False
        # a thread gave its core away to another process at a barrier (no call of 400 on a
        # quiet node, 12% beside a busy process): +16 to a score, -1 for a call without;
        # at 32 (two such calls close together) the steps' regions, whose threads sleep when
        # they wait, run the next _BUSY_STEPS steps
        busy = busy + 16 if ran[:, 1].any() else max(0, busy - 1)
        if busy >= 32:
            skip_steps, busy = _BUSY_STEPS, 0
        return True

    return call

"""Rope and causal GQA attention over a KV cache; ``attention_block`` fuses a layer's rope, KV
store, attention and (optionally) the Q80 quantisation of the result.

The KV cache is float32 or float16 (``--kv-cache-float-type f16``): the wrappers pass an f16
cache to the kernels as its uint16 bit patterns, and the kernel bodies read and write cache
elements through ``_kv_load`` / ``_kv_value`` (simd.py), so one body serves both types (f32:
the same code as before; f16: values rounded to nearest-even when stored, widened when read)."""
from __future__ import annotations

import numpy as np
from numba import prange

from ..quant import QK
from . import _jit
from ._checks import _F32, _I32, _check, _check_out, _noop
from ._jit import _PAR_MIN_ROWS_WORK, _PAR_MIN_WORK, _inline, _parallel, _serial
from .q80 import _q80_outputs_ok, _quantize_q80_act, _quantize_q80_act_f16c, quantize_q80_act
from .simd import HAS_AVX2, _exp_neg, _kv_load, _kv_value

_F16 = np.dtype(np.float16)
_KV_DTYPES = (_F32, _F16)

# ---------------------------------------------------------------- rope (interleaved pairs)

@_inline
def _rotate(src, so, dst, do, cos, sin, p, half):
    """dst[do + 2i, do + 2i + 1] = the pair src[so + 2i, so + 2i + 1] rotated by angle row p."""
    for i in range(half):
        c = cos[p, i]
        s = sin[p, i]
        a = src[so + 2 * i]
        b = src[so + 2 * i + 1]
        dst[do + 2 * i] = _kv_value(a * c - b * s, dst)
        dst[do + 2 * i + 1] = _kv_value(a * s + b * c, dst)


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
            s0 += qv[i] * _kv_load(k0[i])
            s1 += qv[i] * _kv_load(k1[i])
            s2 += qv[i] * _kv_load(k2[i])
            s3 += qv[i] * _kv_load(k3[i])
        sc[j], sc[j + 1], sc[j + 2], sc[j + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        m = max(m, max(max(sc[j], sc[j + 1]), max(sc[j + 2], sc[j + 3])))
    for j in range(j4, npos):
        kr = k_cache[j, kvh]
        s = np.float32(0.0)
        for i in range(hd):
            s += qv[i] * _kv_load(kr[i])
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
            acc[i] += ((p0 * _kv_load(v0[i]) + p1 * _kv_load(v1[i]))
                       + (p2 * _kv_load(v2[i]) + p3 * _kv_load(v3[i])))
    for j in range(j4, npos):
        p = sc[j] * inv
        vr = v_cache[j, kvh]
        for i in range(hd):
            acc[i] += p * _kv_load(vr[i])


@_parallel
def _attention_par(out, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq, hd, p0, p1):
    for p in prange(p0, p1):
        t = p // nq
        h = p - t * nq
        _attend_one(out, q, k_cache[slots[t]], v_cache[slots[t]], t, h, kv_of_q[h], hd, positions[t] + 1,
                    scale, scratch[p - p0])


@_parallel
def _attention_rows_par(out, qs, d, quant, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq,
                        hd, nch):
    """All T tokens' heads in one parallel region: nch chunks, chunk c takes the tokens t = c mod
    nch (interleaved: causal costs grow with t) and scratch row c; each token's row is quantised
    (quant: 0 none, 1 portable, 2 F16C) as soon as its heads are done.  The same bits as
    _attention_ser + quantize_q80_act (the same per-pair and per-row arithmetic)."""
    for c in prange(nch):
        for t in range(c, T, nch):
            for h in range(nq):
                _attend_one(out, q, k_cache[slots[t]], v_cache[slots[t]], t, h, kv_of_q[h], hd, positions[t] + 1,
                            scale, scratch[c])
            if quant == 2:
                _quantize_q80_act_f16c(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, nq * hd // QK)
            elif quant == 1:
                _quantize_q80_act(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, nq * hd // QK)


@_parallel
def _attention_pairs_par(out, qs, d, quant, q, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch,
                         T, nq, hd):
    """Fewer tokens than threads (a decode step): the (token, head) pairs over the threads,
    pair p in scratch row p (T*nq rows), then every row's Q80. The same bits as
    _attention_rows_par."""
    for p in prange(T * nq):
        t = p // nq
        h = p - t * nq
        _attend_one(out, q, k_cache[slots[t]], v_cache[slots[t]], t, h, kv_of_q[h], hd, positions[t] + 1,
                    scale, scratch[p])
    if quant == 2:
        _quantize_q80_act_f16c(qs, d, out, T, nq * hd // QK)
    elif quant == 1:
        _quantize_q80_act(qs, d, out, T, nq * hd // QK)


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

    q: [T, nq*hd]; k_cache, v_cache: [S, nkv, hd], float32 or float16 (both alike); kv_of_q:
    [nq] KV head of each local query head.
    scratch (optional): float32 [R, >= max(positions)+1], R >= 1 rows; R pairs run concurrently.
    """
    try:                                   # fast path when everything is right
        S, nkv, hd = k_cache.shape
        T, width = q.shape
        nq = width // hd
        ok = (type(q) is np.ndarray and k_cache.dtype in _KV_DTYPES
              and v_cache.dtype == k_cache.dtype and q.dtype == _F32
              and out.dtype == _F32 and positions.dtype == _I32 and kv_of_q.dtype == _I32
              and v_cache.shape == k_cache.shape and width % hd == 0 and out.shape == q.shape
              and positions.shape == (T,) and kv_of_q.shape == (nq,)
              and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous and q.flags.c_contiguous
              and out.flags.c_contiguous and out.flags.writeable and positions.flags.c_contiguous
              and kv_of_q.flags.c_contiguous)
    except (AttributeError, ValueError, TypeError, ZeroDivisionError):
        ok = False
    if not ok:
        _check("k_cache", k_cache, _kv_dtype(k_cache), ndim=3)
        S, nkv, hd = k_cache.shape
        _check("v_cache", v_cache, k_cache.dtype, (S, nkv, hd))
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
    _attention_run(out, q, _kv_bits(k_cache)[np.newaxis], _kv_bits(v_cache)[np.newaxis], positions,
                   _slots0(T), kv_of_q, np.float32(scale), scratch, T, nq, hd, pmax)


def _kv_dtype(cache) -> np.dtype:
    """The dtype a KV cache is checked against: its own when f32 or f16, else f32 (the error)."""
    dt = getattr(cache, "dtype", None)
    return dt if dt in _KV_DTYPES else _F32


def _kv_bits(cache: np.ndarray) -> np.ndarray:
    """What the kernels take: an f32 cache as it is, an f16 one as its uint16 bit patterns."""
    return cache.view(np.uint16) if cache.dtype == _F16 else cache


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
    if scratch is None:                   # cached: no page faults on every call
        key = (max(1, min(T * nq, 256)), S)
        scratch = _ATT_SCRATCH.get(key)
        if scratch is None:               # rows of one arena per S, sized for the most rows
            arena = _ATT_SCRATCH.get(S)   # asked (memory.py counts one: 256 rows at most)
            if arena is None or arena.shape[0] < key[0]:
                for k in [k for k in _ATT_SCRATCH if k == S or (type(k) is tuple and k[1] == S)]:
                    del _ATT_SCRATCH[k]
                if len(_ATT_SCRATCH) > 64:
                    _ATT_SCRATCH.clear()
                arena = _ATT_SCRATCH[S] = np.empty(key, np.float32)
            scratch = _ATT_SCRATCH[key] = arena[:key[0]]
        return scratch                    # made here: right by construction
    _check("scratch", scratch, np.float32, ndim=2)
    if scratch.shape[1] < pmax + 1 or scratch.shape[0] < 1:
        raise ValueError(f"scratch: needs >= 1 row and >= {pmax + 1} columns, got {scratch.shape}")
    return scratch


def _attention_serial_ok(T: int, nq: int, hd: int, pmax: int, scratch) -> bool:
    # a decode step's attention splits from far less work than other kernels: run serially
    # between two parallel matmuls it lets the idle threads sleep (see _jit._PAR_MIN_ROWS_WORK)
    least = _PAR_MIN_ROWS_WORK if T < _jit._NUM_THREADS else _PAR_MIN_WORK
    return T * nq * (pmax + 1) * hd < least or scratch.shape[0] == 1 or _jit._NUM_THREADS == 1


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
                vr[i] = _kv_value(row[o + i], vr)


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
    arithmetic, store k and v in the caches ([n_slots, S, nkv, hd], float32 or float16; f16:
    rounded to nearest) at [slot, position], then
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
        ok = (type(qkv) is np.ndarray and k_cache.dtype in _KV_DTYPES
              and v_cache.dtype == k_cache.dtype and qkv.dtype == _F32 and out.dtype == _F32 and positions.dtype == _I32
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
        _check("k_cache", k_cache, _kv_dtype(k_cache), ndim=4)
        n_slots, S, nkv, hd = k_cache.shape
        _check_out("k_cache", k_cache, k_cache.dtype, (n_slots, S, nkv, hd))
        if hd % 2:
            raise ValueError(f"k_cache: head_dim {hd} must be even")
        _check_out("v_cache", v_cache, k_cache.dtype, (n_slots, S, nkv, hd))
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
    k_cache, v_cache = _kv_bits(k_cache), _kv_bits(v_cache)

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
        if T < _jit._NUM_THREADS and T * nq <= scratch.shape[0]:
            _attention_pairs_par(out, qs, d, quant, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale,
                                 scratch, T, nq, hd)
        else:
            _attention_rows_par(out, qs, d, quant, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale,
                                scratch, T, nq, hd, min(scratch.shape[0], _jit._NUM_THREADS))
    return call


"""Rope and causal GQA attention over a KV cache; ``attention_block`` fuses a layer's rope, KV
store, attention and (optionally) the Q80 quantisation of the result.

The KV cache is float32 or float16 (``--kv-cache-float-type f16``): the wrappers pass an f16
cache to the kernels as its uint16 bit patterns: the head products (``_qk_heads``,
``_pv_heads``, simd.py) widen them as they load, and ``_kv_value`` rounds a stored value to
nearest-even, so one body serves both types.

Attention runs row by row of q (a token of one sequence): all its heads together, one cache
position after the next, so the K and V rows of its sequence stream from memory once per layer,
in address order."""
from __future__ import annotations

import numpy as np
from numba import prange

from ..quant import QK
from . import _jit
from ._checks import _F32, _I32, _check, _check_out, _noop
from ._jit import _PAR_MIN_ROWS_WORK, _PAR_MIN_WORK, _inline, _parallel, _serial
from .q80 import _q80_outputs_ok, _quantize_q80_act, _quantize_q80_act_f16c, quantize_q80_act
from .simd import _NH, HAS_AVX2, _exp_neg, _kv_value, _pv_heads, _qk_heads, _vsum

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

@_inline
def _softmax_rows(sc, r0, h0, h1, npos):
    """Scratch rows r0 + h (h0 <= h < h1), scores -> probabilities over columns 0..npos-1."""
    for h in range(h0, h1):
        r = r0 + h
        m = np.float32(-3.0e38)                # not -inf: fastmath assumes no infinities
        for j in range(npos):
            m = max(m, sc[r, j])
        for j in range(npos):
            sc[r, j] = _exp_neg(sc[r, j] - m)
        inv = np.float32(1.0) / _vsum(sc, r * sc.shape[1], npos)
        for j in range(npos):
            sc[r, j] *= inv


@_inline
def _head_runs(kv_of_q, h0, h1):
    """Heads h0..h1-1 in runs that read one KV head, at most _NH heads each: [first heads...,
    h1] (n_runs + 1 entries; an array, so the per-position loops do not search for them)."""
    runs = np.empty(h1 - h0 + 1, np.int64)
    n = 0
    h = h0
    while h < h1:
        runs[n] = h
        e = h + 1
        while e < h1 and e - h < _NH and kv_of_q[e] == kv_of_q[h]:
            e += 1
        h = e
        n += 1
    runs[n] = h1
    return runs[:n + 1]


_VB = 128                         # positions per block of attention's V sum (for any thread count)


@_inline
def _scores(q, kc, t, base, rowl, hd, kv_of_q, runs, scale, sc, r0, j0, j1):
    """Scratch rows r0 + h, columns j0..j1-1: scale * q[t, head h] . K row j, for the heads of
    runs (_head_runs), position by position in address order (a KV head's segment loaded once
    for the query heads that share it)."""
    qw, scw = q.shape[1], sc.shape[1]        # row lengths: flat offsets
    for j in range(j0, j1):
        row = base + j * rowl
        for u in range(runs.shape[0] - 1):
            h, e = runs[u], runs[u + 1]
            _qk_heads(sc, (r0 + h) * scw + j, scw, q, t * qw + h * hd, kc, row + kv_of_q[h] * hd, hd, e - h, scale)


@_inline
def _values(acc, ao, vc, base, rowl, hd, kv_of_q, runs, sc, r0, j0, j1):
    """acc[flat ao + (h - first head) * hd ...] += sum over positions j0..j1-1 of
    p[h, j] * V row j (p: scratch row r0 + h), for the heads of runs, in address order."""
    h0 = runs[0]
    for j in range(j0, j1):
        row = base + j * rowl
        for u in range(runs.shape[0] - 1):
            h, e = runs[u], runs[u + 1]
            r, rl = r0 + h, r0 + e - 1             # heads past the run: their p is not used
            _pv_heads(acc, ao + (h - h0) * hd, vc, row + kv_of_q[h] * hd, hd, e - h,
                      sc[r, j], sc[min(r + 1, rl), j], sc[min(r + 2, rl), j], sc[min(r + 3, rl), j])


@_inline
def _block_sum(acc, a, vc, base, rowl, hd, kv_of_q, runs, sc, r0, npos, j0):
    """acc row a = the V sum (_values, from zero) of positions j0.. j0 + _VB - 1 (below npos)."""
    w = acc.shape[1]
    for i in range(w):
        acc[a, i] = np.float32(0.0)
    _values(acc, a * w, vc, base, rowl, hd, kv_of_q, runs, sc, r0, j0, min(npos, j0 + _VB))


@_inline
def _attend_row(out, q, kc, vc, t, s, npos, hd, kv_of_q, h0, h1, scale, sc, r0):
    """Heads h0..h1-1 of row t, over rows 0..npos-1 of cache slot s, into out[t].

    The scores (_scores), softmax per head, then the V rows (_values), each pass over the
    positions in address order: a slot's K and V rows stream from memory once and in the
    order the hardware prefetchers follow (4 positions of one KV head at a time, the order
    before, was 2-3x slower from memory than from cache). The V sum runs in blocks of _VB
    positions, each block's sum added to out in turn: the bits _attention_long_par gives
    when it sums a row's blocks on several threads."""
    S, nkv = kc.shape[1], kc.shape[2]
    rowl = nkv * hd
    base = s * S * rowl
    runs = _head_runs(kv_of_q, h0, h1)
    _scores(q, kc, t, base, rowl, hd, kv_of_q, runs, scale, sc, r0, 0, npos)
    _softmax_rows(sc, r0, h0, h1, npos)
    ow, w = out.shape[1], (h1 - h0) * hd
    for i in range(h0 * hd, h1 * hd):
        out[t, i] = np.float32(0.0)
    _values(out, t * ow + h0 * hd, vc, base, rowl, hd, kv_of_q, runs, sc, r0, 0, min(npos, _VB))
    if npos > _VB:
        acc = np.empty((1, w), np.float32)
        for j0 in range(_VB, npos, _VB):
            _block_sum(acc, 0, vc, base, rowl, hd, kv_of_q, runs, sc, r0, npos, j0)
            for i in range(w):
                out[t, h0 * hd + i] += acc[0, i]


@_inline
def _quantize_row(qs, d, out, t, quant, nblocks):
    if quant == 2:
        _quantize_q80_act_f16c(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, nblocks)
    elif quant == 1:
        _quantize_q80_act(qs[t:t + 1], d[t:t + 1], out[t:t + 1], 1, nblocks)


@_inline
def _attend_rows(out, qs, d, quant, q, kc, vc, positions, slots, kv_of_q, scale, sc, T, nq, hd, c, nch):
    """Rows t = c, c + nch, ... (all heads; scratch rows c*nq ...), each quantised to Q80
    (quant: 0 none, 1 portable, 2 F16C) when done."""
    for t in range(c, T, nch):
        _attend_row(out, q, kc, vc, t, slots[t], positions[t] + 1, hd, kv_of_q, 0, nq, scale, sc, c * nq)
        _quantize_row(qs, d, out, t, quant, nq * hd // QK)


@_serial
def _attention_ser(out, qs, d, quant, q, kc, vc, positions, slots, kv_of_q, scale, sc, T, nq, hd):
    if sc.shape[0] < nq:                   # scratch rows: one per head of a row
        raise ValueError("attention scratch: too few rows")
    _attend_rows(out, qs, d, quant, q, kc, vc, positions, slots, kv_of_q, scale, sc, T, nq, hd, 0, 1)


@_parallel
def _attention_rows_par(out, qs, d, quant, q, kc, vc, positions, slots, kv_of_q, scale, sc, T, nq, hd, nch):
    """All T rows in one parallel region: nch chunks, chunk c takes the rows t = c mod nch
    (interleaved: causal costs grow with t). The same bits as _attention_ser."""
    if sc.shape[0] < nch * nq:
        raise ValueError("attention scratch: too few rows")
    for c in prange(nch):
        _attend_rows(out, qs, d, quant, q, kc, vc, positions, slots, kv_of_q, scale, sc, T, nq, hd, c, nch)


@_parallel
def _attention_long_par(out, qs, d, quant, q, kc, vc, positions, slots, kv_of_q, scale, sc, nq, hd):
    """One row (a decode step) of more than _VB positions: its positions in blocks of _VB over
    the threads, each thread's blocks in a contiguous range (scores, then after the softmax
    each block's V sum); the block sums added in order. The same bits as _attention_ser."""
    if sc.shape[0] < nq:
        raise ValueError("attention scratch: too few rows")
    npos = positions[0] + 1
    S, nkv = kc.shape[1], kc.shape[2]
    rowl = nkv * hd
    base = slots[0] * S * rowl
    nb = (npos + _VB - 1) // _VB
    runs = _head_runs(kv_of_q, 0, nq)
    for b in prange(nb):
        _scores(q, kc, 0, base, rowl, hd, kv_of_q, runs, scale, sc, 0, b * _VB, min(npos, b * _VB + _VB))
    _softmax_rows(sc, 0, 0, nq, npos)
    w = nq * hd
    part = np.empty((nb, w), np.float32)
    for b in prange(nb):
        _block_sum(part, b, vc, base, rowl, hd, kv_of_q, runs, sc, 0, npos, b * _VB)
    for i in range(w):
        out[0, i] = part[0, i]
    for b in range(1, nb):
        for i in range(w):
            out[0, i] += part[b, i]
    _quantize_row(qs, d, out, 0, quant, w // QK)


@_serial
def _ranges(positions, slots, T):
    """(min, max) of positions[:T], then of slots[:T] (T >= 1)."""
    pmin = pmax = positions[0]
    smin = smax = slots[0]
    for t in range(1, T):
        pmin, pmax = min(pmin, positions[t]), max(pmax, positions[t])
        smin, smax = min(smin, slots[t]), max(smax, slots[t])
    return pmin, pmax, smin, smax


@_serial
def _kv_ok(kv_of_q, nkv):
    for h in range(kv_of_q.shape[0]):
        if kv_of_q[h] < 0 or kv_of_q[h] >= nkv:
            return False
    return True


_ATT_SCRATCH: dict = {}
_KV_OK: set = set()                  # (nkv, kv_of_q bytes) already validated


def scratch_rows(T: int, nq: int) -> int:
    """Scratch rows attention takes for T rows of nq heads: nq per row run at once, at most
    one row per thread and 256 rows or one row's (memory.attention_bytes counts the same)."""
    return min(nq * max(1, min(T, _jit._NUM_THREADS)), max(nq, 256))


def attention_scratch(T: int, nq: int, seq_len: int) -> np.ndarray:
    """A scratch buffer for ``attention`` (scratch_rows(T, nq) rows of seq_len)."""
    return np.empty((scratch_rows(T, nq), seq_len), dtype=np.float32)


def attention(out: np.ndarray, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              positions: np.ndarray, kv_of_q: np.ndarray, scale: float,
              scratch: np.ndarray | None = None) -> None:
    """Causal GQA attention over a KV cache; token t attends to cache rows 0..positions[t].

    q: [T, nq*hd]; k_cache, v_cache: [S, nkv, hd], float32 or float16 (both alike); kv_of_q:
    [nq] KV head of each local query head.
    scratch (optional): float32 [R, >= max(positions)+1], R >= nq rows; R // nq rows of q run
    concurrently.
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
    kc, vc = _kv_bits(k_cache)[np.newaxis], _kv_bits(v_cache)[np.newaxis]
    args = (out, *_NO_Q80, 0, q, kc, vc, positions, _slots0(T), kv_of_q, np.float32(scale), scratch, T, nq, hd)
    nch = _split(T, nq, hd, pmax, scratch)
    if nch > 1 and T == 1:
        _attention_long_par(*args[:-3], nq, hd)
    elif nch > 1:
        _attention_rows_par(*args, nch)
    else:
        _attention_ser(*args)


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


def _check_ranges(positions, slots, T: int, S: int, n_slots: int) -> int:
    """positions in [0, S) and slots in [0, n_slots), from one numba call (numpy's min and
    max took 4.5 us a layer); the max position. T >= 1."""
    pmin, pmax, lo, hi = _ranges(positions, slots, T)
    if pmin < 0 or pmax >= S:
        raise ValueError(f"positions: must lie in [0, {S}), got [{pmin}, {pmax}]")
    if lo < 0 or hi >= n_slots:
        raise ValueError(f"slots: must lie in [0, {n_slots}), got [{lo}, {hi}]")
    return int(pmax)


def _check_positions(positions, T: int, S: int, nkv: int, kv_of_q) -> int:
    """positions in [0, S) and kv_of_q in [0, nkv) (validated once per distinct map); max position."""
    pmax = _check_ranges(positions, _slots0(T), T, S, 1)
    if kv_of_q.shape[0] and (nkv, kv_of_q.tobytes()) not in _KV_OK:
        if not _kv_ok(kv_of_q, nkv):
            raise ValueError(f"kv_of_q: must lie in [0, {nkv})")
        if len(_KV_OK) > 64:
            _KV_OK.clear()
        _KV_OK.add((nkv, kv_of_q.tobytes()))
    return pmax


def _scratch(scratch, T: int, nq: int, S: int, pmax: int) -> np.ndarray:
    if scratch is None:                   # cached: no page faults on every call
        key = (scratch_rows(T, nq), S)
        scratch = _ATT_SCRATCH.get(key)
        if scratch is None:               # rows of one arena per S, sized for the most rows
            arena = _ATT_SCRATCH.get(S)   # asked (memory.py counts one)
            if arena is None or arena.shape[0] < key[0]:
                for k in [k for k in _ATT_SCRATCH if k == S or (type(k) is tuple and k[1] == S)]:
                    del _ATT_SCRATCH[k]
                if len(_ATT_SCRATCH) > 64:
                    _ATT_SCRATCH.clear()
                arena = _ATT_SCRATCH[S] = np.empty(key, np.float32)
            scratch = _ATT_SCRATCH[key] = arena[:key[0]]
        return scratch                    # made here: right by construction
    _check("scratch", scratch, np.float32, ndim=2)
    if scratch.shape[1] < pmax + 1 or scratch.shape[0] < max(1, nq):
        raise ValueError(f"scratch: needs >= {max(1, nq)} rows and >= {pmax + 1} columns, got {scratch.shape}")
    return scratch


def _split(T: int, nq: int, hd: int, pmax: int, scratch) -> int:
    """How many chunks attention runs in: 1 (serially) below the work a parallel region pays
    off for (from less with fewer rows than threads: run serially between two parallel matmuls
    it lets the idle threads sleep, see _jit._PAR_MIN_ROWS_WORK), and for one row of at most
    _VB positions; one row of more runs its blocks of positions over the threads
    (_attention_long_par: splitting its heads instead broke each thread's reads into pieces
    of every cache row and was slower than one thread); else rows in one chunk per thread."""
    threads = _jit._NUM_THREADS
    least = _PAR_MIN_ROWS_WORK if T < threads else _PAR_MIN_WORK
    if threads == 1 or nq == 0 or T * nq * (pmax + 1) * hd < least:
        return 1
    if T == 1:
        return min(threads, (pmax + _VB) // _VB)
    return max(1, min(threads, T, scratch.shape[0] // nq))


# ---------------------------------------------------------------- attention block (rope + KV store + attention)

@_inline
def _rope_store_row(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, t):
    """Rotate row t's q in place and its k into the cache row of its position (the arithmetic
    of _rope_rows); copy its v into the cache."""
    half = hd // 2
    kc0 = nq * hd
    vc0 = kc0 + nkv * hd
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
def _rope_store(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, T):
    for t in range(T):
        _rope_store_row(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, t)


@_parallel
def _attention_block_par(out, qs, d, quant, qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin,
                         kv_of_q, scale, scratch, T, hd, nch):
    """The attention block of T rows in one call: every row's rope and KV-cache write over the
    threads, then (once all are written: a row reads the K and V rows of its sequence's other
    rows) attention as _attention_rows_par. The same bits as _attention_block_ser."""
    if scratch.shape[0] < nch * nq:
        raise ValueError("attention scratch: too few rows")
    for t in prange(T):
        _rope_store_row(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, t)
    for c in prange(nch):
        _attend_rows(out, qs, d, quant, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq,
                     hd, c, nch)


@_serial
def _attention_block_ser(out, qs, d, quant, qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin,
                         kv_of_q, scale, scratch, T, hd):
    _rope_store(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, T)
    _attention_ser(out, qs, d, quant, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale, scratch, T, nq,
                   hd)


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
        pmax = _check_ranges(positions, slots, T, S, n_slots)
        scratch = _scratch(None, T, nq, S, pmax)
        nch = _split(T, nq, hd, pmax, scratch)
        if nch == 1:
            _attention_block_ser(out, qs, d, quant, qkv, nq, nkv, k_cache, v_cache, positions, slots,
                                 cos, sin, kv_of_q, scale, scratch, T, hd)
            return
        if T == 1:
            _rope_store(qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin, hd, T)
            _attention_long_par(out, qs, d, quant, qkv, k_cache, v_cache, positions, slots, kv_of_q, scale,
                                scratch, nq, hd)
        else:
            _attention_block_par(out, qs, d, quant, qkv, nq, nkv, k_cache, v_cache, positions, slots, cos, sin,
                                 kv_of_q, scale, scratch, T, hd, nch)
    return call


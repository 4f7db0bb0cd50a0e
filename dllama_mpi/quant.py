"""Q40 / Q80 block formats and their numpy reference implementations.

Both formats are GGML's (Q4_0 and Q8_0), which Distributed Llama calls Q40 and Q80:

* Q40 block, 18 bytes for 32 values: float16 scale ``d`` (little-endian), then 16 bytes;
  byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble;
  value = (nibble - 8) * d.
* Q80 block, 34 bytes for 32 values: float16 scale ``d``, then 32 int8; value = q * d.

The functions here are vectorised numpy and bit-identical to ``gguf.quants`` (tested).
They are the reference twins of the numba kernels in :mod:`dllama_mpi.kernels`.

:class:`Q40Matrix` is the runtime form of a Q40 weight matrix: the file layout is only
the input, the matrix is repacked at load into the layout the decode kernel streams best
(see the class docstring).
"""
from __future__ import annotations

import numpy as np

QK = 32                 # values per block (both formats)
Q40_BLOCK_BYTES = 18    # 2 (fp16 scale) + 16 (32 nibbles)
Q80_BLOCK_BYTES = 34    # 2 (fp16 scale) + 32 (int8)

_CHUNK_VALUES = 1 << 22  # values per numpy chunk: bounds temporaries to ~100 MB


def _as_f32_rows(x: np.ndarray, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{what}: expected an array with a last axis, got a scalar")
    n = x.shape[-1]
    if n % QK != 0:
        raise ValueError(f"{what}: last axis ({n}) must be a multiple of {QK}")
    x2 = np.ascontiguousarray(x.reshape(-1, n) if x.size else x.reshape(0, n), dtype=np.float32)
    return x2, x.shape


def _as_u8_rows(raw: np.ndarray, block_bytes: int, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 bytes, got {raw.dtype}")
    if raw.ndim == 0 or raw.shape[-1] % block_bytes != 0:
        raise ValueError(f"{what}: last axis must be a multiple of {block_bytes} bytes, got shape {raw.shape}")
    nbytes = raw.shape[-1]
    return np.ascontiguousarray(raw.reshape(-1, nbytes)), raw.shape


def _row_chunks(n_rows: int, row_len: int):
    step = max(1, _CHUNK_VALUES // max(row_len, 1))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


# ---------------------------------------------------------------- Q40 (GGML Q4_0)

def _q40_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 [nb, 32] -> (fp16 scale [nb], packed nibbles uint8 [nb, 16]); same ops as GGML/gguf."""
    imax = np.abs(blocks).argmax(axis=-1)[:, None]          # first index of the largest |x|
    vmax = np.take_along_axis(blocks, imax, axis=-1)         # signed value of largest magnitude
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8)
    np.minimum(q, 15, out=q)
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return d[:, 0].astype(np.float16), packed


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """f32 ``[..., n]`` (n % 32 == 0) -> uint8 ``[..., n//32*18]`` GGML Q4_0 blocks."""
    x2, shape = _as_f32_rows(x, "quantize_q40")
    rows, n = x2.shape
    nb = n // QK
    out = np.empty((rows, nb, Q40_BLOCK_BYTES), dtype=np.uint8)
    for r0, r1 in _row_chunks(rows, n):
        d, packed = _q40_blocks(x2[r0:r1].reshape(-1, QK))
        o = out[r0:r1].reshape(-1, Q40_BLOCK_BYTES)
        o[:, :2] = d.view(np.uint8).reshape(-1, 2)
        o[:, 2:] = packed
    return out.reshape(shape[:-1] + (nb * Q40_BLOCK_BYTES,))


def split_q40(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 Q4_0 bytes ``[rows, nb*18]`` -> (fp16 scales ``[rows, nb]``, nibble bytes ``[rows, nb, 16]``)."""
    r2, _ = _as_u8_rows(raw, Q40_BLOCK_BYTES, "split_q40")
    rows, nb = r2.shape[0], r2.shape[1] // Q40_BLOCK_BYTES
    b = r2.reshape(rows, nb, Q40_BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(rows, nb)
    return d, np.ascontiguousarray(b[:, :, 2:])


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """packed nibble bytes ``[..., 16]`` -> uint8 nibbles ``[..., 32]`` (0..15) in element order."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def dequantize_q40(raw: np.ndarray) -> np.ndarray:
    """uint8 ``[..., nb*18]`` GGML Q4_0 blocks -> f32 ``[..., nb*32]``."""
    r2, shape = _as_u8_rows(raw, Q40_BLOCK_BYTES, "dequantize_q40")
    rows, nbytes = r2.shape
    nb = nbytes // Q40_BLOCK_BYTES
    out = np.empty((rows, nb * QK), dtype=np.float32)
    for r0, r1 in _row_chunks(rows, nb * QK):
        d, qs = split_q40(r2[r0:r1])
        q = unpack_nibbles(qs).astype(np.int8) - np.int8(8)            # [r, nb, 32]
        vals = d.astype(np.float32)[:, :, None] * q.astype(np.float32)
        out[r0:r1] = vals.reshape(r1 - r0, nb * QK)
    return out.reshape(shape[:-1] + (nb * QK,))


# ---------------------------------------------------------------- Q80 (GGML Q8_0)

def roundf(v: np.ndarray) -> np.ndarray:
    """Round half away from zero, exactly like C ``roundf`` (float32 in, float32 out)."""
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(np.float32(2) * (a - fl)))


def quantize_q80_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 ``[..., n]`` -> (int8 q ``[..., n]``, f32 scales ``[..., n//32]`` = float32(float16(d))).

    This is the split form the activation kernel produces (``kernels.quantize_q80_act``).
    """
    x2, shape = _as_f32_rows(x, "quantize_q80_parts")
    rows, n = x2.shape
    nb = n // QK
    qs = np.empty((rows, n), dtype=np.int8)
    ds = np.empty((rows, nb), dtype=np.float32)
    for r0, r1 in _row_chunks(rows, n):
        blocks = x2[r0:r1].reshape(-1, QK)
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        qs[r0:r1] = roundf(blocks * inv).astype(np.int8).reshape(r1 - r0, n)
        ds[r0:r1] = d.astype(np.float16).astype(np.float32).reshape(r1 - r0, nb)
    return qs.reshape(shape), ds.reshape(shape[:-1] + (nb,))


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """f32 ``[..., n]`` (n % 32 == 0) -> uint8 ``[..., n//32*34]`` GGML Q8_0 blocks."""
    x2, shape = _as_f32_rows(x, "quantize_q80")
    rows, n = x2.shape
    nb = n // QK
    qs, ds = quantize_q80_parts(x2)
    out = np.empty((rows, nb, Q80_BLOCK_BYTES), dtype=np.uint8)
    out[:, :, :2] = ds.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:] = qs.view(np.uint8).reshape(rows, nb, QK)
    return out.reshape(shape[:-1] + (nb * Q80_BLOCK_BYTES,))


def dequantize_q80(raw: np.ndarray) -> np.ndarray:
    """uint8 ``[..., nb*34]`` GGML Q8_0 blocks -> f32 ``[..., nb*32]``."""
    r2, shape = _as_u8_rows(raw, Q80_BLOCK_BYTES, "dequantize_q80")
    rows, nbytes = r2.shape
    nb = nbytes // Q80_BLOCK_BYTES
    b = r2.reshape(rows, nb, Q80_BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).astype(np.float32)   # [rows, nb, 1]
    q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).astype(np.float32)
    return (q * d).reshape(shape[:-1] + (nb * QK,))


def dequantize_q80_parts(qs: np.ndarray, ds: np.ndarray) -> np.ndarray:
    """(int8 ``[..., n]``, f32 ``[..., n//32]``) -> f32 ``[..., n]``."""
    qs = np.asarray(qs)
    n = qs.shape[-1]
    q = qs.reshape(-1, n // QK, QK).astype(np.float32)
    return (q * np.asarray(ds, dtype=np.float32).reshape(-1, n // QK, 1)).reshape(qs.shape)


# ---------------------------------------------------------------- runtime Q40 matrix

SLAB_BLOCKS = 64        # blocks per column slab of the runtime layout (64 blocks = 2048 columns)


def rows_per_tile(g: int) -> int:
    """Rows sharing one weight tile in a slab of g blocks: 1 if g >= 16 (a 16-lane vector is filled
    by one row), else 64 // g (several rows side by side, so narrow matrices still fill the lanes)."""
    return 1 if g >= 16 else SLAB_BLOCKS // g


TILE_ROWS = 16          # rows per tile of the row-tile layout (Q4 formats)
ROW_TILE_MAX_COLS = 2047  # Q40Matrix.from_blocks picks the row-tile layout for cols <= this


def pack_row_tiles(payload: np.ndarray, scales: list, rt: int, unit: int) -> np.ndarray:
    """Row-tile layout: rows in tiles of ``rt`` (the last one zero-padded), and per (tile, block) one
    record of ``stride = rt*pb + 2*rt*len(scales)`` bytes: the block payloads ``[pb/unit, rt, unit]``
    (``unit``-byte groups of the rt rows side by side: one 32-byte load = group p of every row), then
    each scale array's rt uint16 values.  payload: uint8 [rows, nb, pb]; scales: uint16 [rows, nb].
    Returns flat uint8 [ntile * nb * stride] (tile-major, then block)."""
    rows, nb, pb = payload.shape
    ntile = (rows + rt - 1) // rt
    stride = rt * pb + 2 * rt * len(scales)
    out = np.zeros((ntile, nb, stride), np.uint8)
    full = rows // rt * rt
    for r0, r1 in ((0, full), (full, rows)):
        if r1 <= r0:
            continue
        k0, n = r0 // rt, (r1 - r0 + rt - 1) // rt
        pay = np.zeros((n * rt, nb, pb), np.uint8)
        pay[:r1 - r0] = payload[r0:r1]
        # [n, rt, nb, pb/unit, unit] -> [n, nb, pb/unit, rt, unit]
        out[k0:k0 + n, :, :rt * pb] = pay.reshape(n, rt, nb, pb // unit, unit).transpose(0, 2, 3, 1, 4).reshape(n, nb, rt * pb)
        for j, sc in enumerate(scales):
            s = np.zeros((n * rt, nb), np.uint16)
            s[:r1 - r0] = sc[r0:r1]
            o = rt * pb + 2 * rt * j
            out[k0:k0 + n, :, o:o + 2 * rt] = s.reshape(n, rt, nb).transpose(0, 2, 1).copy().view(np.uint8).reshape(n, nb, 2 * rt)
    return out.reshape(-1)


def unpack_row_tiles(buf: np.ndarray, rows: int, nb: int, pb: int, nscales: int, rt: int, unit: int):
    """Inverse of pack_row_tiles: (payload uint8 [rows, nb, pb], [uint16 [rows, nb]] * nscales)."""
    ntile = (rows + rt - 1) // rt
    stride = rt * pb + 2 * rt * nscales
    b = buf.reshape(ntile, nb, stride)
    pay = b[:, :, :rt * pb].reshape(ntile, nb, pb // unit, rt, unit).transpose(0, 3, 1, 2, 4).reshape(ntile * rt, nb, pb)
    scales = []
    for j in range(nscales):
        o = rt * pb + 2 * rt * j
        s = np.ascontiguousarray(b[:, :, o:o + 2 * rt]).view(np.uint16).reshape(ntile, nb, rt)
        scales.append(np.ascontiguousarray(s.transpose(0, 2, 1).reshape(ntile * rt, nb)[:rows]))
    return np.ascontiguousarray(pay[:rows]), scales


class Q40Matrix:
    """A Q40 weight matrix ``W[rows, cols]`` in the layout the kernels stream.

    The columns are cut into slabs of ``SLAB_BLOCKS`` = 64 blocks (2048 columns; the last slab may
    be narrower, width ``G``).  Slabs are stored one after the other.  Inside a slab the rows are
    taken R at a time (``rows_per_tile``: 1 if G >= 16, else 64 // G; the last group may hold fewer
    rows) and each row group is a *tile* of ``L = rows_in_group * G <= 64`` lanes (lane = (row, block)),
    stored ``[8, L, 2]``: byte pair (2p, 2p+1) of every lane side by side, for p = 0..7.  So the
    decode kernel reads one contiguous stream, and one 32-byte load holds byte pair p of 16 lanes:
    exactly what AVX2 ``vpmaddubsw`` (u8 x s8, adjacent pairs summed to int16) needs, each lane
    summing its own block with no horizontal reductions; narrow slabs (G < 16) still fill the
    vector lanes because several rows share a tile.

    * ``qs``: uint8 ``[rows * nb * 16]``.  Slab s starts at ``s*rows*16*64``; its tile k (rows
      k*R ...) at ``+ k*R*16*G``; byte k' = 2p + e of lane l at ``+ p*2*L + 2*l + e``.  Byte k' holds
      element k' (low nibble) and element k' + 16 (high nibble) of its block, as in GGML.
    * ``d``: float16 ``[rows * nb]`` -- the block scales, in their own array, at
      ``s*rows*64 + r*G + b`` (i.e. in lane order; 2 bytes per block: 18 bytes per 32 weights in
      total, as in the file).

    Narrow matrices (cols <= ROW_TILE_MAX_COLS, e.g. SmolLM2's 576 / 1536) use instead the *row-tile*
    layout (``layout == "rows"``; ``pack_row_tiles`` with 16 rows per tile, 2-byte units): per (tile
    of 16 rows, block) a 288-byte record = the 16 nibble bytes of the 16 rows as [8 pairs, 16 rows,
    2] then their 16 fp16 scales; ``qs`` holds the whole stream and ``d`` is empty.  One 32-byte
    load = byte pair p of 16 rows, one vpmaddubsw against the broadcast activation pair, and the
    16 rows' sums stay in 16 vector lanes through the f32 scaling: no per-row overhead.

    Plain numpy arrays only (picklable, could be memory-mapped).
    """

    __slots__ = ("rows", "cols", "nb", "nslab", "qs", "d", "layout")

    def __init__(self, qs: np.ndarray, d: np.ndarray, rows: int, cols: int):
        rows, cols = int(rows), int(cols)
        if cols <= 0 or cols % QK or rows < 0:
            raise ValueError(f"Q40Matrix: bad shape {rows}x{cols} (cols must be a positive multiple of {QK})")
        nb = cols // QK
        if qs.dtype != np.uint8 or d.dtype != np.float16:
            raise ValueError("Q40Matrix: qs must be uint8 and d float16")
        if qs.shape != (rows * nb * 16,) or d.shape != (rows * nb,):
            raise ValueError(f"Q40Matrix: inconsistent parts qs{qs.shape} d{d.shape} for {rows}x{cols}")
        self.rows, self.cols, self.nb = rows, cols, nb
        self.nslab = (nb + SLAB_BLOCKS - 1) // SLAB_BLOCKS
        self.qs = np.ascontiguousarray(qs)
        self.d = np.ascontiguousarray(d)
        self.layout = "slab"

    def _slabs(self):
        """yield (first block b0, width G, rows per tile R, byte offset of the slab in qs, offset in d)."""
        for s in range(self.nslab):
            b0 = s * SLAB_BLOCKS
            g = min(SLAB_BLOCKS, self.nb - b0)
            yield b0, g, rows_per_tile(g), b0 * 16 * self.rows, b0 * self.rows

    @staticmethod
    def _tiles(rows: int, R: int):
        """yield (first row, rows in tile) for the row groups of a slab: full groups, then the rest."""
        nfull = rows // R
        if nfull:
            yield 0, nfull * R          # all full tiles at once (same shape)
        if rows % R:
            yield nfull * R, rows % R

    @classmethod
    def from_blocks(cls, raw: np.ndarray, layout: str | None = None) -> "Q40Matrix":
        """raw GGML Q4_0 bytes ``uint8 [rows, cols//32*18]`` (row-major, rows quantised along cols).
        layout: "slab" or "rows"; default by width (rows for cols <= ROW_TILE_MAX_COLS)."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] == 0 or raw.shape[1] % Q40_BLOCK_BYTES:
            raise ValueError(f"Q40Matrix.from_blocks: expected uint8 [rows, nb*18], got {raw.dtype} {raw.shape}")
        rows, nb = raw.shape[0], raw.shape[1] // Q40_BLOCK_BYTES
        b = raw.reshape(rows, nb, Q40_BLOCK_BYTES)
        if layout is None:
            layout = "rows" if nb * QK <= ROW_TILE_MAX_COLS else "slab"
        if layout not in ("rows", "slab"):
            raise ValueError(f"Q40Matrix.from_blocks: unknown layout {layout!r}")
        if layout == "rows":
            m = cls.__new__(cls)
            m.rows, m.cols, m.nb, m.layout = rows, nb * QK, nb, "rows"
            m.nslab = (nb + SLAB_BLOCKS - 1) // SLAB_BLOCKS
            dd = np.ascontiguousarray(b[:, :, :2]).view(np.uint16).reshape(rows, nb)
            m.qs = pack_row_tiles(b[:, :, 2:], [dd], TILE_ROWS, 2)
            m.d = np.empty(0, np.float16)
            return m
        qs = np.empty(rows * nb * 16, np.uint8)
        d = np.empty(rows * nb, np.uint16)
        m = cls.__new__(cls)
        m.rows, m.cols, m.nb = rows, nb * QK, nb
        m.nslab = (nb + SLAB_BLOCKS - 1) // SLAB_BLOCKS
        for b0, g, R, qo, do in m._slabs():
            for r0, n in cls._tiles(rows, R):
                nr = min(n, R)          # rows per tile in this run of tiles
                nt = n // nr
                src = b[r0:r0 + n, b0:b0 + g, 2:].reshape(nt, nr, g, 8, 2)
                # [tiles, rows, g, 8, 2] -> [tiles, 8, rows*g (lanes), 2]
                qs[qo + r0 * 16 * g:qo + (r0 + n) * 16 * g].reshape(nt, 8, nr, g, 2)[...] = src.transpose(0, 3, 1, 2, 4)
            d[do:do + rows * g].reshape(rows, g)[...] = b[:, b0:b0 + g, 0].astype(np.uint16) | (
                b[:, b0:b0 + g, 1].astype(np.uint16) << np.uint16(8))
        m.qs, m.d = qs, d.view(np.float16)
        m.layout = "slab"
        return m

    @classmethod
    def from_f32(cls, w: np.ndarray) -> "Q40Matrix":
        """Quantise an f32 matrix (convenience for tests and converters)."""
        return cls.from_blocks(quantize_q40(np.asarray(w, dtype=np.float32)))

    @property
    def nbytes(self) -> int:
        return int(self.qs.nbytes + self.d.nbytes)

    def move_data(self, place) -> None:
        """Put the data where place(array) -> copy says (model.pack_weights)."""
        self.qs, self.d = place(self.qs), place(self.d)

    def to_blocks(self) -> np.ndarray:
        """Back to raw GGML Q4_0 bytes ``uint8 [rows, nb*18]``."""
        rows, nb = self.rows, self.nb
        out = np.empty((rows, nb, Q40_BLOCK_BYTES), dtype=np.uint8)
        if self.layout == "rows":
            pay, (dd,) = unpack_row_tiles(self.qs, rows, nb, 16, 1, TILE_ROWS, 2)
            out[:, :, 2:] = pay
            out[:, :, :2] = dd.view(np.uint8).reshape(rows, nb, 2)
            return out.reshape(rows, nb * Q40_BLOCK_BYTES)
        dbytes = self.d.view(np.uint8)
        for b0, g, R, qo, do in self._slabs():
            for r0, n in self._tiles(rows, R):
                nr = min(n, R)
                nt = n // nr
                tiles = self.qs[qo + r0 * 16 * g:qo + (r0 + n) * 16 * g].reshape(nt, 8, nr, g, 2)
                out[r0:r0 + n, b0:b0 + g, 2:] = tiles.transpose(0, 2, 3, 1, 4).reshape(n, g, 16)
            out[:, b0:b0 + g, :2] = dbytes[2 * do:2 * (do + rows * g)].reshape(rows, g, 2)
        return out.reshape(rows, nb * Q40_BLOCK_BYTES)

    def dequantize(self) -> np.ndarray:
        return dequantize_q40(self.to_blocks())

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        self.layout = "slab"
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"Q40Matrix({self.rows}x{self.cols}, {self.nbytes} bytes)"

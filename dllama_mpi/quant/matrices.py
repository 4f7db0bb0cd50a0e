"""Runtime layouts of the weight matrices: what the kernels stream, built from GGML blocks.

The file layout is only the input: a matrix is repacked at load into the layout its kernel
streams best, and goes back to the file's exact blocks with ``to_blocks``.

* :class:`Q40Matrix`: Q4_0 weights, in the *slab* layout (wide matrices) or the *row-tile*
  layout (narrow ones);
* :class:`Q41Matrix`: Q4_1 weights kept as they are (no lossy requantisation to Q4_0), row tiles;
* :class:`Q80Matrix`: Q8_0 weights, row tiles.

All are :class:`QuantMatrix`: shape, data arrays, the way from and back to the file's blocks.
"""
from __future__ import annotations

import numpy as np

from .blocks import (Q40_BLOCK_BYTES, Q41_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, dequantize_q40, dequantize_q41,
                     dequantize_q80, quantize_q40, quantize_q41, quantize_q80)

SLAB_BLOCKS = 64        # blocks per column slab of the runtime layout (64 blocks = 2048 columns)


def rows_per_tile(g: int) -> int:
    """Rows sharing one weight tile in a slab of g blocks: 1 if g >= 16 (a 16-lane vector is filled
    by one row), else 64 // g (several rows side by side, so narrow matrices still fill the lanes)."""
    return 1 if g >= 16 else SLAB_BLOCKS // g


# Q40Matrix.from_blocks picks the row-tile layout for cols <= this: every width now.  Measured on a
# 2-core Zen 4 (bench/bench_kernels.py --compute --kinds q40,q40rows; see the commit message): the
# row-tile kernels beat the slab ones on wide matrices too, at decode (T=1: 2048x5632 16.5-17.4 vs
# 16.0 GB/s, 5632x2048 on 2 threads 30-31 vs 23 GB/s) and far more on prompts (AVX2 ~200 vs ~165
# GOP/s, AVX-512 VNNI ~310).  The slab layout stays for layout="slab" (and older saved states).
ROW_TILE_MAX_COLS = 1 << 30


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


class QuantMatrix:
    """What the runtime matrices share: the shape (``rows``, ``cols``, ``nb`` blocks per row),
    their data arrays (plain numpy arrays: picklable, movable into one shared buffer), the way
    from and back to the file's GGML blocks, and the row-tile packing of those blocks.

    A subclass names its GGML block (``BLOCK_BYTES``: ``N_SCALES`` fp16 scales, then the
    payload), its row-tile geometry (``TILE_ROWS`` rows per tile, ``UNIT``-byte groups: see
    ``pack_row_tiles``), its data arrays (``DATA``, in ``move_data`` order) and its numpy
    (de)quantiser, and implements ``from_blocks`` / ``to_blocks``."""

    __slots__ = ("rows", "cols", "nb")
    BLOCK_BYTES: int
    N_SCALES = 1
    TILE_ROWS: int
    UNIT: int
    DATA: tuple[str, ...]
    _quantize = _dequantize = None      # staticmethods: f32 -> GGML bytes -> f32

    @classmethod
    def from_blocks(cls, raw: np.ndarray) -> "QuantMatrix":
        raise NotImplementedError

    def to_blocks(self) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def from_f32(cls, w: np.ndarray) -> "QuantMatrix":
        """Quantise an f32 matrix (convenience for tests and converters)."""
        return cls.from_blocks(cls._quantize(np.asarray(w, dtype=np.float32)))

    def dequantize(self) -> np.ndarray:
        return self._dequantize(self.to_blocks())

    @property
    def arrays(self) -> list[np.ndarray]:
        """The data arrays, in ``DATA`` order."""
        return [getattr(self, k) for k in self.DATA]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    def move_data(self, place) -> None:
        """Put the data where place(array) -> copy says (model.pack_weights)."""
        for k in self.DATA:
            setattr(self, k, place(getattr(self, k)))

    @classmethod
    def _file_blocks(cls, raw: np.ndarray) -> tuple[np.ndarray, int, int]:
        """raw GGML bytes ``uint8 [rows, nb*BLOCK_BYTES]`` -> (``uint8 [rows, nb, BLOCK_BYTES]``, rows, nb)."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % cls.BLOCK_BYTES:
            raise ValueError(f"{cls.__name__}.from_blocks: expected uint8 [rows, nb*{cls.BLOCK_BYTES}], "
                             f"got {raw.dtype} {raw.shape}")
        rows, nb = raw.shape[0], raw.shape[1] // cls.BLOCK_BYTES
        return raw.reshape(rows, nb, cls.BLOCK_BYTES), rows, nb

    @classmethod
    def _pack_row_tiles(cls, b: np.ndarray) -> np.ndarray:
        """GGML blocks ``uint8 [rows, nb, BLOCK_BYTES]`` -> the row-tile stream (pack_row_tiles)."""
        rows, nb = b.shape[:2]
        ns = cls.N_SCALES
        scales = [np.ascontiguousarray(b[:, :, 2 * j:2 * j + 2]).view(np.uint16).reshape(rows, nb)
                  for j in range(ns)]
        return pack_row_tiles(b[:, :, 2 * ns:], scales, cls.TILE_ROWS, cls.UNIT)

    def _unpack_row_tiles(self, buf: np.ndarray) -> np.ndarray:
        """The row-tile stream -> raw GGML bytes ``uint8 [rows, nb*BLOCK_BYTES]``."""
        rows, nb, ns = self.rows, self.nb, self.N_SCALES
        pay, scales = unpack_row_tiles(buf, rows, nb, self.BLOCK_BYTES - 2 * ns, ns, self.TILE_ROWS, self.UNIT)
        out = np.empty((rows, nb, self.BLOCK_BYTES), np.uint8)
        for j, s in enumerate(scales):
            out[:, :, 2 * j:2 * j + 2] = s.view(np.uint8).reshape(rows, nb, 2)
        out[:, :, 2 * ns:] = pay
        return out.reshape(rows, nb * self.BLOCK_BYTES)

    def __getstate__(self):
        return {k: getattr(self, k) for c in reversed(type(self).__mro__) for k in getattr(c, "__slots__", ())}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rows}x{self.cols}, {self.nbytes} bytes)"


class Q40Matrix(QuantMatrix):
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

    __slots__ = ("nslab", "qs", "d", "layout")
    BLOCK_BYTES, N_SCALES, TILE_ROWS, UNIT = Q40_BLOCK_BYTES, 1, 16, 2
    DATA = ("qs", "d")
    _quantize, _dequantize = staticmethod(quantize_q40), staticmethod(dequantize_q40)

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
        b, rows, nb = cls._file_blocks(raw)
        if layout is None:
            layout = "rows" if nb * QK <= ROW_TILE_MAX_COLS else "slab"
        if layout not in ("rows", "slab"):
            raise ValueError(f"Q40Matrix.from_blocks: unknown layout {layout!r}")
        if layout == "rows":
            m = cls.__new__(cls)
            m.rows, m.cols, m.nb, m.layout = rows, nb * QK, nb, "rows"
            m.nslab = (nb + SLAB_BLOCKS - 1) // SLAB_BLOCKS
            m.qs = cls._pack_row_tiles(b)
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

    def to_blocks(self) -> np.ndarray:
        """Back to raw GGML Q4_0 bytes ``uint8 [rows, nb*18]``."""
        if self.layout == "rows":
            return self._unpack_row_tiles(self.qs)
        rows, nb = self.rows, self.nb
        out = np.empty((rows, nb, Q40_BLOCK_BYTES), dtype=np.uint8)
        dbytes = self.d.view(np.uint8)
        for b0, g, R, qo, do in self._slabs():
            for r0, n in self._tiles(rows, R):
                nr = min(n, R)
                nt = n // nr
                tiles = self.qs[qo + r0 * 16 * g:qo + (r0 + n) * 16 * g].reshape(nt, 8, nr, g, 2)
                out[r0:r0 + n, b0:b0 + g, 2:] = tiles.transpose(0, 2, 3, 1, 4).reshape(n, g, 16)
            out[:, b0:b0 + g, :2] = dbytes[2 * do:2 * (do + rows * g)].reshape(rows, g, 2)
        return out.reshape(rows, nb * Q40_BLOCK_BYTES)

    def __setstate__(self, state):
        self.layout = "slab"             # states from before the row-tile layout
        super().__setstate__(state)


class RowTileMatrix(QuantMatrix):
    """A matrix held whole in the row-tile layout: ``buf`` = the ``pack_row_tiles`` stream of its
    blocks, ``stride`` bytes per (tile, block) record."""

    __slots__ = ("buf", "stride")
    DATA = ("buf",)

    def __init__(self, buf: np.ndarray, rows: int, cols: int):
        self.rows, self.cols, self.nb = int(rows), int(cols), int(cols) // QK
        self.stride = self.TILE_ROWS * self.BLOCK_BYTES
        self.buf = np.ascontiguousarray(buf, dtype=np.uint8)
        rt = self.TILE_ROWS
        if self.buf.shape != ((self.rows + rt - 1) // rt * self.nb * self.stride,):
            raise ValueError(f"{type(self).__name__}: buffer of {self.buf.shape} does not fit {rows}x{cols}")

    @classmethod
    def from_blocks(cls, raw: np.ndarray) -> "RowTileMatrix":
        """raw GGML bytes ``uint8 [rows, cols/32*BLOCK_BYTES]``."""
        b, rows, nb = cls._file_blocks(raw)
        return cls(cls._pack_row_tiles(b), rows, nb * QK)

    def to_blocks(self) -> np.ndarray:
        """Back to raw GGML bytes ``uint8 [rows, nb*BLOCK_BYTES]``."""
        return self._unpack_row_tiles(self.buf)


class Q41Matrix(RowTileMatrix):
    """W[rows, cols] from GGML Q4_1 blocks (w = d*q + m, q in 0..15), in the row-tile layout with
    16 rows per tile and 2-byte units: per (tile, block) a 320-byte record = nibbles [8 pairs, 16
    rows, 2], 16 fp16 d, 16 fp16 m -- 20 bytes per block, as in the file.

    Written as  d * (q_i - 8) + (m + 8d),  a Q4_1 block's dot with a Q80 activation block (dx, x_i)
    is   d*dx * sum_i (q_i - 8) x_i  +  (m + 8d) * dx * sum_i x_i.   ``kernels.matmul_q80_q41``
    computes the first term with the Q4 row-tile machinery and adds the second in its f32
    scaling step: no separate offset pass (``block_sums`` / ``add_offsets`` are its numpy form).

    Why keep Q4_1: requantising it to Q4_0 adds a second 4-bit rounding, which costs clearly
    more accuracy against the F32 path than the Q80 activation rounding alone.

    ``q40`` (a Q40Matrix of (d, q)) and ``offsets`` (f32 m + 8d) are built on demand (slow; for
    tests and the ``add_offsets`` twin)."""

    __slots__ = ()
    BLOCK_BYTES, N_SCALES, TILE_ROWS, UNIT = Q41_BLOCK_BYTES, 2, 16, 2
    _quantize, _dequantize = staticmethod(quantize_q41), staticmethod(dequantize_q41)

    @property
    def q40(self) -> Q40Matrix:
        b = self.to_blocks().reshape(self.rows, self.nb, Q41_BLOCK_BYTES)
        as_q40 = np.empty((self.rows, self.nb, Q40_BLOCK_BYTES), np.uint8)
        as_q40[:, :, 0:2] = b[:, :, 0:2]
        as_q40[:, :, 2:] = b[:, :, 4:]
        return Q40Matrix.from_blocks(as_q40.reshape(self.rows, self.nb * Q40_BLOCK_BYTES))

    @property
    def offsets(self) -> np.ndarray:
        b = self.to_blocks().reshape(self.rows, self.nb, Q41_BLOCK_BYTES)
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return m + np.float32(8) * d


class Q80Matrix(RowTileMatrix):
    """W[rows, cols] from GGML Q8_0 blocks (w = d*q, q int8), in the row-tile layout with 8 rows
    per tile and 4-byte units: per (tile, block) a 272-byte record = int8 values [8 quads, 8 rows,
    4] then 8 fp16 d (34 bytes per block, as in the file).  ``kernels.matmul_q80_q80`` multiplies
    it with a Q80 activation."""

    __slots__ = ()
    BLOCK_BYTES, N_SCALES, TILE_ROWS, UNIT = Q80_BLOCK_BYTES, 1, 8, 4
    _quantize, _dequantize = staticmethod(quantize_q80), staticmethod(dequantize_q80)


def block_sums(xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """dx * sum_i x_i per Q80 block: [T, nb] f32 (the activation side of Q41's offset term)."""
    t, n = xq.shape
    return xq.reshape(t, n // QK, QK).sum(axis=-1, dtype=np.int32).astype(np.float32) * xd


def add_offsets(out: np.ndarray, sums: np.ndarray, w: Q41Matrix) -> None:
    """out [T, rows] += sums [T, nb] @ offsets[rows, nb]^T."""
    out += sums @ w.offsets.T

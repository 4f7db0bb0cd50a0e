"""Q41: GGML's Q4_1 blocks kept as they are at run time (no lossy Q4_1 -> Q4_0 requantisation).

A Q4_1 block (20 bytes: f16 d, f16 m, 16 nibble bytes in Q4_0's order) holds
w_i = d * q_i + m,  q_i in 0..15. Written as  d * (q_i - 8) + (m + 8d),  its dot with a Q80
activation block (dx, x_i) is

    d*dx * sum_i (q_i - 8) x_i   +   (m + 8d) * dx * sum_i x_i

The kernel (kernels.matmul_q80_q41) computes the first term with the Q4 row-tile machinery and
adds the second in its f32 scaling step (per-block activation sums computed once per call):
no separate offset pass.  (block_sums / add_offsets remain as the numpy form of the offset term.)

Why: SmolLM2's GGUF is Q4_1. Requantising it to Q4_0 adds a second 4-bit rounding (~10%
relative error per matrix) and drops top-1 agreement with the F32 path to ~63% on real text;
keeping Q4_1 leaves only the Q80 activation rounding.
"""
from __future__ import annotations

import numpy as np

from .quant import (Q40_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, Q40Matrix, dequantize_q80, pack_row_tiles,
                    quantize_q80, unpack_row_tiles)

Q41_BLOCK_BYTES = 20


def quantize_q41(x: np.ndarray) -> np.ndarray:
    """f32 [..., n] -> GGML Q4_1 bytes [..., n/32*20] (the gguf package's reference)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    return quantize(np.ascontiguousarray(x, dtype=np.float32), GGMLQuantizationType.Q4_1)


def dequantize_q41(raw: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    return dequantize(np.ascontiguousarray(raw), GGMLQuantizationType.Q4_1)


class Q41Matrix:
    """W[rows, cols] from Q4_1 blocks (w = d*q + m), in the row-tile layout of quant.pack_row_tiles:
    per (tile of 16 rows, block) a 320-byte record = nibbles [8 pairs, 16 rows, 2], 16 fp16 d, 16
    fp16 m -- 20 bytes per block, as in the file.  ``kernels.matmul_q80_q41`` fuses the offsets.

    ``q40`` (a Q40Matrix of (d, q)) and ``offsets`` (f32 m + 8d) are built on demand (slow; for
    tests and the ``add_offsets`` twin)."""

    __slots__ = ("rows", "cols", "nb", "buf", "stride")

    def __init__(self, buf: np.ndarray, rows: int, cols: int):
        self.rows, self.cols, self.nb = int(rows), int(cols), int(cols) // QK
        self.stride = 16 * 16 + 2 * 2 * 16
        self.buf = np.ascontiguousarray(buf, dtype=np.uint8)
        if self.buf.shape != ((self.rows + 15) // 16 * self.nb * self.stride,):
            raise ValueError(f"Q41Matrix: buffer of {self.buf.shape} does not fit {rows}x{cols}")

    @classmethod
    def from_blocks(cls, raw: np.ndarray) -> "Q41Matrix":
        """raw GGML Q4_1 bytes uint8 [rows, cols/32*20]."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] == 0 or \
                raw.shape[1] % Q41_BLOCK_BYTES:
            raise ValueError(f"Q41Matrix.from_blocks: expected uint8 [rows, nb*20], "
                             f"got {raw.dtype} {raw.shape}")
        rows, nb = raw.shape[0], raw.shape[1] // Q41_BLOCK_BYTES
        b = raw.reshape(rows, nb, Q41_BLOCK_BYTES)
        d = np.ascontiguousarray(b[:, :, 0:2]).view(np.uint16).reshape(rows, nb)
        m = np.ascontiguousarray(b[:, :, 2:4]).view(np.uint16).reshape(rows, nb)
        return cls(pack_row_tiles(b[:, :, 4:], [d, m], 16, 2), rows, nb * QK)

    def to_blocks(self) -> np.ndarray:
        """Back to raw GGML Q4_1 bytes uint8 [rows, nb*20]."""
        pay, (d, m) = unpack_row_tiles(self.buf, self.rows, self.nb, 16, 2, 16, 2)
        out = np.empty((self.rows, self.nb, Q41_BLOCK_BYTES), np.uint8)
        out[:, :, 0:2] = d.view(np.uint8).reshape(self.rows, self.nb, 2)
        out[:, :, 2:4] = m.view(np.uint8).reshape(self.rows, self.nb, 2)
        out[:, :, 4:] = pay
        return out.reshape(self.rows, self.nb * Q41_BLOCK_BYTES)

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

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)

    def move_data(self, place) -> None:
        """Put the data where place(array) -> copy says (model.pack_weights)."""
        self.buf = place(self.buf)

    def dequantize(self) -> np.ndarray:
        return dequantize_q41(self.to_blocks())

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"Q41Matrix({self.rows}x{self.cols}, {self.nbytes} bytes)"


class Q80Matrix:
    """W[rows, cols] from GGML Q8_0 blocks (w = d*q, q int8), in the row-tile layout of
    quant.pack_row_tiles with 8 rows per tile and 4-byte units: per (tile, block) a 272-byte record
    = int8 values [8 quads, 8 rows, 4] then 8 fp16 d (34 bytes per block, as in the file).
    ``kernels.matmul_q80_q80`` multiplies it with a Q80 activation."""

    __slots__ = ("rows", "cols", "nb", "buf", "stride")

    def __init__(self, buf: np.ndarray, rows: int, cols: int):
        self.rows, self.cols, self.nb = int(rows), int(cols), int(cols) // QK
        self.stride = 8 * 32 + 2 * 8
        self.buf = np.ascontiguousarray(buf, dtype=np.uint8)
        if self.buf.shape != ((self.rows + 7) // 8 * self.nb * self.stride,):
            raise ValueError(f"Q80Matrix: buffer of {self.buf.shape} does not fit {rows}x{cols}")

    @classmethod
    def from_blocks(cls, raw: np.ndarray) -> "Q80Matrix":
        """raw GGML Q8_0 bytes uint8 [rows, cols/32*34]."""
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] == 0 or \
                raw.shape[1] % Q80_BLOCK_BYTES:
            raise ValueError(f"Q80Matrix.from_blocks: expected uint8 [rows, nb*34], "
                             f"got {raw.dtype} {raw.shape}")
        rows, nb = raw.shape[0], raw.shape[1] // Q80_BLOCK_BYTES
        b = raw.reshape(rows, nb, Q80_BLOCK_BYTES)
        d = np.ascontiguousarray(b[:, :, 0:2]).view(np.uint16).reshape(rows, nb)
        return cls(pack_row_tiles(b[:, :, 2:], [d], 8, 4), rows, nb * QK)

    @classmethod
    def from_f32(cls, w: np.ndarray) -> "Q80Matrix":
        return cls.from_blocks(quantize_q80(np.asarray(w, dtype=np.float32)))

    def to_blocks(self) -> np.ndarray:
        """Back to raw GGML Q8_0 bytes uint8 [rows, nb*34]."""
        pay, (d,) = unpack_row_tiles(self.buf, self.rows, self.nb, 32, 1, 8, 4)
        out = np.empty((self.rows, self.nb, Q80_BLOCK_BYTES), np.uint8)
        out[:, :, 0:2] = d.view(np.uint8).reshape(self.rows, self.nb, 2)
        out[:, :, 2:] = pay
        return out.reshape(self.rows, self.nb * Q80_BLOCK_BYTES)

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)

    def move_data(self, place) -> None:
        """Put the data where place(array) -> copy says (model.pack_weights)."""
        self.buf = place(self.buf)

    def dequantize(self) -> np.ndarray:
        return dequantize_q80(self.to_blocks())

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"Q80Matrix({self.rows}x{self.cols}, {self.nbytes} bytes)"


def block_sums(xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """dx * sum_i x_i per Q80 block: [T, nb] f32 (the activation side of the offset term)."""
    t, n = xq.shape
    return xq.reshape(t, n // QK, QK).sum(axis=-1, dtype=np.int32).astype(np.float32) * xd


def add_offsets(out: np.ndarray, sums: np.ndarray, w: Q41Matrix) -> None:
    """out [T, rows] += sums [T, nb] @ offsets[rows, nb]^T."""
    out += sums @ w.offsets.T

"""Q41: GGML's Q4_1 blocks kept as they are at run time (no lossy Q4_1 -> Q4_0 requantisation).

A Q4_1 block (20 bytes: f16 d, f16 m, 16 nibble bytes in Q4_0's order) holds
w_i = d * q_i + m,  q_i in 0..15. Written as  d * (q_i - 8) + (m + 8d),  its dot with a Q80
activation block (dx, x_i) is

    d*dx * sum_i (q_i - 8) x_i   +   (m + 8d) * dx * sum_i x_i

The first term is exactly the Q40 kernel on the bytes (d, q): Q41Matrix reuses Q40Matrix and
its kernel. The second is a small [T, nb] x [nb, rows] product of per-block activation sums
with per-block offsets, done with BLAS.

Why: SmolLM2's GGUF is Q4_1. Requantising it to Q4_0 adds a second 4-bit rounding (~10%
relative error per matrix) and drops top-1 agreement with the F32 path to ~63% on real text;
keeping Q4_1 leaves only the Q80 activation rounding.
"""
from __future__ import annotations

import numpy as np

from .quant import Q40_BLOCK_BYTES, QK, Q40Matrix

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
    """W[rows, cols] from Q4_1 blocks: a Q40Matrix of (d, q) plus offsets (m + 8d) [rows, nb]."""

    __slots__ = ("rows", "cols", "nb", "q40", "offsets")

    def __init__(self, q40: Q40Matrix, offsets: np.ndarray):
        self.rows, self.cols, self.nb = q40.rows, q40.cols, q40.nb
        self.q40 = q40
        self.offsets = np.ascontiguousarray(offsets, dtype=np.float32)  # [rows, nb]

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
        d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        as_q40 = np.empty((rows, nb, Q40_BLOCK_BYTES), np.uint8)
        as_q40[:, :, 0:2] = b[:, :, 0:2]
        as_q40[:, :, 2:] = b[:, :, 4:]
        return cls(Q40Matrix.from_blocks(as_q40.reshape(rows, nb * Q40_BLOCK_BYTES)),
                   m + np.float32(8) * d)

    @property
    def nbytes(self) -> int:
        return self.q40.nbytes + self.offsets.nbytes

    def dequantize(self) -> np.ndarray:
        w = self.q40.dequantize().reshape(self.rows, self.nb, QK)
        return (w + self.offsets[:, :, None]).reshape(self.rows, self.cols)


def block_sums(xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """dx * sum_i x_i per Q80 block: [T, nb] f32 (the activation side of the offset term)."""
    t, n = xq.shape
    return xq.reshape(t, n // QK, QK).sum(axis=-1, dtype=np.int32).astype(np.float32) * xd


def add_offsets(out: np.ndarray, sums: np.ndarray, w: Q41Matrix) -> None:
    """out [T, rows] += sums [T, nb] @ offsets[rows, nb]^T."""
    out += sums @ w.offsets.T

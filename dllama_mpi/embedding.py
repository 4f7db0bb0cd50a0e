"""Token embedding rows: read on the root as the file stores them, decoded alike on every rank."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .quant import dequantize_q80


class Embedding:
    """Token embedding rows. The root reads a token's row as the file stores it (block bytes
    or values): that is what crosses MPI (Q4_0: 18 bytes per 32 values instead of 128 as
    f32), and every rank turns it into f32 the same way, so all hold the same bits."""

    def __init__(self, codec: tuple, tensor=None):
        """codec: (GGML type name, row dtype, row shape), from `codec` on the root; tensor:
        the file's embedding tensor (root only)."""
        self.type, dtype, row_shape = codec
        self.dtype, self.row_shape, self.tensor = np.dtype(dtype), tuple(row_shape), tensor
        self.ggml_type = GGMLQuantizationType[self.type]

    @classmethod
    def of(cls, tensor) -> "Embedding":
        row = np.asarray(tensor.data[0:1])
        return cls((tensor.type, row.dtype.str, row.shape[1:]), tensor)

    @property
    def codec(self) -> tuple:
        return self.type, self.dtype.str, self.row_shape

    def rows(self, ids) -> np.ndarray:
        """Root: the stored rows of these token ids."""
        return np.ascontiguousarray(self.tensor.data[np.asarray(ids, np.int64)], dtype=self.dtype)

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n,) + self.row_shape, self.dtype)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows -> f32 [T, dim]."""
        if self.type == "Q8_0":  # the common case, without the generic path's overhead
            return dequantize_q80(rows)
        from gguf.quants import dequantize
        return np.ascontiguousarray(dequantize(rows, self.ggml_type), dtype=np.float32)

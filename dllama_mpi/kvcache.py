"""Per-rank K/V storage: this rank's KV heads, every layer, every position, for n_slots
sequences decoded together (one slot per sequence).

In RAM, or in memory-mapped files (one per rank) when a directory is given.
Knows nothing of MPI or models.
"""
from __future__ import annotations

import os

import numpy as np


class KVCache:
    def __init__(self, n_layers: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 directory: str | None = None, tag: str = "rank0", n_slots: int = 1):
        shape = (n_layers, n_slots, max_seq_len, n_kv_heads, head_dim)  # [L, slot, S, kv, hd]
        self.max_seq_len, self.n_slots = max_seq_len, n_slots
        self.paths: list[str] = []
        if directory is None:
            self.k = np.zeros(shape, np.float32)
            self.v = np.zeros(shape, np.float32)
        else:
            os.makedirs(directory, exist_ok=True)
            self.paths = [os.path.join(directory, f"kv-{tag}-{name}.bin") for name in "kv"]
            self.k, self.v = (np.memmap(p, np.float32, "w+", shape=shape) for p in self.paths)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of one layer: [slot, S, kv, hd] views."""
        return self.k[index], self.v[index]

    def copy_prefix(self, src: int, dst: int, n_positions: int) -> None:
        """Positions 0..n_positions-1 of slot src, every layer, into slot dst."""
        self.k[:, dst, :n_positions] = self.k[:, src, :n_positions]
        self.v[:, dst, :n_positions] = self.v[:, src, :n_positions]

    def close(self) -> None:
        for p in self.paths:
            try:
                os.remove(p)
            except OSError:
                pass
        self.paths = []

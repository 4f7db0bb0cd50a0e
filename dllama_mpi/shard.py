"""The tensor-parallel split, as pure functions of (config, rank, size).

Weights are W[out, in].
- out-split: a rank owns a band of output rows (wq, wk, wv, w1, w3, wcls);
- in-split:  a rank owns a band of input columns and produces a partial sum (wo, w2).

Attention is split by query heads: contiguous ranges, the first n_heads % size ranks
get one more. A rank holds every KV head its query heads need, so with more ranks than
KV heads a KV head can live on two ranks. FFN hidden units and vocabulary rows are split
in whole 32-blocks, remainder to the first ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig

BLOCK = 32


@dataclass(frozen=True)
class Range:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_slice(self) -> slice:
        return slice(self.start, self.stop)

    def scaled(self, k: int) -> "Range":
        return Range(self.start * k, self.stop * k)


def split_even(n: int, size: int, rank: int) -> Range:
    """Contiguous split of n items; the first n % size ranks get one more."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return Range(start, start + base + (1 if rank < extra else 0))


def split_blocks(n: int, size: int, rank: int, block: int = BLOCK) -> Range:
    """Split n items in whole blocks (the last block may be partial), remainder blocks first."""
    nblocks = -(-n // block)
    b = split_even(nblocks, size, rank)
    return Range(min(b.start * block, n), min(b.stop * block, n))


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    q_heads: Range          # global query heads owned
    kv_heads: Range         # global KV heads held (those the query heads need)
    head_dim: int
    group: int              # query heads per KV head
    ffn: Range              # FFN hidden units owned
    vocab: Range            # output vocabulary rows owned

    @property
    def q_rows(self) -> Range:
        """Rows of wq (out-split) == columns of wo (in-split)."""
        return self.q_heads.scaled(self.head_dim)

    @property
    def kv_rows(self) -> Range:
        return self.kv_heads.scaled(self.head_dim)

    @property
    def q_cols(self) -> int:
        return self.q_rows.size

    @property
    def ffn_len(self) -> int:
        return self.ffn.size

    def kv_of_q(self) -> np.ndarray:
        """For each local query head, the index of its KV head in this rank's KV slice."""
        q = np.arange(self.q_heads.start, self.q_heads.stop)
        return (q // self.group - self.kv_heads.start).astype(np.int32)


def plan(config: ModelConfig, rank: int, size: int) -> ShardPlan:
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    if size > config.n_heads:
        raise ValueError(f"{size} ranks > {config.n_heads} query heads")
    group = config.group
    q = split_even(config.n_heads, size, rank)
    kv = Range(q.start // group, (q.stop - 1) // group + 1)
    return ShardPlan(rank=rank, size=size, q_heads=q, kv_heads=kv, head_dim=config.head_dim,
                     group=group, ffn=split_blocks(config.hidden_dim, size, rank),
                     vocab=split_blocks(config.vocab_size, size, rank))


def out_split(w: np.ndarray, rows: Range) -> np.ndarray:
    """Band of output rows of W[out, in] (any row-major storage, e.g. Q40 block bytes)."""
    return w[rows.as_slice()]


def in_split(w: np.ndarray, cols: Range, block_bytes: int | None = None) -> np.ndarray:
    """Band of input columns of W[out, in]. For block-quantised rows (block_bytes per 32
    values) the band must be whole blocks and is cut from the byte rows."""
    if block_bytes is None:
        return w[:, cols.as_slice()]
    if cols.start % BLOCK or cols.stop % BLOCK:
        raise ValueError(f"in-split of quantised rows needs whole blocks, got {cols}")
    return w[:, cols.start // BLOCK * block_bytes: cols.stop // BLOCK * block_bytes]

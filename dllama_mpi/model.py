"""The Llama forward pass for one rank's shard, top to bottom. No I/O.

Every rank holds the full residual x [T, dim] and its own slice of every matrix
(see shard.py): attention heads q_heads, KV heads kv_heads, FFN units ffn, vocab rows.
Two reductions per layer: after wo and after w2 (both in-split: partial sums).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .config import ModelConfig
from .qformats import Q41Matrix, Q80Matrix, block_sums
from .quant import QK, Q40Matrix
from .shard import ShardPlan

Matrix = "np.ndarray | Q40Matrix | Q41Matrix"  # f32 [out, in] or a 4-bit runtime form


@dataclass
class LayerWeights:
    attn_norm: np.ndarray   # f32 [dim]
    wq: Matrix              # out-split [q_cols, dim]
    wk: Matrix              # out-split [kv_cols, dim]
    wv: Matrix              # out-split [kv_cols, dim]
    wo: Matrix              # in-split  [dim, q_cols]
    ffn_norm: np.ndarray    # f32 [dim]
    w1: Matrix              # out-split [ffn, dim]  (gate)
    w2: Matrix              # in-split  [dim, ffn]  (down)
    w3: Matrix              # out-split [ffn, dim]  (up)
    bq: np.ndarray | None = None      # f32 [q_cols]  q/k/v biases (Qwen2), out-split like
    bk: np.ndarray | None = None      # f32 [kv_cols] the rows of wq/wk/wv (bq, bk in the
    bv: np.ndarray | None = None      # f32 [kv_cols] interleaved rope order of those rows)
    q_norm: np.ndarray | None = None  # f32 [head_dim] per-head RMSNorm weights of q and k
    k_norm: np.ndarray | None = None  # f32 [head_dim] (Qwen3), replicated


@dataclass
class ShardWeights:
    layers: list[LayerWeights]
    final_norm: np.ndarray  # f32 [dim]
    wcls: Matrix            # out-split [vocab rows, dim]

    def nbytes(self) -> int:
        def size(m):
            return m.nbytes
        total = size(self.final_norm) + size(self.wcls)
        for lw in self.layers:
            total += sum(size(getattr(lw, f)) for f in lw.__dataclass_fields__
                         if getattr(lw, f) is not None)
        return total


def rope_tables(config: ModelConfig, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_seq_len, head_dim/2] for interleaved-pair rope (f64 math, f32 table)."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) * 2 / config.head_dim)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Input:
    """A matmul input: f32 rows, and their Q80 form made once, when a quantised weight asks."""

    def __init__(self, x: np.ndarray, q80: tuple[np.ndarray, np.ndarray] | None = None):
        """q80: the Q80 form of x when already made (kernels.rmsnorm_q80 / silu_mul_q80)."""
        self.x = x
        self._q80 = q80

    def q80(self) -> tuple[np.ndarray, np.ndarray]:
        if self._q80 is None:
            t, n = self.x.shape
            qs, d = np.empty((t, n), np.int8), np.empty((t, n // QK), np.float32)
            kernels.quantize_q80_act(qs, d, self.x)
            self._q80 = (qs, d)
        return self._q80

    def block_sums(self) -> np.ndarray:
        return block_sums(*self.q80())


def matmul(out: np.ndarray, inp: _Input, w) -> np.ndarray:
    """out [T, rows] = inp [T, cols] @ w[rows, cols]^T."""
    tw = type(w)
    if tw is Q41Matrix:
        kernels.matmul_q80_q41(out, *inp.q80(), w)
    elif tw is Q40Matrix:
        kernels.matmul_q80_q40(out, *inp.q80(), w)
    elif tw is Q80Matrix:
        kernels.matmul_q80_q80(out, *inp.q80(), w)
    else:
        kernels.matmul_f32(out, inp.x, w)
    return out


class Transformer:
    def __init__(self, config: ModelConfig, plan: ShardPlan, weights: ShardWeights,
                 kv_cache, comm, wire: str = "f32"):
        self.config, self.plan, self.w = config, plan, weights
        self.kv, self.comm, self.wire = kv_cache, comm, wire
        self.cos, self.sin = rope_tables(config, kv_cache.max_seq_len)
        self.kv_of_q = plan.kv_of_q()
        # 4-bit layers take Q80 inputs: norm and silu·mul then quantise in the same pass
        self.fuse_q80 = bool(weights.layers) and isinstance(weights.layers[0].wq,
                                                            (Q40Matrix, Q41Matrix))
        self.scale = 1.0 / np.sqrt(config.head_dim)
        self.vocab_counts = None  # set by the loader: vocab rows per rank, for the gather
        self._buffers: dict[int, dict[str, np.ndarray]] = {}

    def _buf(self, t: int) -> dict[str, np.ndarray]:
        b = self._buffers.get(t)
        if b is None:
            c, p = self.config, self.plan
            shapes = dict(xb=c.dim, q=p.q_cols, k=p.kv_rows.size, v=p.kv_rows.size,
                          att=p.q_cols, attn_out=c.dim, h1=p.ffn_len, h3=p.ffn_len,
                          h=p.ffn_len, ffn_out=c.dim)
            b = {name: np.zeros((t, n), np.float32) for name, n in shapes.items()}
            if self.fuse_q80:
                for name, n in (("xb", c.dim), ("h", p.ffn_len)):
                    b[name + "_q"] = np.zeros((t, n), np.int8)
                    b[name + "_d"] = np.zeros((t, n // QK), np.float32)
            self._buffers[t] = b
        return b

    def _normed(self, b, x: np.ndarray, weight: np.ndarray) -> _Input:
        """rmsnorm(x) * weight into b["xb"] (and its Q80 form when the weights are 4-bit)."""
        eps = self.config.norm_eps
        if self.fuse_q80:
            kernels.rmsnorm_q80(b["xb"], b["xb_q"], b["xb_d"], x, weight, eps)
            return _Input(b["xb"], (b["xb_q"], b["xb_d"]))
        kernels.rmsnorm(b["xb"], x, weight, eps)
        return _Input(b["xb"])

    def _silu_mul(self, b) -> _Input:
        """silu(h1) * h3 into b["h"] (and its Q80 form when the weights are 4-bit)."""
        if self.fuse_q80:
            kernels.silu_mul_q80(b["h"], b["h_q"], b["h_d"], b["h1"], b["h3"])
            return _Input(b["h"], (b["h_q"], b["h_d"]))
        kernels.silu_mul(b["h"], b["h1"], b["h3"])
        return _Input(b["h"])

    def forward(self, x: np.ndarray, positions: np.ndarray, all_logits: bool = False):
        """x [T, dim] embedded tokens at positions [T] -> logits [T or 1, vocab] on root
        (None on other ranks)."""
        c, hd = self.config, self.config.head_dim
        t = x.shape[0]
        x = np.array(x, dtype=np.float32, copy=True)
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        if positions[-1] >= self.kv.max_seq_len:
            raise ValueError(f"position {positions[-1]} beyond the KV cache "
                             f"({self.kv.max_seq_len} positions)")
        b = self._buf(t)
        for index, lw in enumerate(self.w.layers):
            # attention: x += wo · attention(rope(q), rope(k), v), where q = wq·xb [+ bq]
            # [then RMSNorm per head], k likewise, v = wv·xb [+ bv]
            xb = self._normed(b, x, lw.attn_norm)
            matmul(b["q"], xb, lw.wq)
            matmul(b["k"], xb, lw.wk)
            matmul(b["v"], xb, lw.wv)
            if c.attn_bias:
                b["q"] += lw.bq
                b["k"] += lw.bk
                b["v"] += lw.bv
            if c.qk_norm:  # RMSNorm of each head's q and k: rows of head_dim
                q_heads, k_heads = b["q"].reshape(-1, hd), b["k"].reshape(-1, hd)
                kernels.rmsnorm(q_heads, q_heads, lw.q_norm, c.norm_eps)
                kernels.rmsnorm(k_heads, k_heads, lw.k_norm, c.norm_eps)
            kernels.rope_interleaved(b["q"], positions, self.cos, self.sin, hd)
            kernels.rope_interleaved(b["k"], positions, self.cos, self.sin, hd)
            k_cache, v_cache = self.kv.layer(index)            # [S, kv, hd]
            k_cache[positions] = b["k"].reshape(t, -1, hd)
            v_cache[positions] = b["v"].reshape(t, -1, hd)
            kernels.attention(b["att"], b["q"], k_cache, v_cache, positions,
                              self.kv_of_q, self.scale)
            matmul(b["attn_out"], _Input(b["att"]), lw.wo)
            x += self.comm.allreduce_sum(b["attn_out"], self.wire)
            # feed-forward: x += w2 · (silu(w1·xb) * w3·xb)
            xb = self._normed(b, x, lw.ffn_norm)
            matmul(b["h1"], xb, lw.w1)
            matmul(b["h3"], xb, lw.w3)
            matmul(b["ffn_out"], self._silu_mul(b), lw.w2)
            x += self.comm.allreduce_sum(b["ffn_out"], self.wire)
        rows = x if all_logits else x[-1:]
        final = np.empty_like(rows)
        kernels.rmsnorm(final, rows, self.w.final_norm, c.norm_eps)
        logits = np.empty((rows.shape[0], self.plan.vocab.size), np.float32)
        matmul(logits, _Input(final), self.w.wcls)
        counts = self.vocab_counts or [self.plan.vocab.size]
        return self.comm.gather_rows(logits, counts)

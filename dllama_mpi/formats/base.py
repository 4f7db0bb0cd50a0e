"""What every model format gives the loader.

A model file object has:
  path, format            where it came from
  config                  ModelConfig (q/k rows in interleaved-pair rope order, as GGUF)
  tensor(name) -> Tensor  canonical names: "embedding", "final_norm", "wcls",
                          "layers.{i}.{attn_norm,wq,wk,wv,wo,ffn_norm,w1,w2,w3}" (with experts
                          "layers.{i}.router" [n_experts, dim] and
                          "layers.{i}.experts.{e}.{w1,w2,w3}" instead of w1, w2, w3), and with
                          config.attn_bias "layers.{i}.{bq,bk,bv}" (Qwen2), with
                          config.qk_norm "layers.{i}.{q_norm,k_norm}" [head_dim] (Qwen3);
                          bq, bk and the q/k norms permuted like the wq/wk rows
  preferred_weight_type() runtime type that loses nothing more than the file ("q40"/"q41"/"f32")
  output_type()           GGML type name of the output matrix (the embedding when tied)
  tokenizer()             dllama_mpi.tokenizer.Tokenizer, or a DllamaError
  close()

A Tensor is W[out, in] (or a vector) of one GGML type, read by bands so that a rank
touches only its slice.

Shared by the readers and writers: the magic numbers `open_model` detects formats by,
`expected_shapes` (what a Llama of a config must hold), `rope_permutation` /
`qk_row_permutation` (rotate-half -> interleaved-pair q/k rows), `LazyRows` (an array-like of
rows read on demand, with an optional row permutation and conversion), `llama3_rope_factors`
(llama3 rope scaling as per-pair frequency divisors) and `load_tokenizer_file`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import DllamaError

FLOAT_TYPES = ("F32", "F16", "BF16")
DLLAMA_MAGIC = 0x0A00ABCD  # Distributed Llama .m (int32)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class Tensor:
    """A tensor whose data is an array-like (np.memmap, h5py dataset, ...) of rows:
    [out, bytes per row] uint8 for block-quantised types, [out, in] values otherwise."""

    def __init__(self, name: str, type_name: str, shape: tuple[int, ...], data):
        self.name, self.type, self.shape, self.data = name, type_name, tuple(shape), data
        self.ggml_type = GGMLQuantizationType[type_name]

    @property
    def quantised(self) -> bool:
        return self.type not in FLOAT_TYPES

    @property
    def _bytes(self) -> bool:
        """Values held as raw bytes (BF16 in a GGUF: [out, 2 * in] uint8): columns are cut
        like blocks of one value."""
        return self.type == "BF16" and np.dtype(self.data.dtype) == np.uint8

    @property
    def block(self) -> tuple[int, int]:
        """(values, bytes) per block."""
        return GGML_QUANT_SIZES[self.ggml_type]

    def expert(self, e: int) -> "Tensor":
        """Expert e of a 3-D tensor [experts, out, in] (GGUF's ffn_*_exps) as a 2-D Tensor."""
        return Tensor(f"{self.name}[{e}]", self.type, self.shape[1:], self.data[e])

    def read(self, rows=None, cols=None) -> np.ndarray:
        """Raw rows [rows, cols] (Range or None for all): block bytes for quantised types
        (cols must then be whole blocks), values otherwise."""
        r = slice(None) if rows is None else rows.as_slice()
        if cols is None or len(self.shape) == 1:
            return np.asarray(self.data[r])
        if not self.quantised and not self._bytes:
            return np.asarray(self.data[r, cols.as_slice()])
        values, nbytes = self.block
        if cols.start % values or cols.stop % values:
            raise ValueError(f"{self.name}: columns {cols.start}:{cols.stop} are not whole "
                             f"{self.type} blocks")
        return np.asarray(self.data[r, cols.start // values * nbytes: cols.stop // values * nbytes])


def load_tokenizer_file(path: str):
    """A tokenizer from a .t file or a tokenizer.json."""
    from ..tokenizer import Tokenizer
    if not os.path.isfile(path):
        raise DllamaError(f"tokenizer file not found: {path}")
    try:
        if path.endswith(".json"):
            return Tokenizer.from_hf_files(path)
        return Tokenizer.from_dllama_t(path)
    except ValueError as e:
        raise DllamaError(str(e)) from None


def expected_shapes(c) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape every model of config `c` holds (wcls only when untied;
    q/k/v biases with c.attn_bias, q/k norms with c.qk_norm)."""
    out = {"embedding": (c.vocab_size, c.dim), "final_norm": (c.dim,)}
    if not c.tied_embeddings:
        out["wcls"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        out.update({p + "attn_norm": (c.dim,), p + "ffn_norm": (c.dim,),
                    p + "wq": (c.q_dim, c.dim), p + "wk": (c.kv_dim, c.dim),
                    p + "wv": (c.kv_dim, c.dim), p + "wo": (c.dim, c.q_dim)})
        ffn = [""] if not c.n_experts else [f"experts.{e}." for e in range(c.n_experts)]
        if c.n_experts:
            out[p + "router"] = (c.n_experts, c.dim)
        for f in ffn:
            out.update({p + f + "w1": (c.hidden_dim, c.dim), p + f + "w3": (c.hidden_dim, c.dim),
                        p + f + "w2": (c.dim, c.hidden_dim)})
        if c.attn_bias:
            out.update({p + "bq": (c.q_dim,), p + "bk": (c.kv_dim,), p + "bv": (c.kv_dim,)})
        if c.qk_norm:
            out.update({p + "q_norm": (c.head_dim,), p + "k_norm": (c.head_dim,)})
    return out


def rope_permutation(c, name: str) -> np.ndarray | None:
    """For a tensor stored in rotate-half (Hugging Face) order: the row permutation that
    puts it in the interleaved-pair order we run (see qk_row_permutation), or None for
    tensors rope does not touch. q/k rows and biases are permuted per head; the per-head
    q/k norm weights [head_dim] like the rows of one head."""
    short = name.rsplit(".", 1)[-1]
    if short in ("wq", "bq"):
        return qk_row_permutation(c.q_dim, c.n_heads)
    if short in ("wk", "bk"):
        return qk_row_permutation(c.kv_dim, c.n_kv_heads)
    if short in ("q_norm", "k_norm"):
        return qk_row_permutation(c.head_dim, 1)
    return None


def qk_row_permutation(n_rows: int, n_heads: int) -> np.ndarray:
    """perm[r] = the rotate-half (HF) row that interleaved-pair (GGUF) row r comes from:
    within a head of hd rows, row 2i <- i and row 2i+1 <- i + hd/2 (like permute_qk)."""
    hd = n_rows // n_heads
    r = np.arange(n_rows)
    head, j = divmod(r, hd)
    return head * hd + np.where(j % 2 == 0, j // 2, j // 2 + hd // 2)


class LazyRows:
    """Array-like [rows, cols] read on demand through `fetch(row_start, row_stop, col_slice)`.

    Supports what readers of base.Tensor do: `a[rows]`, `a[rows, cols]` with slices, and
    `a[ids]` with an integer array (any order, repeats allowed). `perm` (see
    qk_row_permutation) makes row r of this array row perm[r] of the source; a band of
    whole heads is a permutation of the same band, so it is still one contiguous read.
    `convert` is applied to what fetch returns (e.g. bf16 bits -> float32)."""

    def __init__(self, shape, dtype, fetch, perm: np.ndarray | None = None, convert=None):
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self._fetch, self._perm, self._convert = fetch, perm, convert

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def _read(self, start: int, stop: int, cols) -> np.ndarray:
        a = self._fetch(start, stop, cols)
        return self._convert(a) if self._convert is not None else np.asarray(a)

    def __getitem__(self, key):
        rows, cols = (key if isinstance(key, tuple) else (key, slice(None)))
        if len(self.shape) == 1:
            cols = None
        if isinstance(rows, (int, np.integer)):
            return self[np.asarray([rows]), cols][0] if cols is not None else \
                self[np.asarray([rows])][0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise IndexError("LazyRows: row slices must have step 1")
            src = np.arange(start, stop) if self._perm is None else self._perm[start:stop]
        else:
            src = np.asarray(rows, dtype=np.int64).reshape(-1)
            if src.size and (src.min() < 0 or src.max() >= self.shape[0]):
                raise IndexError(f"row index out of range 0..{self.shape[0] - 1}")
            if self._perm is not None:
                src = self._perm[src]
        if src.size == 0:
            return self._read(0, 0, cols)
        lo, hi = int(src.min()), int(src.max()) + 1
        if hi - lo <= 4 * src.size:  # one contiguous read, then pick
            block = self._read(lo, hi, cols)
            if hi - lo == src.size and np.array_equal(src, np.arange(lo, hi)):
                return block
            return block[src - lo]
        parts = {int(r): self._read(int(r), int(r) + 1, cols) for r in np.unique(src)}
        return np.concatenate([parts[int(r)] for r in src])


def llama3_rope_factors(rope_scaling: Mapping[str, Any], *, head_dim: int, rope_theta: float) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp writes for ``rope_type == "llama3"`` (float32, [head_dim/2]).

    Same float32 arithmetic as ``LlamaModel.generate_extra_tensors`` in convert_hf_to_gguf.py.
    llama.cpp divides each rope frequency by the factor: ``theta_i = pos * base^(-2i/d) / f_i``.
    """
    f32 = np.float32
    freqs = f32(1.0) / (f32(rope_theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)))
    factor = rope_scaling.get("factor", 8.0)
    low = rope_scaling.get("low_freq_factor", 1.0)
    high = rope_scaling.get("high_freq_factor", 4.0)
    old_ctx = rope_scaling.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    out = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (f32(old_ctx) / wavelen - f32(low)) / f32(high - low)
            out.append(f32(1) / ((f32(1) - smooth) / f32(factor) + smooth))
    return np.asarray(out, dtype=np.float32)

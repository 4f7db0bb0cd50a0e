"""Model file formats. `open_model(path)` picks the reader by content:

  GGUF (llama.cpp)            magic b"GGUF"                     formats/gguf.py
  Distributed Llama .m        int32 magic 0x0A00ABCD            formats/dllama.py (+ .t tokenizer)
  Hugging Face folder         a directory with config.json      formats/hf.py
  our HDF5 model store        the HDF5 signature                formats/hdf5.py

Every reader gives the interface of formats/base.py. The helpers below are shared by them:
`expected_shapes` (what a Llama of a config must hold) and `LazyRows` (an array-like of
rows read on demand, with an optional row permutation and conversion).
"""
from __future__ import annotations

import os
import struct

import numpy as np

from ..errors import DllamaError

DLLAMA_MAGIC = 0x0A00ABCD
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def detect_format(path: str) -> str:
    """'gguf' | 'dllama' | 'hf' | 'hdf5', or a DllamaError."""
    if not os.path.exists(path):
        raise DllamaError(f"model not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf"
        raise DllamaError(f"{path} is a directory without config.json: not a Hugging Face model "
                          f"folder")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if head == HDF5_SIGNATURE:
        return "hdf5"
    if len(head) >= 4 and struct.unpack("<i", head[:4])[0] == DLLAMA_MAGIC:
        return "dllama"
    if len(head) >= 4 and struct.unpack("<i", head[:4])[0] in (0xABCD00, 0xABCD01):
        raise DllamaError(f"{path}: old Distributed Llama model format (magic "
                          f"{struct.unpack('<i', head[:4])[0]:#x}); reconvert it")
    if path.endswith(".m"):
        return "dllama"  # its reader says what is wrong with the magic
    if os.path.basename(path) == "config.json":
        return "hf"
    raise DllamaError(f"{path}: unknown model format (not GGUF, Distributed Llama .m, HDF5 or a "
                      f"Hugging Face folder; first bytes {head[:8]!r})")


def open_model(path: str, tokenizer_path: str | None = None):
    """Open any supported model file or folder. `tokenizer_path`: a Distributed Llama .t (or a
    tokenizer.json) to use instead of (or, for .m files, in the absence of) the model's own."""
    kind = detect_format(os.fspath(path))
    if kind == "gguf":
        from .gguf import GGUFModel
        model = GGUFModel(path)
    elif kind == "dllama":
        from .dllama import DllamaModel
        model = DllamaModel(path, tokenizer_path)
        tokenizer_path = None
    elif kind == "hf":
        from .hf import HFModel
        model = HFModel(os.path.dirname(path) if os.path.isfile(path) else path)
    else:
        from .hdf5 import H5Model
        model = H5Model(path)
    if tokenizer_path is not None:
        _override_tokenizer(model, tokenizer_path)
    return model


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


def _override_tokenizer(model, tokenizer_path: str) -> None:
    tok = load_tokenizer_file(tokenizer_path)
    model.tokenizer = lambda: tok


# --------------------------------------------------------------------------- shared helpers

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
                    p + "wv": (c.kv_dim, c.dim), p + "wo": (c.dim, c.q_dim),
                    p + "w1": (c.hidden_dim, c.dim), p + "w3": (c.hidden_dim, c.dim),
                    p + "w2": (c.dim, c.hidden_dim)})
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

"""What every model format gives the loader.

A model file object has:
  path, format            where it came from
  config                  ModelConfig (q/k rows in interleaved-pair rope order, as GGUF)
  tensor(name) -> Tensor  canonical names: "embedding", "final_norm", "wcls",
                          "layers.{i}.{attn_norm,wq,wk,wv,wo,ffn_norm,w1,w2,w3}", and with
                          config.attn_bias "layers.{i}.{bq,bk,bv}" (Qwen2), with
                          config.qk_norm "layers.{i}.{q_norm,k_norm}" [head_dim] (Qwen3);
                          bq, bk and the q/k norms permuted like the wq/wk rows
  preferred_weight_type() runtime type that loses nothing more than the file ("q40"/"q41"/"f32")
  output_type()           GGML type name of the output matrix (the embedding when tied)
  tokenizer()             dllama_mpi.tokenizer.Tokenizer, or a DllamaError
  close()

A Tensor is W[out, in] (or a vector) of one GGML type, read by bands so that a rank
touches only its slice.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

FLOAT_TYPES = ("F32", "F16", "BF16")


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

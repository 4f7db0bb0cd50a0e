"""Model file formats. `open_model(path)` picks the reader by content:

  GGUF (llama.cpp)            magic b"GGUF"                     formats/gguf.py
  Distributed Llama .m        int32 magic 0x0A00ABCD            formats/dllama.py (+ .t tokenizer)
  Hugging Face folder         a directory with config.json      formats/hf.py
  our HDF5 model store        the HDF5 signature                formats/hdf5.py

Every reader gives the interface of formats/base.py, which also holds the helpers they
share (re-exported here). The tokenizer files (.t, tokenizer.json) are read by the tokenizer
package; formats imports it, never the other way round.
"""
from __future__ import annotations

import os
import struct

from ..errors import DllamaError
from .base import (DLLAMA_MAGIC, HDF5_SIGNATURE, LazyRows, expected_shapes, llama3_rope_factors,
                   load_tokenizer_file, qk_row_permutation, rope_permutation)

__all__ = ["open_model", "detect_format", "load_tokenizer_file", "expected_shapes",
           "rope_permutation", "qk_row_permutation", "LazyRows", "llama3_rope_factors",
           "DLLAMA_MAGIC", "HDF5_SIGNATURE"]


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


def _override_tokenizer(model, tokenizer_path: str) -> None:
    tok = load_tokenizer_file(tokenizer_path)
    model.tokenizer = lambda: tok

"""Test and benchmark fixtures: synthetic GGUF models. Only tests/ and bench/ import this
package; nothing the runtime runs does.

  gguf_writer.py    write_llama_gguf: a llama / qwen2 / qwen3 / qwen3moe GGUF as llama.cpp's
                    converter writes it, tensor by tensor (K-quants and llama.cpp's Q4_K_M mix
                    too); split_gguf: the same file as a split GGUF
  kquants.py        Q4_K / Q5_K / Q6_K quantisers and random valid K-quant blocks
  llama_tensors.py  the tensor layout in Hugging Face naming, permute_qk, random weights made
                    on access
  bpe_vocab.py      the synthetic "bytes" vocabulary (a byte-level BPE trained on a fixed text)
"""

from .bpe_vocab import CHATML_TEMPLATE, byte_bpe_vocab
from .gguf_writer import FILE_TYPES, WEIGHT_TYPES, split_gguf, write_llama_gguf
from .llama_tensors import (LazyTensors, TensorSpec, llama_tensor_specs, permute_qk,
                            random_llama_tensors, unpermute_qk)

__all__ = ["write_llama_gguf", "split_gguf", "WEIGHT_TYPES", "FILE_TYPES", "random_llama_tensors", "LazyTensors",
           "TensorSpec", "llama_tensor_specs", "permute_qk", "unpermute_qk", "byte_bpe_vocab",
           "CHATML_TEMPLATE"]

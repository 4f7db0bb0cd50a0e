"""Tokenizer: text <-> token ids, chat templates and streaming detokenization.

The tokenizer is a Hugging Face ``tokenizers.Tokenizer`` built from a vocabulary description;
no BPE is implemented here.  One module each:

  core.py           the Tokenizer class (encode/decode, chat template, constructors)
  bpe.py            the ``tokenizers`` pipelines (byte-level BPE with llama.cpp's pre-tokenizer
                    regexes, SentencePiece BPE), token types, GPT-2's byte alphabet
  gguf_vocab.py     a vocabulary from GGUF metadata (read through formats/gguf_header.py)
  hf_json.py        a vocabulary from tokenizer.json + tokenizer_config.json
  dllama_t.py       Distributed Llama's .t file: read, pack, vocabulary
  chat_template.py  Jinja chat templates rendered as transformers does
  stream.py         IncrementalDecoder: streaming detokenization

Imports point down: formats/ uses the tokenizer; the tokenizer uses only formats/gguf_header.py
(a leaf: the GGUF header parser), and only when given a GGUF path.
"""

from .bpe import PRE_TOKENIZER_TYPES, TOKEN_TYPE, bytes_to_unicode
from .core import Tokenizer
from .dllama_t import TFile, read_dllama_t
from .stream import IncrementalDecoder

__all__ = ["Tokenizer", "IncrementalDecoder", "PRE_TOKENIZER_TYPES", "TOKEN_TYPE", "bytes_to_unicode",
           "TFile", "read_dllama_t"]

"""A vocabulary from GGUF metadata (``tokenizer.ggml.*``): the arguments of a Tokenizer.

Two tokenizer models are supported: ``gpt2`` (byte-level BPE with merges, the pre-tokenizer
named by ``tokenizer.ggml.pre``) and ``llama`` (SentencePiece BPE: scores, token types,
byte-fallback tokens, ``add_space_prefix``; merges from the file when it has them, else
derived from the scores).  See bpe.py for the pipelines.

The metadata is read through formats/gguf_header.py's header reader: the header a GGUFModel
has already parsed (no second parse of the file), or one parsed here from a path.  Big arrays
(tokens, merges, scores) are read when asked for.  An open ``gguf.GGUFReader`` is accepted too.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .bpe import CONTROL, END_OF_TURN_TOKENS, NORMAL, build_byte_level_bpe, build_sentencepiece_bpe


class GGUFMetadata:
    """Read access to GGUF key/values: ``get(key, default)`` (arrays as lists, strings decoded),
    ``get_numbers(key)`` (a numeric array as a list, or None); ``where`` names the file."""

    def __init__(self, get: Callable[..., Any], get_numbers: Callable[[str], Any], where: str):
        self.get, self.get_numbers, self.where = get, get_numbers, where


def gguf_metadata(source) -> GGUFMetadata:
    """``source``: a file path, a parsed header (formats.gguf_header.GGUFHeader, ``GGUFModel.header``)
    or an open ``gguf.GGUFReader``."""
    import gguf

    if isinstance(source, gguf.GGUFReader):
        return _reader_metadata(source, str(getattr(source, "path", None) or "GGUF file"))
    if isinstance(source, (str, os.PathLike)):
        return _path_metadata(os.fspath(source))
    if callable(getattr(source, "value", None)):
        return _header_metadata(source, str(getattr(source, "path", None) or "GGUF file"))
    raise TypeError(f"expected a path, a GGUF header or a gguf.GGUFReader, got {type(source).__name__}")


def _header_metadata(header, where: str) -> GGUFMetadata:
    return GGUFMetadata(header.value, header.value, where)


def _path_metadata(path: str) -> GGUFMetadata:
    # GGUF parsing belongs to formats/gguf_header.py (a leaf module: it imports nothing else from
    # the package); imported here, when a path is given, not when the tokenizer is imported.
    from ..formats.gguf_header import GGUFHeader, UnsupportedGGUF

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return _header_metadata(GGUFHeader(path, metadata_only=True, errors="replace"), path)
    except UnsupportedGGUF:
        pass
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    import gguf

    try:  # unusual files (big-endian, other versions): let the gguf package try
        return _reader_metadata(gguf.GGUFReader(path, "r"), path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def _reader_metadata(reader, where: str) -> GGUFMetadata:
    return GGUFMetadata(lambda key, default=None: _reader_value(reader, key, default),
                        lambda key: _reader_numbers(reader, key), where)


def _reader_value(reader, key: str, default=None):
    """A gguf.GGUFReader value as a Python object (str, int, float, bool, or list of those)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    types = field.types
    if not types:
        return default
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[-1] == GGUFValueType.STRING:
            parts = field.parts
            return [bytes(parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if len(types) > 2:
            raise ValueError(f"GGUF key {key}: nested arrays are not supported")
        return _reader_numbers(reader, key)
    value = field.parts[field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    v = value.tolist()
    v = v[0] if isinstance(v, list) and len(v) == 1 else v
    if types[0] == GGUFValueType.BOOL:
        return bool(v)
    return v


def _reader_numbers(reader, key: str):
    """A gguf.GGUFReader numeric array as a flat Python list, read in one go (types, scores)."""
    import numpy as np

    field = reader.fields.get(key)
    if field is None:
        return None
    if not field.data:
        return []
    parts = field.parts
    return np.concatenate([parts[i] for i in field.data]).tolist()


def gguf_tokenizer_args(meta: GGUFMetadata) -> dict[str, Any]:
    """The Tokenizer arguments (hf pipeline, vocab_size, bos/eos ids, add_bos, chat template,
    special token texts) described by ``meta``.  Raises ``ValueError`` when the file has no
    tokenizer or one of an unsupported kind."""
    where = meta.where
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(
            f"{where}: no tokenizer in this GGUF file (tokenizer.ggml.model / tokenizer.ggml.tokens missing)"
        )
    if not tokens:
        raise ValueError(f"{where}: tokenizer.ggml.tokens is empty")
    types = meta.get_numbers("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise ValueError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
    if types is None:
        types = [NORMAL] * len(tokens)

    add_bos_meta = meta.get("tokenizer.ggml.add_bos_token")
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre")
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
        hf, add_bos_default = build_byte_level_bpe(tokens, types, merges, pre, where)
    elif model == "llama":
        scores = meta.get_numbers("tokenizer.ggml.scores")
        if scores is not None and len(scores) != len(tokens):
            raise ValueError(f"{where}: {len(scores)} scores for {len(tokens)} tokens")
        merges = meta.get("tokenizer.ggml.merges")
        add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        hf = build_sentencepiece_bpe(tokens, types, scores, merges, bool(add_space_prefix), unk_id)
        add_bos_default = True
    else:
        raise ValueError(
            f"{where}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); supported: 'gpt2', 'llama'"
        )
    add_bos = bool(add_bos_meta) if add_bos_meta is not None else bool(add_bos_default)

    n = len(tokens)

    def _valid(i):
        return i if isinstance(i, int) and 0 <= i < n else None

    bos_id = _valid(meta.get("tokenizer.ggml.bos_token_id"))
    eos_id = _valid(meta.get("tokenizer.ggml.eos_token_id"))
    unk_id = _valid(meta.get("tokenizer.ggml.unknown_token_id"))
    pad_id = _valid(meta.get("tokenizer.ggml.padding_token_id"))
    eos_ids = [eos_id] if eos_id is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = _valid(meta.get(key))
        if i is not None:
            eos_ids.append(i)
    index = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == CONTROL and t not in index:
            index[t] = i
    eos_ids += [index[t] for t in END_OF_TURN_TOKENS if t in index]

    special = {
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "unk_token": tokens[unk_id] if unk_id is not None else None,
        "pad_token": tokens[pad_id] if pad_id is not None else None,
    }
    return dict(hf=hf, vocab_size=n, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                chat_template=meta.get("tokenizer.chat_template"), special_tokens=special)

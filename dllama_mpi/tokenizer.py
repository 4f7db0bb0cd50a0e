"""Tokenizer: text <-> token ids, chat templates and streaming detokenization.

The tokenizer is a Hugging Face ``tokenizers.Tokenizer`` built from a GGUF file's ``tokenizer.ggml.*``
metadata (or loaded from a ``tokenizer.json``).  No BPE is implemented here: this module only
translates llama.cpp's description of a vocabulary into the equivalent ``tokenizers`` pipeline.

Two GGUF tokenizer models are supported:

* ``gpt2`` -- byte-level BPE with merges (GPT-2, Llama 3, Qwen 2, SmolLM, ...).  The pre-tokenizer
  is chosen by ``tokenizer.ggml.pre`` and reproduces the split regexes of llama.cpp's
  ``llm_tokenizer_bpe`` (see ``PRE_TOKENIZER_TYPES``).
* ``llama`` -- SentencePiece BPE (Llama 1/2, Mistral, TinyLlama, ...): scores, token types,
  byte-fallback tokens ``<0xNN>`` and ``add_space_prefix``.  Merges are taken from the file when it
  has them, else derived from the scores, which is what llama.cpp's ``llm_tokenizer_spm`` does
  implicitly (it merges the adjacent pair whose concatenation has the highest score).

Whitespace conventions follow llama.cpp, whose format GGUF is: a SentencePiece vocabulary gets
``"▁"`` prepended to every stretch of raw text (also after a special token), and text that already
starts with a space gets one more (``" hi"`` -> ``"▁▁hi"``), as the original SentencePiece does.

Token types (``tokenizer.ggml.token_type``): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte.  Control and unknown tokens become *special* added tokens (matched whole in text
when ``parse_special`` is true, skipped by ``decode(..., skip_special_tokens=True)``), user-defined
tokens become non-special added tokens (always matched whole, as llama.cpp does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["Tokenizer", "IncrementalDecoder", "PRE_TOKENIZER_TYPES", "TOKEN_TYPE"]

log = logging.getLogger(__name__)

# llama.cpp's llama_token_type
TOKEN_TYPE = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn / a document in common chat formats.  They are added to ``eos_ids``
# when the vocabulary has them as control tokens.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (SmolLM2, Qwen)
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end_of_text|>",  # Llama 3 base
    "<|endoftext|>",  # GPT-2 / SmolLM / Qwen
    "<|end|>",  # Phi-3
    "<end_of_turn>",  # Gemma
    "</s>",  # Llama 2 / Mistral
)

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer split regexes for byte-level BPE, by ``tokenizer.ggml.pre``.
#
# Each entry lists the regexes llama.cpp's llm_tokenizer_bpe applies one after the other (every
# regex splits the pieces left by the previous one, unmatched stretches staying pieces of their
# own -- which is `tokenizers`' Split(behavior="isolated")).  Where llama.cpp rewrote a Hugging
# Face regex for its own regex engine, the original Hugging Face form is used here.
# ---------------------------------------------------------------------------------------------
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"

# name -> (regexes applied in order, ignore_merges, add_bos default when the file does not say)
_PRE_GROUPS: dict[str, tuple[tuple[str, ...], bool, bool | None]] = {
    # llama.cpp LLAMA_VOCAB_PRE_TYPE_DEFAULT: what a file without `tokenizer.ggml.pre` gets
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, None),
    "gpt2": ((_GPT2,), False, None),
    "starcoder": ((r"\p{N}", _GPT2), False, None),  # digits one by one, then GPT-2
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False, None),
    "llama3": ((_LLAMA3,), True, True),
    "llama3-merges": ((_LLAMA3,), False, None),  # same split, merges not ignored (dbrx, smaug, glm4)
    "qwen2": ((_QWEN2,), False, None),
    "tekken": ((_TEKKEN,), True, True),
    "gpt-4o": ((_GPT4O,), False, None),
    "seed-coder": ((_SEED_CODER,), False, None),
    "bloom": ((_BLOOM,), False, None),
    "viking": ((_BLOOM, r"\p{N}"), False, None),
    "chameleon": (
        (
            r"<sentinel:[0-9]+>",
            r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            _GPT2,
        ),
        False,
        True,
    ),
}

#: ``tokenizer.ggml.pre`` value -> group in ``_PRE_GROUPS`` (names as llama.cpp's llama-vocab.cpp)
PRE_TOKENIZER_TYPES: dict[str, str] = {
    "default": "default",
    # GPT-2 regex
    **{k: "gpt2" for k in ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling",
                           "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de",
                           "jina-v2-code", "a.x-4.0", "mellum")},
    # single digits, then GPT-2 regex
    **{k: "starcoder" for k in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                                "minerva-7b")},
    "falcon": "falcon",
    # Llama 3 (tiktoken cl100k-style)
    **{k: "llama3" for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                             "midm-2.0", "lfm2")},
    **{k: "llama3-merges" for k in ("dbrx", "smaug-bpe", "chatglm-bpe", "glm4")},
    **{k: "qwen2" for k in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "grok-2")},
    "tekken": "tekken",
    **{k: "gpt-4o" for k in ("gpt-4o", "llama4", "minimax-m2")},
    "seed-coder": "seed-coder",
    **{k: "bloom" for k in ("bloom", "poro-chat", "gpt3-finnish")},
    "viking": "viking",
    "chameleon": "chameleon",
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---------------------------------------------------------------------------------------------
# GGUF metadata access
# ---------------------------------------------------------------------------------------------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


def _read_gguf_metadata(path: str) -> dict[str, Any]:
    """The key/value header of a little-endian GGUF (v2/v3) file, without its tensor table.

    Much faster than ``gguf.GGUFReader`` (which also indexes every array element) when only the
    tokenizer is wanted.  Numeric arrays come back as lists, strings decoded as UTF-8.
    """
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                (version,) = struct.unpack_from("<I", buf, 4)
                if version not in (2, 3):
                    raise ValueError(f"{path}: unsupported GGUF version {version}")
                _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
                pos = 24
                unpack_u64 = struct.Struct("<Q").unpack_from
                unpack_u32 = struct.Struct("<I").unpack_from

                def read_str(pos):
                    (n,) = unpack_u64(buf, pos)
                    pos += 8
                    if pos + n > len(buf):
                        raise IndexError("string runs past the end of the file")
                    return str(buf[pos : pos + n], "utf-8", "replace"), pos + n

                def read_value(vtype, pos):
                    if vtype == 8:
                        return read_str(pos)
                    if vtype == 9:
                        (itype,) = unpack_u32(buf, pos)
                        (count,) = unpack_u64(buf, pos + 4)
                        pos += 12
                        if count > len(buf) - pos:
                            raise IndexError(f"array of {count} items cannot fit in the file")
                        if itype == 8:
                            out = [None] * count
                            for k in range(count):
                                (n,) = unpack_u64(buf, pos)
                                pos += 8
                                if pos + n > len(buf):
                                    raise IndexError("string runs past the end of the file")
                                out[k] = str(buf[pos : pos + n], "utf-8", "replace")
                                pos += n
                            return out, pos
                        if itype in _GGUF_NUMPY:
                            dt = np.dtype(_GGUF_NUMPY[itype])
                            size = count * dt.itemsize
                            if pos + size > len(buf):
                                raise IndexError("array runs past the end of the file")
                            arr = np.frombuffer(bytes(buf[pos : pos + size]), dtype=dt)  # a copy: no view on the mmap
                            vals = arr.astype(bool).tolist() if itype == 7 else arr.tolist()
                            return vals, pos + size
                        out = []
                        for _ in range(count):
                            v, pos = read_value(itype, pos)
                            out.append(v)
                        return out, pos
                    fmt = _GGUF_SCALARS.get(vtype)
                    if fmt is None:
                        raise ValueError(f"unknown GGUF value type {vtype}")
                    (v,) = struct.unpack_from(fmt, buf, pos)
                    return v, pos + struct.calcsize(fmt)

                meta: dict[str, Any] = {}
                for _ in range(n_kv):
                    key, pos = read_str(pos)
                    (vtype,) = unpack_u32(buf, pos)
                    meta[key], pos = read_value(vtype, pos + 4)
                return meta
            except (struct.error, IndexError, OverflowError, TypeError) as e:
                raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from e
            finally:
                buf.release()


class _Meta:
    """Uniform access to GGUF metadata, from a ``gguf.GGUFReader`` or from a parsed header dict."""

    def __init__(self, source, where: str):
        self.where = where
        self._dict = source if isinstance(source, dict) else None
        self._reader = None if isinstance(source, dict) else source

    def get(self, key: str, default=None):
        if self._dict is not None:
            return self._dict.get(key, default)
        return _gguf_value(self._reader, key, default)

    def get_numbers(self, key: str):
        if self._dict is not None:
            return self._dict.get(key)
        return _gguf_int_array(self._reader, key)


def _open_gguf(path_or_reader) -> _Meta:
    import gguf

    if isinstance(path_or_reader, gguf.GGUFReader):
        return _Meta(path_or_reader, str(getattr(path_or_reader, "path", None) or "GGUF file"))
    if isinstance(path_or_reader, (str, os.PathLike)):
        path = os.fspath(path_or_reader)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        try:
            return _Meta(_read_gguf_metadata(path), path)
        except ValueError as e:
            if "unsupported GGUF version" not in str(e) and "unknown GGUF value type" not in str(e):
                raise
        try:  # unusual files (big-endian, other versions): let the gguf package try
            return _Meta(gguf.GGUFReader(path, "r"), path)
        except Exception as e:
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    raise TypeError(f"expected a path or a gguf.GGUFReader, got {type(path_or_reader).__name__}")


def _gguf_value(reader, key: str, default=None):
    """A metadata value as a Python object (str, int, float, bool, or list of those)."""
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
        return _gguf_int_array(reader, key)
    value = field.parts[field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", errors="replace")
    v = value.tolist()
    v = v[0] if isinstance(v, list) and len(v) == 1 else v
    if types[0] == GGUFValueType.BOOL:
        return bool(v)
    return v


def _gguf_int_array(reader, key: str):
    """A numeric array as a flat Python list, read in one go (token types, scores)."""
    import numpy as np

    field = reader.fields.get(key)
    if field is None:
        return None
    if not field.data:
        return []
    parts = field.parts
    return np.concatenate([parts[i] for i in field.data]).tolist()


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """Accept transformers' ``{% generation %}...{% endgeneration %}`` and render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from e


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Attributes:
        vocab_size: number of token ids the model knows (rows of its embedding table).
        bos_id: beginning-of-sequence id, or None.
        eos_ids: ids that end generation: the EOS token first, then end-of-turn tokens.
        add_bos: whether ``encode`` prepends ``bos_id`` by default.
        chat_template: the Jinja chat template, or None.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        vocab_size: int | None = None,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
    ):
        self._hf = hf
        self._hf_raw: HFTokenizer | None = None  # copy that leaves special tokens unparsed
        self._lock = threading.Lock()
        self.vocab_size = int(vocab_size if vocab_size is not None else hf.get_vocab_size(with_added_tokens=True))
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        tokens = dict(special_tokens or {})
        if tokens.get("bos_token") is None and self.bos_id is not None:
            tokens["bos_token"] = self.id_to_token(self.bos_id)
        if tokens.get("eos_token") is None and self.eos_ids:
            tokens["eos_token"] = self.id_to_token(self.eos_ids[0])
        self.special_tokens = tokens

    # ------------------------------------------------------------------ basic operations
    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._hf

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def _raw(self) -> HFTokenizer:
        if self._hf_raw is None:
            with self._lock:
                if self._hf_raw is None:
                    raw = HFTokenizer.from_str(self._hf.to_str())
                    raw.encode_special_tokens = True
                    self._hf_raw = raw
        return self._hf_raw

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        Special tokens written in the text (``<|im_start|>``) map to their ids when ``parse_special``
        is true; otherwise they are tokenized as plain text.  User-defined tokens always match.
        ``add_bos`` defaults to the model's ``add_bos`` flag.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        hf = self._hf if parse_special else self._raw()
        ids = hf.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.  Special tokens are written out unless ``skip_special_tokens``."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (as spelled in the vocabulary) of ``token_id``."""
        return self._hf.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh streaming decoder (one per generated sequence)."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        Rendering follows transformers: sandboxed Jinja with ``trim_blocks``/``lstrip_blocks``,
        ``raise_exception``, ``strftime_now``, ``bos_token``/``eos_token`` (and ``unk_token``/
        ``pad_token`` when known) in scope; extra keyword arguments are passed to the template.
        Any template error (including ``raise_exception`` calls) is raised as ``ValueError``.
        """
        import jinja2

        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer.chat_template is missing)")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        template = _compile_chat_template(self.chat_template)
        context = {k: v for k, v in self.special_tokens.items() if v is not None}
        context.update(kwargs)
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        try:
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        ``path_or_reader`` is a file path or an open ``gguf.GGUFReader``.  Raises ``ValueError`` when
        the file has no tokenizer or one of an unsupported kind.
        """
        meta = _open_gguf(path_or_reader)
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
            types = [_NORMAL] * len(tokens)

        add_bos_meta = meta.get("tokenizer.ggml.add_bos_token")
        if model == "gpt2":
            pre = meta.get("tokenizer.ggml.pre")
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise ValueError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
            hf, add_bos_default = _build_byte_level_bpe(tokens, types, merges, pre, where)
        elif model == "llama":
            scores = meta.get_numbers("tokenizer.ggml.scores")
            if scores is not None and len(scores) != len(tokens):
                raise ValueError(f"{where}: {len(scores)} scores for {len(tokens)} tokens")
            merges = meta.get("tokenizer.ggml.merges")
            add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            unk_id = meta.get("tokenizer.ggml.unknown_token_id")
            hf = _build_sentencepiece_bpe(tokens, types, scores, merges, bool(add_space_prefix), unk_id)
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
            if ty == _CONTROL and t not in index:
                index[t] = i
        eos_ids += [index[t] for t in _END_OF_TURN_TOKENS if t in index]

        chat_template = meta.get("tokenizer.chat_template")
        special = {
            "bos_token": tokens[bos_id] if bos_id is not None else None,
            "eos_token": tokens[eos_id] if eos_id is not None else None,
            "unk_token": tokens[unk_id] if unk_id is not None else None,
            "pad_token": tokens[pad_id] if pad_id is not None else None,
        }
        return cls(
            hf,
            vocab_size=n,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=chat_template,
            special_tokens=special,
        )

    @classmethod
    def from_hf_files(cls, tokenizer_json_path, tokenizer_config_path=None) -> "Tokenizer":
        """Load a Hugging Face ``tokenizer.json`` (+ optional ``tokenizer_config.json``).

        The config gives ``chat_template``, ``bos_token``/``eos_token`` and ``add_bos_token``; a
        ``chat_template.jinja`` and a ``generation_config.json`` next to ``tokenizer.json`` are used
        when present (template, extra EOS ids).
        """
        tokenizer_json_path = os.fspath(tokenizer_json_path)
        folder = os.path.dirname(os.path.abspath(tokenizer_json_path))
        hf = HFTokenizer.from_file(tokenizer_json_path)
        config: dict = {}
        if tokenizer_config_path is None:
            candidate = os.path.join(folder, "tokenizer_config.json")
            if os.path.isfile(candidate):
                tokenizer_config_path = candidate
        if tokenizer_config_path is not None:
            with open(tokenizer_config_path, encoding="utf-8") as f:
                config = json.load(f)

        def _content(v):
            if isinstance(v, dict):
                return v.get("content")
            return v

        bos_token = _content(config.get("bos_token"))
        eos_token = _content(config.get("eos_token"))
        bos_id = hf.token_to_id(bos_token) if bos_token else None
        eos_id = hf.token_to_id(eos_token) if eos_token else None

        # Does the tokenizer.json's post-processor add BOS by itself?  (Llama 3 style files)
        probe_with = hf.encode("a", add_special_tokens=True).ids
        probe_without = hf.encode("a", add_special_tokens=False).ids
        post_adds_bos = len(probe_with) > len(probe_without) and probe_with[0] != probe_without[0]
        if bos_id is None and post_adds_bos:
            bos_id = probe_with[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = post_adds_bos

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not template:
            jinja_path = os.path.join(folder, "chat_template.jinja")
            if os.path.isfile(jinja_path):
                with open(jinja_path, encoding="utf-8") as f:
                    template = f.read()

        eos_ids = [eos_id] if eos_id is not None else []
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                gen = json.load(f)
            extra = gen.get("eos_token_id")
            eos_ids += extra if isinstance(extra, list) else ([extra] if extra is not None else [])
        specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        for t in _END_OF_TURN_TOKENS:
            if t in specials:
                eos_ids.append(hf.token_to_id(t))
        special = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": _content(config.get("unk_token")),
            "pad_token": _content(config.get("pad_token")),
        }
        vocab_size = hf.get_vocab_size(with_added_tokens=True)
        return cls(
            hf,
            vocab_size=vocab_size,
            bos_id=bos_id,
            eos_ids=[i for i in eos_ids if i is not None],
            add_bos=bool(add_bos),
            chat_template=template,
            special_tokens=special,
        )

    @classmethod
    def from_dllama_t(cls, path, pre: str | None = None) -> "Tokenizer":
        """Load a Distributed Llama ``.t`` tokenizer file (raw token bytes + scores).

        The file has no merges and no pre-tokenizer: merges are derived from the scores (a pair
        merges into a token when both halves rank before it), the pre-tokenizer is chosen from
        the special tokens (``pre`` overrides it; see ``PRE_TOKENIZER_TYPES``).  Special tokens
        are recognised by their spelling wherever they sit (Distributed Llama's own tokenizer
        treats every id >= bos_id as special, which breaks vocabularies with specials at low ids).
        A vocabulary with ``<0xNN>`` byte tokens is read as SentencePiece (" " -> "▁").
        Raises ``ValueError`` (a ``DllamaError``) on a malformed file.
        """
        from .formats.dllama import read_dllama_t

        path = os.fspath(path)
        t = read_dllama_t(path)
        n = len(t.tokens)
        texts = [b.decode("utf-8", "replace") for b in t.tokens]
        special = _dllama_special_ids(texts, t)
        spm = "<0x0A>" in texts and "<0x00>" in texts
        if spm:
            tokens, types = [], []
            for i, s in enumerate(texts):
                if i in special:
                    types.append(_UNKNOWN if s == "<unk>" else _CONTROL)
                    tokens.append(s)
                elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                    types.append(_BYTE)
                    tokens.append(s)
                else:
                    types.append(_NORMAL)
                    tokens.append(s.replace(" ", "▁"))
            unk = tokens.index("<unk>") if "<unk>" in tokens else None
            hf = _build_sentencepiece_bpe(tokens, types, t.scores, None, True, unk)
            add_bos_default = True
        else:
            b2u = bytes_to_unicode()
            tokens = [texts[i] if i in special else "".join(b2u[b] for b in raw)
                      for i, raw in enumerate(t.tokens)]
            types = [_CONTROL if i in special else _NORMAL for i in range(n)]
            merges = _merges_from_ranks(tokens, types, t.scores)
            pre = pre or _guess_pre_tokenizer(set(texts[i] for i in special))
            hf, add_bos_default = _build_byte_level_bpe(tokens, types, merges, pre, path)
        add_bos = t.add_bos if t.add_bos is not None else add_bos_default
        eos_ids = list(t.eos_ids)
        index = {texts[i]: i for i in sorted(special)}
        if not eos_ids:  # the file's list is authoritative; without one, guess the usual ends
            eos_ids = [index[s] for s in _END_OF_TURN_TOKENS if s in index]
        tok = cls(hf, vocab_size=n, bos_id=t.bos_id, eos_ids=eos_ids, add_bos=bool(add_bos),
                  chat_template=t.chat_template,
                  special_tokens={"bos_token": texts[t.bos_id] if t.bos_id is not None else None,
                                  "eos_token": texts[eos_ids[0]] if eos_ids else None})
        tok.scores = list(t.scores)
        return tok


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def _add_gguf_added_tokens(hf: HFTokenizer, tokens: Sequence[str], types: Sequence[int], vocab: dict[str, int]):
    """Register control/unknown tokens as special and user-defined tokens as plain added tokens.

    Only entries that the model vocabulary already holds under exactly that text are added, so no
    new ids appear and ``vocab_size`` stays the file's.
    """
    special, user = [], []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty not in (_CONTROL, _UNKNOWN, _USER_DEFINED) or not t or vocab.get(t) != i:
            continue
        if ty == _USER_DEFINED:
            user.append(AddedToken(t, special=False, normalized=False))
        else:
            special.append(AddedToken(t, special=True, normalized=False))
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)


def _build_byte_level_bpe(tokens, types, merges, pre, where):
    """gpt2-style byte-level BPE; returns (tokenizer, default add_bos)."""
    name = "default" if pre is None else str(pre)
    group = PRE_TOKENIZER_TYPES.get(name)
    if group is None:
        raise ValueError(
            f"{where}: unsupported pre-tokenizer {name!r} (tokenizer.ggml.pre); supported: "
            + ", ".join(sorted(PRE_TOKENIZER_TYPES))
        )
    if pre is None:
        log.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", where)
    regexes, ignore_merges, add_bos_default = _PRE_GROUPS[group]

    byte_chars = bytes_to_unicode()
    alphabet = set(byte_chars.values())
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        key = t
        if ty not in (_CONTROL, _UNKNOWN, _USER_DEFINED) and not set(t) <= alphabet:
            # a normal token spelled in plain text: respell it in the byte alphabet
            key = "".join(byte_chars[b] for b in t.encode("utf-8"))
        if key in vocab:
            log.debug("%s: duplicate token %r (ids %d and %d); keeping the first", where, key, vocab[key], i)
            continue
        vocab[key] = i
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: malformed merge {m!r}")
        pairs.append((parts[0], parts[1]))

    model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    hf = HFTokenizer(model)
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(hf, tokens, types, vocab)
    return hf, bool(add_bos_default)




def _dllama_special_ids(texts: list[str], t) -> set[int]:
    """Ids of special tokens in a .t vocabulary: bos/eos/pad, every ``<|...|>``, and the runs
    of ``<tag>`` tokens at the start of the vocabulary and from bos_id on when the specials
    sit at the end (Llama 3)."""
    import re

    tag = re.compile(r"^<[^<>\s]+>$")
    byte = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
    n = len(texts)
    ids = {i for i in [t.bos_id, t.pad_id, *t.eos_ids] if i is not None and 0 <= i < n}
    ids |= {i for i, s in enumerate(texts) if s.startswith("<|") and s.endswith("|>") and len(s) > 4}
    i = 0
    while i < n and tag.match(texts[i]) and not byte.match(texts[i]):
        ids.add(i)
        i += 1
    if t.bos_id is not None and t.bos_id >= n // 2:
        ids |= {i for i in range(t.bos_id, n) if tag.match(texts[i])}
    return ids


def _guess_pre_tokenizer(specials: set[str]) -> str:
    if "<|begin_of_text|>" in specials or "<|eot_id|>" in specials:
        return "llama3"
    if "<repo_name>" in specials or "<filename>" in specials:
        return "smollm"  # StarCoder-family vocabularies (SmolLM, SmolLM2): digits one by one
    if "<|im_start|>" in specials:
        return "qwen2"
    return "gpt2"


def _merges_from_ranks(tokens, types, scores) -> list[str]:
    """BPE merges implied by token scores (higher score = merged earlier): every split of a token
    into two vocabulary pieces that both rank before it, in the order of the merged token."""
    vocab = {}
    for i, s in enumerate(tokens):
        if types[i] == _NORMAL and s not in vocab:
            vocab[s] = i
    ranked = []
    for s, i in vocab.items():
        for k in range(1, len(s)):
            a, b = vocab.get(s[:k]), vocab.get(s[k:])
            if a is not None and b is not None and scores[a] >= scores[i] and scores[b] >= scores[i]:
                ranked.append((-scores[i], i, max(-scores[a], -scores[b]), k, s))
    ranked.sort()
    return [f"{s[:k]} {s[k:]}" for *_, k, s in ranked]


def _spm_merges_from_scores(tokens, types, scores, vocab):
    """Merges implied by a SentencePiece vocabulary: every split of a mergeable token into two
    vocabulary pieces, ranked by the merged token's score (highest first, then lower id first)."""
    mergeable = {t: i for t, i in vocab.items() if types[i] in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for t, i in mergeable.items():
        if len(t) < 2:
            continue
        score = scores[i] if scores is not None else -float(i)
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_sentencepiece_bpe(tokens, types, scores, merges, add_space_prefix, unk_id):
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t not in vocab:
            vocab[t] = i
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges if " " in m]
    else:
        pairs = _spm_merges_from_scores(tokens, types, scores, vocab)
    unk = None
    if isinstance(unk_id, int) and 0 <= unk_id < len(tokens):
        unk = tokens[unk_id]
    elif "<unk>" in vocab:
        unk = "<unk>"
    byte_fallback = any(ty == _BYTE for ty in types) or "<0x00>" in vocab
    model = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    hf = HFTokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(dec)
    _add_gguf_added_tokens(hf, tokens, types, vocab)
    return hf


# ---------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------
class IncrementalDecoder:
    """Turns a stream of token ids into text, one printable piece at a time.

    ``push(id)`` returns the text that became printable with this token (possibly ""): bytes of a
    character split over several byte-level / byte-fallback tokens are held until the character
    is complete, and SentencePiece "▁" spacing is resolved as in a full ``decode``.  ``flush()``
    returns whatever is still held (an incomplete character comes out as U+FFFD).  The
    concatenation of all returned pieces equals ``tokenizer.decode(all_ids)``.

    It decodes a short sliding window of recent ids with the tokenizer's own decoder and emits the
    growth of the text, so every decoder (byte-level, byte-fallback, Metaspace) is handled alike.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids already emitted that give context to the decoder
        self._read = 0  # ids[:read] have been emitted

    def _decode(self, ids) -> str:
        return self._tok._hf.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text) :]
            # the ids just emitted become the context window; older ones are no longer needed
            del self._ids[: self._read]
            self._prefix, self._read = 0, len(self._ids)
            return out
        return ""

    def flush(self) -> str:
        """Emit what is held back (an incomplete UTF-8 sequence decodes to U+FFFD) and reset."""
        out = ""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read]) if self._read > self._prefix else ""
            new_text = self._decode(self._ids[self._prefix :])
            out = new_text[len(prefix_text) :]
        self.reset()
        return out

    def reset(self) -> None:
        self._ids.clear()
        self._prefix = self._read = 0

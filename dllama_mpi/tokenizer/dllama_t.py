"""Distributed Llama's tokenizer file (``.t``): read, pack, and turn into Tokenizer arguments.

Layout (little-endian; as Distributed Llama writes it, src/tokenizer.cpp): int32 magic 0x567124, int32 header
size, (int32 key, int32 value) pairs; [chat_stop bytes]; chat template; eos ids (int32); per
token: float32 score, uint32 length, raw bytes.

The file has no merges and no pre-tokenizer: merges are derived from the scores (a pair merges
into a token when both halves rank before it), the pre-tokenizer is chosen from the special
tokens.  Special tokens are recognised by their spelling wherever they sit (Distributed Llama's
own tokenizer treats every id >= bos_id as special, which breaks vocabularies with specials at
low ids).  A vocabulary with ``<0xNN>`` byte tokens is read as SentencePiece (" " -> "▁").
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import DllamaError
from .bpe import (BYTE, CONTROL, END_OF_TURN_TOKENS, NORMAL, UNKNOWN, build_byte_level_bpe,
                  build_sentencepiece_bpe, bytes_to_unicode, merges_from_ranks)

T_MAGIC, T_KEYS = 0x567124, {0: "version", 1: "vocab_size", 2: "max_token_length",
                             3: "bos_id", 4: "eos_id", 5: "pad_id", 6: "chat_eos_id",
                             7: "chat_template", 8: "chat_stop", 9: "n_eos_tokens",
                             10: "add_bos"}


@dataclass
class TFile:
    """A .t file's contents: raw token bytes and scores, special ids, chat template."""

    tokens: list[bytes]
    scores: list[float]
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    pad_id: int | None = None
    chat_template: str | None = None
    add_bos: bool | None = None
    max_token_length: int = 0


def read_dllama_t(path: str) -> TFile:
    """The contents of a .t file, or a DllamaError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise DllamaError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise DllamaError(f"{path}: truncated tokenizer file (while reading {what})")
        pos += n
        return data[pos - n:pos]

    magic, header_size = struct.unpack("<ii", take(8, "the header"))
    if magic == 0x567123:
        raise DllamaError(f"{path}: old tokenizer format (magic 0x567123); regenerate it")
    if magic != T_MAGIC:
        raise DllamaError(f"{path}: not a Distributed Llama tokenizer (magic "
                          f"{magic & 0xFFFFFFFF:#x}, expected {T_MAGIC:#x})")
    if header_size < 8 or (header_size - 8) % 8:
        raise DllamaError(f"{path}: bad header size {header_size}")
    values = struct.unpack(f"<{(header_size - 8) // 4}i", take(header_size - 8, "the header"))
    h: dict[str, int] = {}
    eos_ids: list[int] = []
    for key, value in zip(values[::2], values[1::2]):
        if key not in T_KEYS:
            raise DllamaError(f"{path}: unknown tokenizer header key {key} (value {value})")
        name = T_KEYS[key]
        if name in ("eos_id", "chat_eos_id"):
            eos_ids.append(value)
        elif name == "chat_stop":
            take(value, "chat_stop")  # legacy: skipped, as the C++ does
        h[name] = value
    if h.get("version") != 1:
        raise DllamaError(f"{path}: tokenizer version {h.get('version')} (only 1 is supported)")
    if "vocab_size" not in h or h["vocab_size"] <= 0:
        raise DllamaError(f"{path}: no vocab_size in the tokenizer header")
    template = None
    if h.get("chat_template", 0) > 0:
        template = take(h["chat_template"], "the chat template").decode("utf-8", "replace")
    n_eos = h.get("n_eos_tokens", 0)
    if n_eos:
        eos_ids = list(struct.unpack(f"<{n_eos}i", take(4 * n_eos, "eos ids"))) + eos_ids
    tokens, scores = [], []
    for i in range(h["vocab_size"]):
        score, n = struct.unpack("<fI", take(8, f"token {i}"))
        tokens.append(take(n, f"token {i}"))
        scores.append(score)
    if pos != len(data):
        raise DllamaError(f"{path}: {len(data) - pos} bytes after the last token (corrupt?)")
    n = len(tokens)
    for i in eos_ids + [h.get("bos_id", 0)]:
        if not 0 <= i < n:
            raise DllamaError(f"{path}: token id {i} out of range (vocab {n})")
    return TFile(tokens, scores, bos_id=h.get("bos_id"), eos_ids=list(dict.fromkeys(eos_ids)),
                 pad_id=h.get("pad_id"), chat_template=template,
                 add_bos=None if "add_bos" not in h else bool(h["add_bos"]),
                 max_token_length=h.get("max_token_length", 0))


def pack_dllama_t(t: TFile) -> bytes:
    """The bytes of a .t file holding ``t`` (the keys Distributed Llama's converter writes)."""
    keys = {"version": 1, "vocab_size": len(t.tokens),
            "max_token_length": max(len(b) for b in t.tokens)}
    if t.bos_id is not None:
        keys["bos_id"] = t.bos_id
    template = (t.chat_template or "").encode("utf-8")
    if template:
        keys["chat_template"] = len(template)
    keys["n_eos_tokens"] = len(t.eos_ids)
    keys["add_bos"] = int(bool(t.add_bos))
    ids = {v: k for k, v in T_KEYS.items()}
    pairs = [v for k, val in keys.items() for v in (ids[k], int(val))]
    parts = [struct.pack(f"<ii{len(pairs)}i", T_MAGIC, 8 + 4 * len(pairs), *pairs), template,
             struct.pack(f"<{len(t.eos_ids)}i", *t.eos_ids)]
    parts += [struct.pack("<fI", s, len(b)) + b for b, s in zip(t.tokens, t.scores)]
    return b"".join(parts)


def peer_split_warning(tok) -> str | None:
    """Distributed Llama's own tokenizer takes the ids below bos_id as its regular vocabulary
    and every id from bos_id on as special (its src/tokenizer.cpp). Where ordinary tokens sit
    at or above the BOS id (special tokens first, as SmolLM2's: BOS is id 1), it splits text
    into single characters with this file; dllama_mpi reads it right. The warning, or None."""
    bos = tok.bos_id
    if bos is None:
        return None
    specials = set(tok.hf_tokenizer.get_added_tokens_decoder())
    ordinary_above = sum(1 for i in range(bos, tok.vocab_size) if i not in specials)
    if ordinary_above == 0:
        return None
    return (f"warning: Distributed Llama's tokenizer takes only the ids below the BOS id "
            f"({bos}) as ordinary tokens; {ordinary_above} of this vocabulary's "
            f"{tok.vocab_size} lie above it, so Distributed Llama will split text into single "
            f"characters with this .t (dllama_mpi reads it right)")


def tfile_from_tokenizer(tok) -> TFile:
    """Token texts as the raw bytes Distributed Llama's converter writes: byte-level BPE
    tokens decoded from GPT-2's byte alphabet, SentencePiece '▁' as a space."""
    hf = tok.hf_tokenizer
    spec = json.loads(hf.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or \
        "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    specials = {i for i, t in hf.get_added_tokens_decoder().items()}
    n = tok.vocab_size
    tokens = []
    for i in range(n):
        s = hf.id_to_token(i)
        if s is None or s == "":
            b = f"<unused{i}>".encode()
        elif i in specials:
            b = s.encode("utf-8")
        elif byte_level and all(ch in u2b for ch in s):
            b = bytes(u2b[ch] for ch in s)
        else:
            b = s.replace("\u2581", " ").encode("utf-8")
        tokens.append(b)
    scores = getattr(tok, "scores", None)
    if scores is None or len(scores) != n:
        scores = [-float(i) for i in range(n)]
    return TFile(tokens, list(scores), bos_id=tok.bos_id, eos_ids=list(tok.eos_ids),
                 chat_template=tok.chat_template, add_bos=tok.add_bos)


# ---------------------------------------------------------------------------------------------
# .t -> Tokenizer arguments
# ---------------------------------------------------------------------------------------------
def dllama_t_tokenizer_args(path, pre: str | None = None) -> dict[str, Any]:
    """The Tokenizer arguments of a .t file (``scores`` included); ``pre`` overrides the guessed
    pre-tokenizer (see ``PRE_TOKENIZER_TYPES``).  Raises ``DllamaError`` on a malformed file."""
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
                types.append(UNKNOWN if s == "<unk>" else CONTROL)
                tokens.append(s)
            elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                types.append(BYTE)
                tokens.append(s)
            else:
                types.append(NORMAL)
                tokens.append(s.replace(" ", "▁"))
        unk = tokens.index("<unk>") if "<unk>" in tokens else None
        hf = build_sentencepiece_bpe(tokens, types, t.scores, None, True, unk)
        add_bos_default = True
    else:
        b2u = bytes_to_unicode()
        tokens = [texts[i] if i in special else "".join(b2u[b] for b in raw)
                  for i, raw in enumerate(t.tokens)]
        types = [CONTROL if i in special else NORMAL for i in range(n)]
        merges = merges_from_ranks(tokens, types, t.scores)
        pre = pre or _guess_pre_tokenizer(set(texts[i] for i in special))
        hf, add_bos_default = build_byte_level_bpe(tokens, types, merges, pre, path)
    add_bos = t.add_bos if t.add_bos is not None else add_bos_default
    eos_ids = list(t.eos_ids)
    index = {texts[i]: i for i in sorted(special)}
    if not eos_ids:  # the file's list is authoritative; without one, guess the usual ends
        eos_ids = [index[s] for s in END_OF_TURN_TOKENS if s in index]
    return dict(hf=hf, vocab_size=n, bos_id=t.bos_id, eos_ids=eos_ids, add_bos=bool(add_bos),
                chat_template=t.chat_template,
                special_tokens={"bos_token": texts[t.bos_id] if t.bos_id is not None else None,
                                "eos_token": texts[eos_ids[0]] if eos_ids else None},
                scores=list(t.scores))


def _dllama_special_ids(texts: list[str], t) -> set[int]:
    """Ids of special tokens in a .t vocabulary: bos/eos/pad, every ``<|...|>``, and the runs
    of ``<tag>`` tokens at the start of the vocabulary and from bos_id on when the specials
    sit at the end (Llama 3)."""
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


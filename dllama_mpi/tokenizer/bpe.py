"""The ``tokenizers`` pipelines a vocabulary is turned into: byte-level BPE and SentencePiece BPE.

No BPE is implemented here: these builders translate llama.cpp's description of a vocabulary
(token texts, token types, merges or scores) into the equivalent ``tokenizers`` pipeline.

* byte-level BPE with merges (GPT-2, Llama 3, Qwen 2, SmolLM, ...).  The pre-tokenizer is chosen
  by name (``tokenizer.ggml.pre``) and reproduces the split regexes of llama.cpp's
  ``llm_tokenizer_bpe`` (see ``PRE_TOKENIZER_TYPES``).
* SentencePiece BPE (Llama 1/2, Mistral, TinyLlama, ...): scores, token types, byte-fallback
  tokens ``<0xNN>`` and ``add_space_prefix``.  Without merges they are derived from the scores,
  which is what llama.cpp's ``llm_tokenizer_spm`` does implicitly (it merges the adjacent pair
  whose concatenation has the highest score).

Whitespace conventions follow llama.cpp: a SentencePiece vocabulary gets ``"▁"`` prepended to
every stretch of raw text (also after a special token), and text that already starts with a
space gets one more (``" hi"`` -> ``"▁▁hi"``), as the original SentencePiece does.

Token types (llama.cpp's ``llama_token_type``): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte.  Control and unknown tokens become *special* added tokens (matched whole in text
when ``parse_special`` is true, skipped by ``decode(..., skip_special_tokens=True)``), user-defined
tokens become non-special added tokens (always matched whole, as llama.cpp does).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

# llama.cpp's llama_token_type
TOKEN_TYPE = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn / a document in common chat formats.  They are added to ``eos_ids``
# when the vocabulary has them as control tokens.
END_OF_TURN_TOKENS = (
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
# Builders
# ---------------------------------------------------------------------------------------------
def register_added_tokens(hf: HFTokenizer, tokens: Sequence[str], types: Sequence[int], vocab: dict[str, int]):
    """Register control/unknown tokens as special and user-defined tokens as plain added tokens.

    Only entries that the model vocabulary already holds under exactly that text are added, so no
    new ids appear and ``vocab_size`` stays the file's.
    """
    special, user = [], []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty not in (CONTROL, UNKNOWN, USER_DEFINED) or not t or vocab.get(t) != i:
            continue
        if ty == USER_DEFINED:
            user.append(AddedToken(t, special=False, normalized=False))
        else:
            special.append(AddedToken(t, special=True, normalized=False))
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)


def build_byte_level_bpe(tokens, types, merges, pre, where):
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
        if ty not in (CONTROL, UNKNOWN, USER_DEFINED) and not set(t) <= alphabet:
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
    register_added_tokens(hf, tokens, types, vocab)
    return hf, bool(add_bos_default)


def merges_from_ranks(tokens, types, scores) -> list[str]:
    """BPE merges implied by token scores (higher score = merged earlier): every split of a token
    into two vocabulary pieces that both rank before it, in the order of the merged token."""
    vocab = {}
    for i, s in enumerate(tokens):
        if types[i] == NORMAL and s not in vocab:
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
    mergeable = {t: i for t, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
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


def build_sentencepiece_bpe(tokens, types, scores, merges, add_space_prefix, unk_id):
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
    byte_fallback = any(ty == BYTE for ty in types) or "<0x00>" in vocab
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
    register_added_tokens(hf, tokens, types, vocab)
    return hf


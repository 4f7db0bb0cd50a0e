"""Write Llama-architecture GGUF files the way llama.cpp's ``convert_hf_to_gguf.py`` does.

Used to make test and benchmark models (random weights, any shape) and to convert a
Hugging Face Llama state dict.  The output is a plain ``llama`` GGUF (or, with ``arch=``, a
``qwen2`` GGUF with ``blk.N.attn_{q,k,v}.bias`` or a ``qwen3`` GGUF with
``blk.N.attn_{q,k}_norm.weight``; their q/k rows stay in rotate-half order, as llama.cpp's
converter leaves them):

* tensor names ``token_embd.weight``, ``blk.N.attn_{norm,q,k,v,output}.weight``,
  ``blk.N.ffn_{norm,gate,up,down}.weight``, ``output_norm.weight``, ``output.weight``
  (absent when the embedding is tied) and ``rope_freqs.weight`` for llama3 rope scaling;
* ``attn_q`` / ``attn_k`` rows permuted per head from Hugging Face's rotate-half order into
  llama.cpp's interleaved-pair order (:func:`permute_qk`, the same reshape/swapaxes as
  ``LlamaModel.permute``);
* 2-D matrices (embedding included) in the requested ``weight_type``; 1-D norms always F32;
* ``llama.*`` hyper-parameters, ``general.file_type``, ``general.quantization_version`` and
  optionally a tokenizer.

Memory: the file is written tensor by tensor.  All tensor infos are computed up front from the
hyper-parameters (so no tensor has to exist before it is written), then each tensor is fetched,
permuted/quantised in row chunks, written and dropped.  ``tensors`` may therefore be any
``Mapping`` -- a plain dict of arrays, a dict whose values are zero-argument callables returning
arrays, or the lazy mapping returned by :func:`random_llama_tensors` (which generates a tensor
each time it is indexed, deterministically from ``seed`` and the tensor's name, and keeps
nothing).  Peak memory is about one f32 tensor plus its quantised copy.

The file is written to ``<path>.tmp-<pid>`` and renamed into place when complete, so a reader
never sees a half-written file.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.quants import quantize as _gguf_quantize

__all__ = [
    "WEIGHT_TYPES",
    "FILE_TYPES",
    "TensorSpec",
    "LazyTensors",
    "llama_tensor_specs",
    "permute_qk",
    "unpermute_qk",
    "llama3_rope_factors",
    "random_llama_tensors",
    "byte_bpe_vocab",
    "bytes_to_unicode",
    "write_llama_gguf",
    "CHATML_TEMPLATE",
]

#: weight_type name -> GGML type of the 2-D matrices
WEIGHT_TYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1,
                               "q8_0": QT.Q8_0}
#: weight_type name -> ``general.file_type`` (llama.cpp's LlamaFileType)
FILE_TYPES: dict[str, int] = {
    "f32": int(gguf.LlamaFileType.ALL_F32),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
    "q4_0": int(gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": int(gguf.LlamaFileType.MOSTLY_Q4_1),
    "q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0),
}

# ChatML layout, with <s> / </s> (the only control tokens of the "bytes" vocabulary) standing in
# for <|im_start|> / <|im_end|>, so that an assistant turn ends with the eos token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)

_CHUNK_ELEMS = 1 << 22  # rows are converted in chunks of about this many values


# --------------------------------------------------------------------------- tensor layout

@dataclass(frozen=True)
class TensorSpec:
    hf_name: str | None       # Hugging Face name (None for generated tensors such as rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]    # numpy / HF shape, [out, in] for matrices
    permute_heads: int = 0    # >0: rows permuted with permute_qk(w, permute_heads)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2


ARCHS = ("llama", "qwen2", "qwen3")


def llama_tensor_specs(*, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                       vocab_size: int, head_dim: int | None = None, tied: bool = False,
                       arch: str = "llama") -> list[TensorSpec]:
    """The tensors of a Llama model in file order, with HF names, GGUF names and HF shapes.
    ``arch`` "qwen2" adds the q/k/v biases, "qwen3" the per-head q/k norms; both keep
    Hugging Face's rotate-half q/k order (llama.cpp runs them with NEOX rope: no permutation)."""
    hd = head_dim if head_dim is not None else dim // n_heads
    q_dim, kv_dim = n_heads * hd, n_kv_heads * hd
    qh, kvh = (n_heads, n_kv_heads) if arch == "llama" else (0, 0)
    specs = [TensorSpec("model.embed_tokens.weight", "token_embd.weight", (vocab_size, dim))]
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", b + "attn_norm.weight", (dim,)),
            TensorSpec(p + "self_attn.q_proj.weight", b + "attn_q.weight", (q_dim, dim), qh),
            TensorSpec(p + "self_attn.k_proj.weight", b + "attn_k.weight", (kv_dim, dim), kvh),
            TensorSpec(p + "self_attn.v_proj.weight", b + "attn_v.weight", (kv_dim, dim)),
            TensorSpec(p + "self_attn.o_proj.weight", b + "attn_output.weight", (dim, q_dim)),
            TensorSpec(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (dim,)),
            TensorSpec(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (hidden_dim, dim)),
            TensorSpec(p + "mlp.up_proj.weight", b + "ffn_up.weight", (hidden_dim, dim)),
            TensorSpec(p + "mlp.down_proj.weight", b + "ffn_down.weight", (dim, hidden_dim)),
        ]
        if arch == "qwen2":
            specs += [TensorSpec(p + f"self_attn.{x}_proj.bias", b + f"attn_{x}.bias", (n,))
                      for x, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
        if arch == "qwen3":
            specs += [TensorSpec(p + f"self_attn.{x}_norm.weight", b + f"attn_{x}_norm.weight", (hd,))
                      for x in ("q", "k")]
    specs.append(TensorSpec("model.norm.weight", "output_norm.weight", (dim,)))
    if not tied:
        specs.append(TensorSpec("lm_head.weight", "output.weight", (vocab_size, dim)))
    return specs


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs (llama.cpp's ``permute``).

    Within each head of ``hd`` rows, new row ``2i`` is old row ``i`` and new row ``2i+1`` is old
    row ``i + hd/2``.
    """
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF order -> HF order)."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


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


# --------------------------------------------------------------------------- random weights

class LazyTensors(Mapping):
    """A read-only mapping name -> float32 array whose values are made on each access.

    ``make(name, shape)`` builds one tensor; nothing is cached, so a writer that reads each key
    once holds one tensor at a time.  ``dict(lazy)`` materialises everything.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], make: Callable[[str, tuple[int, ...]], np.ndarray]):
        self._shapes = dict(shapes)
        self._make = make

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._make(name, self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def random_llama_tensors(*, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                         vocab_size: int, head_dim: int | None = None, tied: bool = False,
                         std: float = 0.02, seed: int = 0) -> LazyTensors:
    """Random Llama weights in HF naming/orientation, as a lazy mapping (see :class:`LazyTensors`).

    Matrices ~ normal(0, std); norm weights ~ 1 + normal(0, 0.1).  Each tensor depends only on
    ``seed`` and its name, so any access order gives the same values.  ``tied=True`` omits
    ``lm_head.weight``.
    """
    specs = llama_tensor_specs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=n_kv_heads, vocab_size=vocab_size, head_dim=head_dim, tied=tied)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        rng = _tensor_rng(seed, name)
        a = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) == 1:
            a *= np.float32(0.1)
            a += np.float32(1.0)
        else:
            a *= np.float32(std)
        return a

    return LazyTensors({s.hf_name: s.shape for s in specs}, make)


# --------------------------------------------------------------------------- tokenizer

# GPT-2's byte -> printable character table: the tokenizer's own (one copy in the project)
from ..tokenizer import bytes_to_unicode  # noqa: E402


# A fixed English text the "bytes" vocabulary's merges are learned from (written for this file).
_TRAINING_TEXT = """
The model reads the prompt one token at a time and writes the next token. In the beginning there
was only the text, and the text was split into words, and the words into bytes. Then the most
common pairs of bytes were joined, again and again, until the vocabulary was full. This is how
a byte pair encoding is built: the pair that is seen most often is merged first, and the new
token can be merged with others in the next round.
A cluster of computers can run a large language model when no single machine has the memory
for it. Each node holds a slice of every weight matrix, computes its part of the output, and
then the nodes exchange their partial results over the network. The root node samples the
next token and sends it to all the others, and the whole process starts again for the next
position in the sequence. It is important that the work is shared evenly, that the messages
are small, and that no node waits longer than it has to.
There are many things to think about: the time it takes to send a message, the number of
bytes in each one, the way the heads of the attention layer are split between the nodes, and
what happens when the number of heads is not a multiple of the number of nodes. We want the
answer to be the same as on one machine, and we want it to be fast. For this we measure the
time of every step, we compare the results with a reference, and we write down what we find.
What is the capital of France? Paris is the capital of France. How many days are there in a
week? There are seven days in a week. Where do you want to go today? I would like to go to
the sea, or to the mountains, or to a small town with an old church and a market square.
She said that he would come back in the morning, but he did not come, and they went home
without him. They have been working on this for a long time, and they are not done yet.
"""

_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=8)
def _learn_merges(max_new_tokens: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Greedy byte-level BPE on the fixed text: (merges, new tokens), at most ``max_new_tokens``."""
    b2u = bytes_to_unicode()
    words = Counter(_PRETOKENIZE.findall(_TRAINING_TEXT))
    seqs = {tuple(b2u[b] for b in w.encode("utf-8")): c for w, c in words.items()}
    known = set(b2u.values())
    merges: list[tuple[str, str]] = []
    new_tokens: list[str] = []
    while len(new_tokens) < max_new_tokens:
        pairs: Counter = Counter()
        for seq, c in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == best_count)  # deterministic tie-break
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            known.add(merged)
            new_tokens.append(merged)
        new_seqs: dict[tuple[str, ...], int] = {}
        for seq, c in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == best[0] and seq[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            t = tuple(out)
            new_seqs[t] = new_seqs.get(t, 0) + c
        seqs = new_seqs
    return tuple(merges), tuple(new_tokens)


def byte_bpe_vocab(vocab_size: int, max_merges: int = 500) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) of the synthetic byte-level BPE vocabulary.

    ids 0..2 ``<unk>`` ``<s>`` ``</s>`` (CONTROL), 3..258 the 256 bytes in GPT-2 spelling
    (NORMAL), then up to ``max_merges`` merged tokens learned from a fixed English text, then
    ``<unused_N>`` fillers (UNUSED) up to ``vocab_size``.
    """
    n_base = 3 + 256
    if vocab_size < n_base:
        raise ValueError(f"the 'bytes' tokenizer needs vocab_size >= {n_base}, got {vocab_size}")
    b2u = bytes_to_unicode()
    merges, merged_tokens = _learn_merges(min(max_merges, vocab_size - n_base))
    tokens = ["<unk>", "<s>", "</s>"] + [b2u[b] for b in range(256)] + list(merged_tokens)
    types = [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (256 + len(merged_tokens))
    n_fill = vocab_size - len(tokens)
    tokens += [f"<unused_{i}>" for i in range(n_fill)]
    types += [int(gguf.TokenType.UNUSED)] * n_fill
    return tokens, types, [f"{a} {b}" for a, b in merges]


def _add_bytes_tokenizer(w: gguf.GGUFWriter, vocab_size: int) -> None:
    tokens, types, merges = byte_bpe_vocab(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML_TEMPLATE)


def _copy_tokenizer(w: gguf.GGUFWriter, src: str | os.PathLike, vocab_size: int) -> None:
    reader = gguf.GGUFReader(src)
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == VT.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"{src}: nested array {key} is not supported")
            values = field.contents()
            if key == "tokenizer.ggml.tokens" and len(values) != vocab_size:
                raise ValueError(f"{src}: tokenizer has {len(values)} tokens, the model vocab_size is {vocab_size}")
            if len(values) == 0:
                continue
            w.add_key_value(key, values, VT.ARRAY, sub_type=field.types[1])
        else:
            w.add_key_value(key, field.contents(), vtype)
        n += 1
    if n == 0:
        raise ValueError(f"{src} has no tokenizer.* metadata")


# --------------------------------------------------------------------------- writer

def _conv_type(spec: TensorSpec, qtype: QT) -> QT:
    if not spec.is_matrix:
        return QT.F32
    if qtype in (QT.F32, QT.F16):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if spec.shape[-1] % block:
        # convert_hf_to_gguf.py falls back to F16 when a row does not fit the blocks
        return QT.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * tsize


def _fetch(tensors: Mapping[str, Any], name: str) -> np.ndarray:
    v = tensors[name]
    if callable(v) and not isinstance(v, np.ndarray):
        v = v()
    if hasattr(v, "detach"):  # a torch tensor slipped in
        v = v.detach().cpu().float().numpy()
    return np.asarray(v)


def _write_tensor(fout, a: np.ndarray, qtype: QT) -> int:
    """Convert ``a`` (f32, C order) to ``qtype`` in row chunks and write it; returns bytes written."""
    written = 0
    if a.ndim == 1:
        b = _gguf_quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
        b.tofile(fout)
        return b.nbytes
    rows = a.shape[0]
    step = max(1, _CHUNK_ELEMS // max(1, a.shape[1]))
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(a[r0:r0 + step], dtype=np.float32)
        b = _gguf_quantize(chunk, qtype)
        b.tofile(fout)
        written += b.nbytes
    return written


def write_llama_gguf(path: str | os.PathLike, *, dim: int, hidden_dim: int, n_layers: int, n_heads: int,
                     n_kv_heads: int, vocab_size: int, context_length: int, rope_theta: float = 10000.0,
                     norm_eps: float = 1e-5, head_dim: int | None = None,
                     rope_scaling: Mapping[str, Any] | None = None, tensors: Mapping[str, Any],
                     weight_type: str = "f32", tokenizer: str | os.PathLike | None = "bytes",
                     name: str = "dllama-mpi synthetic",
                     extra_metadata: Mapping[str, Any] | None = None, arch: str = "llama") -> Path:
    """Write a llama-architecture GGUF from HF-named float32 tensors (see the module docstring).

    ``tensors``: Mapping of HF names to float32 arrays (or zero-argument callables returning
    them); ``lm_head.weight`` absent means tied embeddings.  ``rope_scaling``: an HF-style dict;
    ``rope_type``/``type`` "llama3" adds ``rope_freqs.weight``, "linear" writes
    ``rope.scaling.type``/``rope.scaling.factor``.  ``tokenizer``: "bytes" (synthetic byte-level
    BPE), None, or the path of a GGUF whose ``tokenizer.*`` fields are copied.
    ``extra_metadata``: additional key -> value pairs (str; bool; int as UINT32, or INT64 when
    negative or large; float as FLOAT32).  ``arch``: "llama", or "qwen2" / "qwen3" (see
    :func:`llama_tensor_specs`).  Returns the path written.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {weight_type!r}")
    if dim <= 0 or hidden_dim <= 0 or n_layers <= 0 or n_heads <= 0 or n_kv_heads <= 0 or vocab_size <= 0:
        raise ValueError("dimensions must be positive")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    hd = head_dim if head_dim is not None else dim // n_heads
    if head_dim is None and dim % n_heads:
        raise ValueError(f"dim ({dim}) is not a multiple of n_heads ({n_heads}); give head_dim")
    if hd % 2:
        raise ValueError(f"head_dim ({hd}) must be even")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    qtype = WEIGHT_TYPES[weight_type]
    path = Path(path)

    tied = "lm_head.weight" not in tensors
    specs = llama_tensor_specs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=n_kv_heads, vocab_size=vocab_size, head_dim=hd, tied=tied,
                               arch=arch)
    expected = {s.hf_name for s in specs}
    missing = sorted(expected - set(tensors.keys()))
    if missing:
        raise ValueError(f"missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    extra = sorted(k for k in tensors.keys() if k not in expected and not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ValueError(f"unexpected tensors: {extra[:8]}{' ...' if len(extra) > 8 else ''}")

    # rope scaling
    rope_freqs: np.ndarray | None = None
    scaling_kv: list[tuple[str, Any]] = []
    if rope_scaling:
        rtype = str(rope_scaling.get("rope_type", rope_scaling.get("type", ""))).lower()
        if rtype == "llama3":
            rope_freqs = llama3_rope_factors(rope_scaling, head_dim=hd, rope_theta=rope_theta)
            specs.insert(0, TensorSpec(None, "rope_freqs.weight", (hd // 2,)))
        elif rtype == "linear":
            scaling_kv.append(("linear", float(rope_scaling["factor"])))
        elif rtype not in ("", "default"):
            raise NotImplementedError(f"rope scaling type {rtype!r} is not supported")

    w = gguf.GGUFWriter(None, arch)
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(norm_eps))
    if hd != dim // n_heads or dim % n_heads:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(FILE_TYPES[weight_type])
    w.add_vocab_size(vocab_size)
    w.add_rope_dimension_count(hd)
    for stype, factor in scaling_kv:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if stype == "linear" else stype)
        w.add_rope_scaling_factor(factor)
    if tokenizer is not None:
        if isinstance(tokenizer, str) and tokenizer == "bytes":
            _add_bytes_tokenizer(w, vocab_size)
        else:
            _copy_tokenizer(w, tokenizer, vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, val in (extra_metadata or {}).items():
        if isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            (w.add_uint32 if 0 <= val < 2**32 else w.add_int64)(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        else:
            raise TypeError(f"extra_metadata[{key!r}] has unsupported type {type(val).__name__}")

    plan: list[tuple[TensorSpec, QT, int]] = []
    for s in specs:
        t = _conv_type(s, qtype)
        nb = _nbytes(s.shape, t)
        plan.append((s, t, nb))
        w.add_tensor_info(s.gguf_name, s.shape, np.dtype(np.float32), nb, raw_dtype=t)

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None and len(w.fout) == 1
        fout = w.fout[0]
        align = w.data_alignment
        w.write_padding(fout, fout.tell())
        for s, t, nb in plan:
            if s.hf_name is None:
                a = rope_freqs
            else:
                a = _fetch(tensors, s.hf_name)
            if tuple(a.shape) != s.shape:
                raise ValueError(f"{s.hf_name}: shape {tuple(a.shape)}, expected {s.shape}")
            if a.dtype != np.float32:
                a = a.astype(np.float32)
            if s.permute_heads:
                a = permute_qk(a, s.permute_heads)
            n = _write_tensor(fout, a, t)
            del a
            if n != nb:
                raise AssertionError(f"{s.gguf_name}: wrote {n} bytes, expected {nb}")
            w.write_padding(fout, nb, align)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path

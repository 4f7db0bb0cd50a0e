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
  llama.cpp's interleaved-pair order (``permute_qk`` of llama_tensors.py, the same reshape/swapaxes as
  ``LlamaModel.permute``);
* 2-D matrices (embedding included) in the requested ``weight_type``; 1-D norms always F32;
* ``llama.*`` hyper-parameters, ``general.file_type``, ``general.quantization_version`` and
  optionally a tokenizer (the synthetic "bytes" vocabulary of bpe_vocab.py, or one copied from
  another GGUF).

Memory: the file is written tensor by tensor.  All tensor infos are computed up front from the
hyper-parameters (so no tensor has to exist before it is written), then each tensor is fetched,
permuted/quantised in row chunks, written and dropped.  ``tensors`` may therefore be any
``Mapping`` -- a plain dict of arrays, a dict whose values are zero-argument callables returning
arrays, or the lazy mapping returned by ``random_llama_tensors`` (which generates a tensor
each time it is indexed, deterministically from ``seed`` and the tensor's name, and keeps
nothing).  Peak memory is about one f32 tensor plus its quantised copy.

The file is written to ``<path>.tmp-<pid>`` and renamed into place when complete, so a reader
never sees a half-written file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf.quants import quantize as _gguf_quantize

from ..formats.base import llama3_rope_factors
from .bpe_vocab import CHATML_TEMPLATE, byte_bpe_vocab
from .kquants import QUANTIZERS as K_QUANTIZERS
from .llama_tensors import ARCHS, TensorSpec, llama_tensor_specs, permute_qk

#: weight_type name -> GGML type of the 2-D matrices ("q4_k_m": the mix of its own below)
WEIGHT_TYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1,
                               "q8_0": QT.Q8_0, "q5_0": QT.Q5_0, "q5_1": QT.Q5_1,
                               "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
                               "q4_k_m": QT.Q4_K}
#: weight_type name -> ``general.file_type`` (llama.cpp's LlamaFileType)
FILE_TYPES: dict[str, int] = {
    "f32": int(gguf.LlamaFileType.ALL_F32),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
    "q4_0": int(gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": int(gguf.LlamaFileType.MOSTLY_Q4_1),
    "q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_0": int(gguf.LlamaFileType.MOSTLY_Q5_0),
    "q5_1": int(gguf.LlamaFileType.MOSTLY_Q5_1),
    "q4_k": int(gguf.LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": int(gguf.LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": int(gguf.LlamaFileType.MOSTLY_Q6_K),
    "q4_k_m": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
}
# llama.cpp's fallbacks for K-quants when a row is not a multiple of 256 values
_K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}

_CHUNK_ELEMS = 1 << 22  # rows are converted in chunks of about this many values


# --------------------------------------------------------------------------- tokenizer

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

def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v / ffn_down Q4_K_M keeps at Q6_K."""
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def _conv_type(spec: TensorSpec, qtype: QT, weight_type: str = "", n_layers: int = 0) -> QT:
    if not spec.is_matrix:
        return QT.F32
    if qtype in (QT.F32, QT.F16):
        return qtype
    if weight_type == "q4_k_m":   # as llama.cpp's llama_tensor_get_type mixes Q4_K_M
        name = spec.gguf_name
        if name == "output.weight":
            qtype = QT.Q6_K
        elif name.endswith(("attn_v.weight", "ffn_down.weight")) and \
                _more_bits(int(name.split(".")[1]), n_layers):
            qtype = QT.Q6_K
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if spec.shape[-1] % block and qtype in _K_FALLBACK:
        qtype = _K_FALLBACK[qtype]
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


def _quantize(a: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype.name in K_QUANTIZERS:       # the gguf package only dequantises K-quants
        return K_QUANTIZERS[qtype.name](a)
    return _gguf_quantize(a, qtype)


def _write_tensor(fout, a: np.ndarray, qtype: QT) -> int:
    """Convert ``a`` (f32, C order) to ``qtype`` in row chunks and write it; returns bytes written."""
    written = 0
    if a.ndim == 1:
        b = _quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
        b.tofile(fout)
        return b.nbytes
    rows = a.shape[0]
    step = max(1, _CHUNK_ELEMS // max(1, a.shape[1]))
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(a[r0:r0 + step], dtype=np.float32)
        b = _quantize(chunk, qtype)
        b.tofile(fout)
        written += b.nbytes
    return written


def write_llama_gguf(path: str | os.PathLike, *, dim: int, hidden_dim: int, n_layers: int, n_heads: int,
                     n_kv_heads: int, vocab_size: int, context_length: int, rope_theta: float = 10000.0,
                     norm_eps: float = 1e-5, head_dim: int | None = None,
                     rope_scaling: Mapping[str, Any] | None = None, tensors: Mapping[str, Any],
                     weight_type: str = "f32", tokenizer: str | os.PathLike | None = "bytes",
                     name: str = "dllama-mpi synthetic",
                     extra_metadata: Mapping[str, Any] | None = None, arch: str = "llama",
                     n_experts: int = 0, n_experts_used: int = 0) -> Path:
    """Write a llama-architecture GGUF from HF-named float32 tensors (see the module docstring).

    ``tensors``: Mapping of HF names to float32 arrays (or zero-argument callables returning
    them); ``lm_head.weight`` absent means tied embeddings.  ``rope_scaling``: an HF-style dict;
    ``rope_type``/``type`` "llama3" adds ``rope_freqs.weight``, "linear" writes
    ``rope.scaling.type``/``rope.scaling.factor``.  ``tokenizer``: "bytes" (synthetic byte-level
    BPE), None, or the path of a GGUF whose ``tokenizer.*`` fields are copied.
    ``extra_metadata``: additional key -> value pairs (str; bool; int as UINT32, or INT64 when
    negative or large; float as FLOAT32).  ``arch``: "llama", or "qwen2" / "qwen3" (see
    :func:`llama_tensor_specs`).  ``n_experts`` / ``n_experts_used``: a mixture of experts
    (Mixtral as "llama", Qwen3-MoE as "qwen3moe"), its tensors named as llama_tensor_specs
    says, ``hidden_dim`` an expert's.  Returns the path written.
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
                               arch=arch, n_experts=n_experts)
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
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(n_experts_used)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(hidden_dim)
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
        t = _conv_type(s, qtype, weight_type, n_layers)
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


def split_gguf(path: str | os.PathLike, out_prefix: str | os.PathLike,
               max_tensors: int) -> list[Path]:
    """Rewrite the GGUF ``path`` as a split GGUF of at most ``max_tensors`` tensors a part,
    as llama.cpp's converter does with ``--split-max-tensors``: parts
    ``<out_prefix>-0000i-of-0000n.gguf``, every key/value in the first part, ``split.no``,
    ``split.count`` and ``split.tensors.count`` in each, tensor bytes unchanged. Returns the
    parts' paths in order."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(Path(f"{out_prefix}.gguf"), arch, split_max_tensors=max_tensors)
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == VT.ARRAY:
            values = field.contents()
            if len(values):
                w.add_key_value(key, values, VT.ARRAY, sub_type=field.types[1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(Path(f"{out_prefix}.gguf"))

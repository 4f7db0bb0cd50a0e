"""GGUF (llama.cpp) models: header -> ModelConfig, canonical tensor name -> tensor.

The header is parsed by gguf_header.py (GGUFHeader, also the tokenizer's GGUF reader) and the
tensor data memory-mapped: only the slices a rank needs are touched. `gguf.GGUFReader` is not used for
model files: it builds a numpy view of every element of every metadata array (seconds and
~160 MB for SmolLM2's 49k tokens and merges, on every rank that opens the file). Here big
arrays are skipped and read only when asked for.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import MIXED, RUNTIME_TYPE, ModelConfig
from ..errors import DllamaError
from .base import FLOAT_TYPES, LazyRows, Tensor, expected_shapes, rope_permutation
from .gguf_header import GGUFHeader

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")  # llama with expert_count: Mixtral
ROTATE_HALF_ARCHS = ("qwen2", "qwen3", "qwen3moe")  # llama.cpp runs them with NEOX rope: q/k
                                                    # unpermuted
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0",
                   "Q5_1")  # K-quants and the 5-bit types: see quant/kquants.py

_LAYER_NAMES = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
    "wo": "attn_output", "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down",
    "w3": "ffn_up", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm",
}
_BIAS_NAMES = {"bq": "attn_q", "bk": "attn_k", "bv": "attn_v"}


_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def gguf_name(name: str) -> str:
    """Canonical name ('layers.3.wq', 'embedding', 'final_norm', 'wcls') -> GGUF name; an
    expert's matrix ('layers.3.experts.5.w1') -> the 3-D tensor of all experts."""
    if name.startswith("layers.") and ".experts." in name:
        _, index, _, _, short = name.split(".")
        return f"blk.{index}.{_EXPERT_NAMES[short]}.weight"
    if name.startswith("layers."):
        _, index, short = name.split(".")
        if short == "router":
            return f"blk.{index}.ffn_gate_inp.weight"
        if short in _BIAS_NAMES:
            return f"blk.{index}.{_BIAS_NAMES[short]}.bias"
        return f"blk.{index}.{_LAYER_NAMES[short]}.weight"
    return {"embedding": "token_embd.weight", "final_norm": "output_norm.weight",
            "wcls": "output.weight", "rope_freqs": "rope_freqs.weight"}[name]


# tensor types whose data are plain values, and their numpy dtypes (as gguf.GGUFReader)
_VALUE_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8,
                 "I16": np.int16, "I32": np.int32, "I64": np.int64}


def _tensors(header: GGUFHeader, path: str, file_size: int) -> dict[str, Tensor]:
    """name -> Tensor over one read-only memory map of the file. GGUF lists dims innermost
    first; data is [out, bytes per row] uint8 for block types (BF16 included, as the gguf
    package gives it) and [out, in] values for F32/F16."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape
    mm = np.memmap(path, dtype=np.uint8, mode="r") if file_size else np.zeros(0, np.uint8)
    out = {}
    for name, type_name, dims, offset, nbytes in header.tensors:
        shape = tuple(reversed(dims))
        if offset + nbytes > file_size:
            raise DllamaError(f"{path} is truncated: tensor {name} ends at byte "
                              f"{offset + nbytes}, file has {file_size}")
        raw = mm[offset:offset + nbytes]
        if type_name in _VALUE_DTYPES:
            data = raw.view(_VALUE_DTYPES[type_name]).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, GGMLQuantizationType[type_name]))
        out[name] = Tensor(name, type_name, shape, data)
    return out


SPLIT_NAME = "{prefix}-{no:05d}-of-{count:05d}.gguf"   # llama.cpp's gguf-split (no from 1)


def split_parts(path: str, header: GGUFHeader) -> list[str]:
    """The files of the split GGUF `path` is a part of (`split.count`, `split.no` from 0),
    in order, named as llama.cpp names them; [path] for a file that is not split."""
    count = int(header.value("split.count", 1) or 1)
    if count <= 1:
        return [path]
    no = int(header.value("split.no", 0))
    suffix = SPLIT_NAME.format(prefix="", no=no + 1, count=count)
    if not path.endswith(suffix) or not 0 <= no < count:
        raise DllamaError(f"{path} is part {no + 1} of a {count}-part split GGUF, but its name "
                          f"does not end in {suffix!r}: cannot find the other parts")
    prefix = path[:-len(suffix)]
    return [SPLIT_NAME.format(prefix=prefix, no=i + 1, count=count) for i in range(count)]


def _open_header(path: str) -> GGUFHeader:
    if not os.path.isfile(path):
        raise DllamaError(f"model file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DllamaError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFHeader(path)
    except ValueError as e:
        raise DllamaError(f"cannot read GGUF file {path}: {e} (truncated or corrupt?)") from None


class GGUFModel:
    """An open GGUF file -- or every part of a split GGUF, from any one of them: the metadata
    of the first part, the tensors of all -- checked up front so that errors come before any
    loading."""

    format = "gguf"

    def __init__(self, path: str):
        path = os.fspath(path)
        header = _open_header(path)
        self.parts = split_parts(path, header)
        self.path = self.parts[0]
        self.tensors: dict[str, Tensor] = {}
        for no, part in enumerate(self.parts):
            if len(self.parts) > 1 and part != path:
                if not os.path.isfile(part):
                    raise DllamaError(f"split GGUF part {no + 1} of {len(self.parts)} is "
                                      f"missing: {part}")
                h = _open_header(part)
            else:
                h = header
            if len(self.parts) > 1 and (int(h.value("split.no", -1)) != no or
                                        int(h.value("split.count", 0)) != len(self.parts)):
                raise DllamaError(f"{part}: not part {no + 1} of {len(self.parts)} (its split.no "
                                  f"is {h.value('split.no')}, split.count "
                                  f"{h.value('split.count')})")
            if no == 0:
                self.header = h
            tensors = _tensors(h, part, os.path.getsize(part))
            twice = sorted(set(tensors) & set(self.tensors))
            if twice:
                raise DllamaError(f"{part}: tensor {twice[0]} is in two parts of the split GGUF")
            self.tensors.update(tensors)
        expected = self.header.value("split.tensors.count")
        if len(self.parts) > 1 and expected is not None and int(expected) != len(self.tensors):
            raise DllamaError(f"{self.path}: the split GGUF's {len(self.parts)} parts hold "
                              f"{len(self.tensors)} tensors, its split.tensors.count says "
                              f"{expected}")
        self.file_size = sum(os.path.getsize(p) for p in self.parts)
        self.config = self._read_config()
        self._check_tensors()
        if self.config.arch in ROTATE_HALF_ARCHS:
            self._to_interleaved()

    # -- header ----------------------------------------------------------------------
    def field(self, key: str, default=None):
        return self.header.value(key, default)

    def _read_config(self) -> ModelConfig:
        arch = self.field("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise DllamaError(f"{self.path}: unsupported architecture {arch!r} "
                              f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        a = arch

        def need(key):
            v = self.field(f"{a}.{key}")
            if v is None:
                raise DllamaError(f"{self.path}: GGUF metadata lacks {a}.{key}")
            return v

        n_heads = int(need("attention.head_count"))
        dim = int(need("embedding_length"))
        emb = self.tensors.get("token_embd.weight")
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            if emb is None:
                raise DllamaError(f"{self.path}: no token_embd.weight tensor")
            vocab = emb.shape[0]
        head_dim = int(self.field(f"{a}.attention.key_length", dim // n_heads))
        freq_factors = None
        if "rope_freqs.weight" in self.tensors:
            freq_factors = tuple(float(v) for v in np.asarray(
                self.tensors["rope_freqs.weight"].data, np.float32).reshape(-1))
        else:
            stype = self.field(f"{a}.rope.scaling.type")
            factor = self.field(f"{a}.rope.scaling.factor")
            if stype == "linear" and factor:
                freq_factors = (float(factor),) * (head_dim // 2)
            elif stype not in (None, "none") and factor and float(factor) != 1.0:
                raise DllamaError(f"{self.path}: unsupported rope scaling {stype!r}")
        n_experts = int(self.field(f"{a}.expert_count", 0) or 0)
        hidden = int(self.field(f"{a}.expert_feed_forward_length", 0) or 0) if n_experts else 0
        if n_experts and not hidden and arch == "qwen3moe":
            need("expert_feed_forward_length")
        return ModelConfig(
            arch=arch, dim=dim, hidden_dim=hidden or int(need("feed_forward_length")),
            n_experts=n_experts,
            n_experts_used=int(self.field(f"{a}.expert_used_count", 0) or 0) if n_experts else 0,
            expert_norm=bool(self.field(f"{a}.expert_weights_norm", True)),
            n_layers=int(need("block_count")), n_heads=n_heads,
            n_kv_heads=int(self.field(f"{a}.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab), context_length=int(self.field(f"{a}.context_length", 0)),
            head_dim=head_dim, rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_freq_factors=freq_factors,
            norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings="output.weight" not in self.tensors,
            attn_bias="blk.0.attn_q.bias" in self.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensors)

    def _check_tensors(self) -> None:
        c = self.config
        c.check()
        expected = expected_shapes(c)
        known = {gguf_name(n) for n in expected}
        extra = sorted(n for n in self.tensors if n.endswith(".bias") and n not in known)
        if extra:
            raise DllamaError(f"{self.path}: unsupported tensors {extra[:4]} (only q/k/v biases "
                              f"are supported)")
        for name, shape in expected.items():
            t = self.tensors.get(gguf_name(name))
            if t is None:
                raise DllamaError(f"{self.path}: missing tensor {gguf_name(name)}")
            if ".experts." in name:   # [n_experts, out, in]: checked as one expert's matrix
                if len(t.shape) != 3 or t.shape[0] != c.n_experts:
                    raise DllamaError(f"{self.path}: tensor {t.name} has shape {t.shape}, "
                                      f"expected ({c.n_experts}, {shape[0]}, {shape[1]})")
                t = t.expert(int(name.split(".")[3]))
            if t.type not in SUPPORTED_TYPES:
                raise DllamaError(f"{self.path}: tensor {t.name} has type {t.type}; supported: "
                                  f"{', '.join(SUPPORTED_TYPES)}")
            if t.shape != shape:
                raise DllamaError(f"{self.path}: tensor {t.name} has shape {t.shape}, "
                                  f"expected {shape}")
            if t.data.size == 0 or t.data.shape[0] != shape[0]:
                raise DllamaError(f"{self.path}: tensor {t.name} is truncated")

    def _to_interleaved(self) -> None:
        """q/k rows (and their biases and norm weights) from rotate-half order to the
        interleaved pairs we run: a row permutation on read (see rope_permutation)."""
        for name in expected_shapes(self.config):
            perm = rope_permutation(self.config, name)
            if perm is None:
                continue
            t = self.tensors[gguf_name(name)]
            arr = t.data
            t.data = LazyRows(arr.shape, arr.dtype,
                              lambda a, b, cols, arr=arr: arr[a:b] if cols is None else arr[a:b, cols],
                              perm=perm)

    def _layer_types(self) -> dict[str, str]:
        """Canonical name -> GGML type of every layer matrix."""
        return {n: self.tensor(n).type for n, shape in expected_shapes(self.config).items()
                if n.startswith("layers.") and len(shape) == 2 and not n.endswith(".router")}

    def preferred_weight_type(self) -> str:
        """Runtime type that loses nothing more than the file: Q4_1 files stay q41, Q4_0
        files q40, float files f32, other files of one type (Q8_0) become q40; a file whose
        layers mix types or hold K-quants or 5-bit types (Q4_K_M: Q4_K, Q6_K) is "mixed":
        every matrix keeps its own form (runtime_types)."""
        types = set(self._layer_types().values())
        if len(types) > 1 and types <= set(FLOAT_TYPES):
            return "f32"
        if len(types) > 1 or types & {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"}:
            return MIXED
        common = types.pop() if types else "F32"
        if common == "Q4_1":
            return "q41"
        return "f32" if common in FLOAT_TYPES else "q40"

    def runtime_types(self) -> dict[str, str]:
        """Canonical layer matrix name -> the runtime form that loses least (config.RUNTIME_TYPE:
        Q4_K -> q41 with its nibbles kept, Q5_K / Q6_K / Q5_x -> q80, Q8_0 -> q80, ...)."""
        return {n: RUNTIME_TYPE[t] for n, t in self._layer_types().items()}

    def output_type(self) -> str:
        """GGML type of the output matrix (the embedding when tied)."""
        name = "embedding" if self.config.tied_embeddings else "wcls"
        return self.tensor(name).type

    # -- tensors ---------------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        t = self.tensors[gguf_name(name)]
        return t.expert(int(name.split(".")[3])) if ".experts." in name else t

    def tokenizer(self):
        from ..tokenizer import Tokenizer
        try:
            return Tokenizer.from_gguf(self.header)  # the fields parsed at open
        except ValueError as e:
            raise DllamaError(f"{self.path}: {e}") from None

    def close(self) -> None:
        self.tensors = {}

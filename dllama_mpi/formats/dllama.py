"""Distributed Llama model (.m) files: read and write; the tokenizer (.t) file next to it.

Layouts (all little-endian; as Distributed Llama writes them, src/llm.cpp and src/tokenizer.cpp):
  .m  int32 magic 0x0A00ABCD, int32 header size (8 + 8 * keys), (int32 key, int32 value)
      pairs, then tensors back to back: embedding F32; per layer wq wk wv wo w1 w2 w3 (the
      weight type), [qwen3: q_norm k_norm F32 [head_dim]], attn_norm ffn_norm F32; final
      norm F32; lm_head (weight type). wq/wk rows are in interleaved-pair rope order (GGUF's)
      for rope_type llama/llama3.1; in rotate-half order (Hugging Face's) for falcon rope,
      which the C++ forces for qwen3 -- permuted to interleaved on read (q/k norms too).
      Q40 blocks are GGML Q4_0 blocks and Q80 blocks GGML Q8_0 blocks, bit for bit.
  .t  the tokenizer file: its layout, reader and packer are tokenizer/dllama_t.py's; found
      next to the .m and written (atomically, like the .m) here.
"""
from __future__ import annotations

import math
import os
import struct

import numpy as np

from ..config import ModelConfig
from ..errors import DllamaError
from .base import (DLLAMA_MAGIC, LazyRows, Tensor, expected_shapes, llama3_rope_factors,
                   load_tokenizer_file, rope_permutation)

KEYS = {0: "version", 1: "arch_type", 2: "dim", 3: "hidden_dim", 4: "n_layers", 5: "n_heads",
        6: "n_kv_heads", 7: "n_experts", 8: "n_active_experts", 9: "vocab_size",
        10: "max_seq_len", 11: "hidden_act", 12: "rope_theta", 13: "weights_float_type",
        14: "rope_scaling_factor", 15: "rope_scaling_low_freq_factor",
        16: "rope_scaling_high_freq_factor", 17: "rope_scaling_orig_max_seq_len",
        18: "rope_type", 19: "head_dim", 20: "norm_epsilon", 21: "moe_hidden_dim"}
KEY_IDS = {v: k for k, v in KEYS.items()}
ARCH_LLAMA, ARCH_QWEN3 = 0xABCD00, 0xABCD01
ARCHS = {0xABCD00: "llama", 0xABCD01: "qwen3", 0xABCD02: "qwen3_moe"}
FLOAT_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q8_0"}       # .m code -> GGML type name
WRITE_TYPES = {"f32": 0, "f16": 1, "q40": 2, "q80": 3}
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
LAYER_ORDER = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # then [q_norm k_norm] attn_norm ffn_norm


def _row_bytes(type_name: str, cols: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    values, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return cols // values * nbytes


def tensor_layout(c: ModelConfig, wtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(canonical name, GGML type, shape) in file order."""
    shapes = expected_shapes(c)
    out = [("embedding", "F32", shapes["embedding"])]
    for i in range(c.n_layers):
        p = f"layers.{i}."
        out += [(p + n, wtype, shapes[p + n]) for n in LAYER_ORDER]
        if c.qk_norm:
            out += [(p + "q_norm", "F32", (c.head_dim,)), (p + "k_norm", "F32", (c.head_dim,))]
        out += [(p + "attn_norm", "F32", (c.dim,)), (p + "ffn_norm", "F32", (c.dim,))]
    return out + [("final_norm", "F32", (c.dim,)), ("wcls", wtype, (c.vocab_size, c.dim))]


def read_header(path: str) -> tuple[dict[str, int], int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DllamaError(f"{path}: too short for a Distributed Llama model ({size} bytes)")
        magic, header_size = struct.unpack("<ii", head)
        if magic in (0xABCD00, 0xABCD01):
            raise DllamaError(f"{path}: old Distributed Llama model format (magic {magic:#x}); "
                              f"reconvert it")
        if magic != DLLAMA_MAGIC:
            raise DllamaError(f"{path}: not a Distributed Llama model (magic {magic & 0xFFFFFFFF:#x},"
                              f" expected {DLLAMA_MAGIC:#x})")
        if header_size < 8 or (header_size - 8) % 8 or header_size > size:
            raise DllamaError(f"{path}: bad header size {header_size} (file has {size} bytes)")
        body = f.read(header_size - 8)
    values = struct.unpack(f"<{(header_size - 8) // 4}i", body)
    header = {}
    for key, value in zip(values[::2], values[1::2]):
        if key not in KEYS:
            raise DllamaError(f"{path}: unknown header key {key} (value {value})")
        header[KEYS[key]] = value
    return header, header_size


def config_from_header(h: dict[str, int], where: str) -> tuple[ModelConfig, str, int]:
    """(ModelConfig, GGML weight type, rope type) or a DllamaError."""
    arch = h.get("arch_type", ARCH_LLAMA)
    if arch not in (ARCH_LLAMA, ARCH_QWEN3):
        name = ARCHS.get(arch)
        if name:
            raise DllamaError(f"{where}: architecture {name} is not supported yet (only llama "
                              f"and qwen3)")
        raise DllamaError(f"{where}: unknown architecture type {arch:#x}")
    if "weights_float_type" not in h:
        raise DllamaError(f"{where}: the header does not give weights_float_type")
    wt = FLOAT_TYPES.get(h["weights_float_type"])
    if wt is None:
        raise DllamaError(f"{where}: unsupported weights float type {h['weights_float_type']} "
                          f"(supported: 0 F32, 1 F16, 2 Q40, 3 Q80)")
    if h.get("hidden_act", 1) != 1:
        raise DllamaError(f"{where}: unsupported hidden_act {h['hidden_act']} (only 1, silu)")
    if h.get("n_experts", 0) > 0:
        raise DllamaError(f"{where}: mixture-of-experts models are not supported yet")
    for k in ("dim", "hidden_dim", "n_layers", "n_heads", "vocab_size"):
        if k not in h:
            raise DllamaError(f"{where}: the header lacks {k}")
    dim, n_heads = h["dim"], h["n_heads"]
    head_dim = h.get("head_dim") or (dim // n_heads if n_heads > 0 else 0)
    rope_type = ROPE_FALCON if arch == ARCH_QWEN3 else h.get("rope_type", ROPE_LLAMA)  # as C++
    theta = float(h.get("rope_theta", 10000))
    factors = None
    if rope_type == ROPE_LLAMA3_1:
        scaling = {"factor": h.get("rope_scaling_factor", 1),
                   "low_freq_factor": h.get("rope_scaling_low_freq_factor", 0),
                   "high_freq_factor": h.get("rope_scaling_high_freq_factor", 0),
                   "original_max_position_embeddings": h.get("rope_scaling_orig_max_seq_len", 0)}
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"] or \
                scaling["original_max_position_embeddings"] <= 0:
            raise DllamaError(f"{where}: bad llama3.1 rope scaling {scaling}")
        factors = tuple(float(v) for v in
                        llama3_rope_factors(scaling, head_dim=head_dim, rope_theta=theta))
    elif rope_type not in (ROPE_LLAMA, ROPE_FALCON):
        raise DllamaError(f"{where}: unknown rope type {rope_type}")
    eps = h.get("norm_epsilon", 5)
    if eps <= 0:
        raise DllamaError(f"{where}: bad norm_epsilon {eps}")
    c = ModelConfig(arch=ARCHS[arch], dim=dim, hidden_dim=h["hidden_dim"], n_layers=h["n_layers"],
                    n_heads=n_heads, n_kv_heads=h.get("n_kv_heads", n_heads),
                    vocab_size=h["vocab_size"], context_length=max(0, h.get("max_seq_len", 0)),
                    head_dim=head_dim, rope_theta=theta, rope_freq_factors=factors,
                    norm_eps=10.0 ** -eps, tied_embeddings=False,
                    qk_norm=arch == ARCH_QWEN3)
    c.check()
    return c, wt, rope_type


class DllamaModel:
    """A Distributed Llama .m file (plus, for the tokenizer, a .t file), checked up front."""

    format = "dllama"

    def __init__(self, path: str, tokenizer_path: str | None = None):
        if not os.path.isfile(path):
            raise DllamaError(f"model file not found: {path}")
        self.path, self.tokenizer_path = path, tokenizer_path
        self.header, header_size = read_header(path)
        self.config, self.weight_type, self.rope_type = config_from_header(self.header, path)
        c = self.config
        layout = tensor_layout(c, self.weight_type)
        size = os.path.getsize(path)
        for name, t, shape in layout:
            if t not in ("F32", "F16") and shape[-1] % 32:
                raise DllamaError(f"{path}: {name} has rows of {shape[-1]} values, not whole "
                                  f"32-blocks, in a {t} file")
        need = header_size + sum(shape[0] * (_row_bytes(t, shape[1]) if len(shape) == 2
                                             else 4) for _, t, shape in layout)
        if need != size:
            raise DllamaError(f"{path}: file has {size} bytes but the header describes {need} "
                              f"({'truncated' if size < need else 'trailing bytes'}; wrong shape "
                              f"or weight type?)")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.tensors: dict[str, Tensor] = {}
        offset = header_size
        for name, t, shape in layout:
            self.tensors[name] = self._tensor(name, t, shape, offset)
            offset += shape[0] * (_row_bytes(t, shape[1]) if len(shape) == 2 else 4)

    def _tensor(self, name, t, shape, offset) -> Tensor:
        if len(shape) == 1:
            data = self._mm[offset:offset + 4 * shape[0]].view(np.float32)
        elif t in ("F32", "F16"):
            dt = np.float32 if t == "F32" else np.float16
            n = shape[0] * shape[1] * np.dtype(dt).itemsize
            data = self._mm[offset:offset + n].view(dt).reshape(shape)
        else:
            rb = _row_bytes(t, shape[1])
            data = self._mm[offset:offset + shape[0] * rb].reshape(shape[0], rb)
        perm = rope_permutation(self.config, name) if self.rope_type == ROPE_FALCON else None
        return Tensor(name, t, shape, data if perm is None else _permuted(data, perm))

    @property
    def rope_scaling(self) -> dict | None:
        h = self.header
        if self.rope_type != ROPE_LLAMA3_1:
            return None
        return {"rope_type": "llama3", "factor": h["rope_scaling_factor"],
                "low_freq_factor": h["rope_scaling_low_freq_factor"],
                "high_freq_factor": h["rope_scaling_high_freq_factor"],
                "original_max_position_embeddings": h["rope_scaling_orig_max_seq_len"]}

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]

    def preferred_weight_type(self) -> str:
        return "f32" if self.weight_type in ("F32", "F16") else "q40"

    def output_type(self) -> str:
        return self.weight_type

    def tokenizer(self):
        path = self.tokenizer_path or find_tokenizer_t(self.path)
        if path is None:
            raise DllamaError(f"{self.path}: no tokenizer (.t) found next to it; give --tokenizer")
        return load_tokenizer_file(path)

    def close(self) -> None:
        self._mm = None


def _permuted(arr, perm: np.ndarray) -> LazyRows:
    """arr (rows, or a vector) seen with row r = arr[perm[r]]."""
    return LazyRows(arr.shape, arr.dtype,
                    lambda a, b, cols: arr[a:b] if cols is None else arr[a:b, cols], perm=perm)


def find_tokenizer_t(model_path: str) -> str | None:
    """X.t next to X.m, else dllama_tokenizer_*.t or the only .t in the folder."""
    stem = os.path.splitext(model_path)[0]
    if os.path.isfile(stem + ".t"):
        return stem + ".t"
    folder = os.path.dirname(os.path.abspath(model_path))
    ts = sorted(n for n in os.listdir(folder) if n.endswith(".t"))
    return os.path.join(folder, ts[0]) if len(ts) == 1 else None


# --------------------------------------------------------------------------- .m writer

def norm_epsilon_code(eps: float) -> int:
    k = round(-math.log10(eps))
    if k <= 0 or abs(10.0 ** -k - eps) > 1e-4 * eps:
        raise DllamaError(f"norm epsilon {eps} cannot be written to a .m file (only 1e-k)")
    return k


def fit_llama3_scaling(c: ModelConfig) -> dict:
    """The integer llama3 parameters whose factors are c.rope_freq_factors (a .m header holds
    integers only), found by search; a DllamaError when there are none."""
    want = np.asarray(c.rope_freq_factors, np.float32)
    factor = round(float(want.max()))
    for orig in [2 ** k for k in range(4, 21)] + [1000 * k for k in (2, 4, 8, 16, 32)]:
        for low in (1, 2, 4, 8):
            for high in (2, 4, 8, 16, 32):
                if high <= low:
                    continue
                s = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                     "original_max_position_embeddings": orig}
                got = llama3_rope_factors(s, head_dim=c.head_dim, rope_theta=c.rope_theta)
                if np.allclose(got, want, rtol=1e-5, atol=0):
                    return s
    raise DllamaError("the model's rope frequency factors are not llama3 scaling with integer "
                      "parameters: a .m file cannot hold them")


def m_header(c: ModelConfig, wtype_code: int, rope_scaling: dict | None = None) -> bytes:
    if c.rope_theta != int(c.rope_theta):
        raise DllamaError(f"rope theta {c.rope_theta} is not an integer: a .m file cannot hold it")
    if c.attn_bias:
        raise DllamaError("a Distributed Llama .m file cannot hold q/k/v biases (Qwen2)")
    if c.qk_norm and c.rope_freq_factors is not None:
        raise DllamaError("a Distributed Llama qwen3 .m file cannot hold rope scaling")
    arch = ARCH_QWEN3 if c.qk_norm else ARCH_LLAMA
    h = {"version": 0, "arch_type": arch, "hidden_act": 1, "dim": c.dim,
         "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
         "n_kv_heads": c.n_kv_heads, "weights_float_type": wtype_code,
         "max_seq_len": c.context_length or 4096, "vocab_size": c.vocab_size,
         "n_experts": 0, "n_active_experts": 0, "rope_theta": int(c.rope_theta)}
    if c.rope_freq_factors is not None:
        s = rope_scaling
        if s is None or str(s.get("rope_type", s.get("type"))) != "llama3" or any(
                float(s[k]) != int(s[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")):
            s = fit_llama3_scaling(c)
        h.update(rope_scaling_factor=int(s["factor"]),
                 rope_scaling_low_freq_factor=int(s["low_freq_factor"]),
                 rope_scaling_high_freq_factor=int(s["high_freq_factor"]),
                 rope_scaling_orig_max_seq_len=int(s["original_max_position_embeddings"]),
                 rope_type=ROPE_LLAMA3_1)
    else:
        h["rope_type"] = ROPE_FALCON if arch == ARCH_QWEN3 else ROPE_LLAMA
    h.update(head_dim=c.head_dim, norm_epsilon=norm_epsilon_code(c.norm_eps))
    pairs = [v for k, val in h.items() for v in (KEY_IDS[k], int(val))]
    return struct.pack(f"<ii{len(pairs)}i", DLLAMA_MAGIC, 8 + 4 * len(pairs), *pairs)


def convert_rows(tensor: Tensor, target: str, chunk_values: int = 1 << 22):
    """Yield a tensor's rows converted to `target` GGML type (f32/f16 values or block bytes),
    a band at a time; Q4_0 -> Q4_0 and Q8_0 -> Q8_0 pass through bit for bit."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize, quantize
    from ..shard import Range
    rows = tensor.shape[0]
    if len(tensor.shape) == 1:
        yield np.ascontiguousarray(dequantize(np.asarray(tensor.read()), tensor.ggml_type),
                                   np.float32).astype({"F32": np.float32, "F16": np.float16}[target])
        return
    step = max(1, chunk_values // tensor.shape[1])
    for r0 in range(0, rows, step):
        raw = np.ascontiguousarray(tensor.read(rows=Range(r0, min(rows, r0 + step))))
        if tensor.type == target:
            yield raw
            continue
        values = np.ascontiguousarray(dequantize(raw, tensor.ggml_type), dtype=np.float32)
        if target == "F32":
            yield values
        elif target == "F16":
            yield values.astype(np.float16)
        else:
            yield quantize(values, QT[target])


def write_dllama_m(model, out_path: str, weights_float_type: str = "q40", progress=None,
                   checkpoint=None) -> str:
    """Write any open model (base.py interface) as a Distributed Llama .m file; atomically.
    checkpoint(): called between pieces of work, where stopping is safe (it may raise)."""
    if weights_float_type not in WRITE_TYPES:
        raise DllamaError(f".m weight type must be one of {', '.join(WRITE_TYPES)}, "
                          f"got {weights_float_type!r}")
    c = model.config
    if c.n_experts:
        raise DllamaError("mixture-of-experts models cannot be written as a .m file yet "
                          "(convert to .h5, or run the GGUF / Hugging Face folder itself)")
    code = WRITE_TYPES[weights_float_type]
    wtype = FLOAT_TYPES[code]
    if wtype not in ("F32", "F16") and (c.dim % 32 or c.hidden_dim % 32 or c.q_dim % 32):
        raise DllamaError(f"{weights_float_type} needs dim, hidden_dim and heads*head_dim to be "
                          f"multiples of 32 (dim {c.dim}, hidden {c.hidden_dim}, q {c.q_dim})")
    header = m_header(c, code, getattr(model, "rope_scaling", None))
    layout = tensor_layout(c, wtype)

    def write(f):
        f.write(header)
        for name, t, _ in layout:
            src = model.tensor("embedding" if name == "wcls" and c.tied_embeddings else name)
            perm = rope_permutation(c, name) if c.qk_norm else None
            if perm is not None:  # qwen3: falcon rope, rotate-half rows in the file
                src = Tensor(src.name, src.type, src.shape, _permuted(src.data, np.argsort(perm)))
            for part in convert_rows(src, t):
                f.write(np.ascontiguousarray(part).tobytes())
                if checkpoint is not None:
                    checkpoint()
            if progress is not None:
                progress(1)
        if checkpoint is not None:
            checkpoint()

    return atomic_write(out_path, write)


def atomic_write(out_path: str, write) -> str:
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_path


# --------------------------------------------------------------------------- .t writer

def write_dllama_t(tokenizer, out_path: str) -> str:
    """Write our Tokenizer as a .t file (raw token bytes, scores -id unless known)."""
    from ..tokenizer.dllama_t import pack_dllama_t, tfile_from_tokenizer
    data = pack_dllama_t(tfile_from_tokenizer(tokenizer))
    return atomic_write(out_path, lambda f: f.write(data))

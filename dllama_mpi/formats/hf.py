"""Hugging Face model folders: config.json + *.safetensors (+ tokenizer files).

The safetensors files are opened with the `safetensors` library (which validates them) and
read memory-mapped: a rank's band of rows is a slice of the mapping. bf16 tensors are
widened to float32 on read (numpy has no bf16); f16 and f32 are handed over as they are.
HF stores q/k rows in rotate-half order; their Tensor rows (and those of the q/k biases and
q/k norm weights) are permuted per head into the interleaved-pair order we run, on read.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..config import ModelConfig
from ..errors import DllamaError
from .base import LazyRows, Tensor, expected_shapes, llama3_rope_factors, rope_permutation

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
NOT_YET = {"qwen2_moe": "shared experts"}
# mixture-of-experts FFNs: (router, expert prefix, {canonical: HF name of an expert's matrix})
_MOE = {"qwen3_moe": ("mlp.gate", "mlp.experts", {"w1": "gate_proj", "w3": "up_proj",
                                                   "w2": "down_proj"}),
        "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts",
                    {"w1": "w1", "w3": "w3", "w2": "w2"})}

_LAYER = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
          "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
          "ffn_norm": "post_attention_layernorm", "w1": "mlp.gate_proj", "w2": "mlp.down_proj",
          "w3": "mlp.up_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
_BIAS = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}
_DTYPES = {"F32": (np.float32, "F32"), "F16": (np.float16, "F16"), "BF16": (np.uint16, "F32")}


def hf_name(name: str, model_type: str = "llama") -> str:
    """Canonical name -> Hugging Face state-dict name (experts as `model_type` names them)."""
    if name.startswith("layers.") and (".experts." in name or name.endswith(".router")):
        router, experts, names = _MOE[model_type]
        parts = name.split(".")
        if parts[2] == "router":
            return f"model.layers.{parts[1]}.{router}.weight"
        return f"model.layers.{parts[1]}.{experts}.{parts[3]}.{names[parts[4]]}.weight"
    if name.startswith("layers."):
        _, i, short = name.split(".")
        if short in _BIAS:
            return f"model.layers.{i}.{_BIAS[short]}.bias"
        return f"model.layers.{i}.{_LAYER[short]}.weight"
    return {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
            "wcls": "lm_head.weight"}[name]


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise DllamaError(f"cannot read {path}: {e}") from None
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type",
                                                                           cfg.get("model_type"))}
    return cfg


def rope_from_hf(cfg: dict, head_dim: int, where: str) -> tuple[float, tuple | None]:
    """(rope base, per-pair frequency divisors or None) from a transformers 4 or 5 config:
    base top-level (`rope_theta`) or under `rope_parameters`; scaling in `rope_scaling`
    (4.x) or `rope_parameters` (5.x)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rtype = str(scaling.get("rope_type", scaling.get("type", "default")) or "default").lower()
    if rtype == "default":
        return theta, None
    if rtype == "llama3":
        f = llama3_rope_factors(scaling, head_dim=head_dim, rope_theta=theta)
        return theta, tuple(float(v) for v in f)
    if rtype == "linear":
        return theta, (float(scaling["factor"]),) * (head_dim // 2)
    raise DllamaError(f"{where}: unsupported rope scaling type {rtype!r} (supported: default, "
                      f"llama3, linear)")


def config_from_hf(cfg: dict, where: str, tied: bool) -> ModelConfig:
    arch = str(cfg.get("model_type", "")).lower()
    if arch in NOT_YET:
        raise DllamaError(f"{where}: architecture {arch!r} is not supported yet ({NOT_YET[arch]} "
                          f"are not implemented); supported: {', '.join(SUPPORTED_ARCHS)}")
    if arch not in SUPPORTED_ARCHS:
        raise DllamaError(f"{where}: unsupported architecture {arch!r} (model_type); supported: "
                          f"{', '.join(SUPPORTED_ARCHS)}")
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise DllamaError(f"{where}: unsupported hidden_act {act!r} (only silu)")
    for flag in ("attention_bias", "mlp_bias"):  # llama/mistral/qwen3: o_proj (mlp) bias too
        if cfg.get(flag):
            raise DllamaError(f"{where}: {flag} is set; only Qwen2's q/k/v biases are "
                              f"supported")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        ctx = int(cfg.get("max_position_embeddings") or 0)
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", True) and 0 < int(window) < ctx:
            ctx = int(window)  # no sliding-window attention here: exact within the window
        theta, factors = rope_from_hf(cfg, head_dim, where)
        moe = {}
        if arch in _MOE:
            sparse = (cfg.get("decoder_sparse_step") or 1, cfg.get("mlp_only_layers") or [])
            if sparse != (1, []):
                raise DllamaError(f"{where}: dense layers among the expert ones "
                                  f"(decoder_sparse_step, mlp_only_layers) are not supported")
            n_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
            if not n_experts:
                raise DllamaError(f"{where}: config.json lacks num_experts (num_local_experts)")
            moe = dict(n_experts=int(n_experts),
                       n_experts_used=int(cfg["num_experts_per_tok"]),
                       expert_norm=arch == "mixtral" or bool(cfg.get("norm_topk_prob")))
        hidden = cfg["moe_intermediate_size"] if arch == "qwen3_moe" else cfg["intermediate_size"]
        return ModelConfig(
            arch={"qwen3_moe": "qwen3moe", "mixtral": "llama"}.get(
                arch, arch if arch.startswith("qwen") else "llama"), dim=dim,
            hidden_dim=int(hidden), **moe,
            n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]), context_length=ctx, head_dim=head_dim,
            rope_theta=theta, rope_freq_factors=factors,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), tied_embeddings=tied,
            attn_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "qwen3_moe"))
    except KeyError as e:
        raise DllamaError(f"{where}: config.json lacks {e.args[0]}") from None


class _Safetensors:
    """One .safetensors file: validated by the safetensors library, mapped with numpy."""

    def __init__(self, path: str):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="numpy") as f:
                self.names = list(f.keys())
        except Exception as e:  # the library raises SafetensorError on any damage
            raise DllamaError(f"cannot read {path}: {e} (truncated or corrupt?)") from None
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.path, self.base = path, 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")

    def array(self, name: str) -> tuple[np.ndarray, str]:
        h = self.header[name]
        if h["dtype"] not in _DTYPES:
            raise DllamaError(f"{self.path}: tensor {name} has dtype {h['dtype']}; supported: "
                              f"{', '.join(_DTYPES)}")
        start, stop = h["data_offsets"]
        dt = np.dtype(_DTYPES[h["dtype"]][0])
        return self.mm[self.base + start:self.base + stop].view(dt).reshape(h["shape"]), h["dtype"]


class HFModel:
    """A Hugging Face folder, checked up front."""

    format = "hf"

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise DllamaError(f"model folder not found: {folder}")
        self.path = folder
        cfg = _read_config(folder)
        self.hf_config = cfg
        self.files = self._open_files()
        owner = {}
        for f in self.files:
            for n in f.names:
                owner[n] = f
        self._owner = owner
        tied_flag = cfg.get("tie_word_embeddings")
        tied = bool(tied_flag) if tied_flag is not None else "lm_head.weight" not in owner
        self.config = config_from_hf(cfg, folder, tied)
        self.config.check()
        self.tensors = self._build_tensors()

    def _open_files(self) -> list[_Safetensors]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            missing = [n for n in names if not os.path.isfile(os.path.join(self.path, n))]
            if missing:
                raise DllamaError(f"{self.path}: shards listed in the index are missing: "
                                  f"{', '.join(missing)}")
        else:
            names = sorted(n for n in os.listdir(self.path)
                           if n.endswith(".safetensors") and not n.startswith("."))
        if not names:
            raise DllamaError(f"{self.path}: no *.safetensors files")
        return [_Safetensors(os.path.join(self.path, n)) for n in names]

    def _build_tensors(self) -> dict[str, Tensor]:
        c = self.config
        expected = expected_shapes(c)
        model_type = str(self.hf_config.get("model_type", "")).lower()
        wanted = {hf_name(n, model_type): n for n in expected}
        ignorable = ("rotary_emb.inv_freq",)
        unknown = sorted(n for n in self._owner if n not in wanted and
                         not n.endswith(ignorable) and not (n == "lm_head.weight" and
                                                            c.tied_embeddings))
        if unknown:
            raise DllamaError(f"{self.path}: unexpected tensors {unknown[:6]}"
                              f"{' ...' if len(unknown) > 6 else ''} (not a plain Llama/Qwen?)")
        tensors = {}
        for hname, name in wanted.items():
            f = self._owner.get(hname)
            if f is None:
                raise DllamaError(f"{self.path}: missing tensor {hname}")
            arr, dtype = f.array(hname)
            if tuple(arr.shape) != expected[name]:
                raise DllamaError(f"{self.path}: tensor {hname} has shape {tuple(arr.shape)}, "
                                  f"expected {expected[name]}")
            perm = rope_permutation(c, name)
            tensors[name] = Tensor(hname, _DTYPES[dtype][1], arr.shape,
                                   _rows(arr, perm, dtype == "BF16"))
        return tensors

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]

    def preferred_weight_type(self) -> str:
        return "f32"

    def output_type(self) -> str:
        return self.tensor("embedding" if self.config.tied_embeddings else "wcls").type

    def tokenizer(self):
        from ..tokenizer import Tokenizer
        path = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DllamaError(f"{self.path}: no tokenizer.json (give --tokenizer)")
        try:
            return Tokenizer.from_hf_files(path)
        except Exception as e:
            raise DllamaError(f"{path}: {e}") from None

    def close(self) -> None:
        self.files = []


def _rows(arr: np.ndarray, perm, bf16: bool):
    """The Tensor data of one mapped array: the array itself when nothing is to be done."""
    convert = _bf16_to_f32 if bf16 else None
    if perm is None and convert is None:
        return arr
    dtype = np.float32 if bf16 else arr.dtype

    def fetch(start, stop, cols):
        return arr[start:stop] if cols is None else arr[start:stop, cols]

    return LazyRows(arr.shape, dtype, fetch, perm=perm, convert=convert)

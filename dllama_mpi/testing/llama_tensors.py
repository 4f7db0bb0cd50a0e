"""Llama tensors in Hugging Face naming for test and benchmark models: the tensor layout of a
GGUF (HF name, GGUF name, shape, q/k permutation), llama.cpp's q/k row permutation, and random
weights made on access (:func:`random_llama_tensors`: one tensor at a time, any shape).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")


@dataclass(frozen=True)
class TensorSpec:
    hf_name: str | None       # Hugging Face name (None for generated tensors such as rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]    # numpy / HF shape, [out, in] for matrices
    permute_heads: int = 0    # >0: rows permuted with permute_qk(w, permute_heads)

    @property
    def is_matrix(self) -> bool:
        """Quantised with the weights: matrices and stacks of experts' matrices, not the
        norms nor a mixture of experts' router (llama.cpp keeps ffn_gate_inp F32)."""
        return len(self.shape) >= 2 and not self.gguf_name.endswith("ffn_gate_inp.weight")


def llama_tensor_specs(*, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                       vocab_size: int, head_dim: int | None = None, tied: bool = False,
                       arch: str = "llama", n_experts: int = 0) -> list[TensorSpec]:
    """The tensors of a Llama model in file order, with HF names, GGUF names and HF shapes.
    ``arch`` "qwen2" adds the q/k/v biases, "qwen3" (and "qwen3moe") the per-head q/k norms;
    they keep Hugging Face's rotate-half q/k order (llama.cpp runs them with NEOX rope: no
    permutation). ``n_experts``: a mixture of experts (Mixtral as "llama", Qwen3-MoE as
    "qwen3moe") whose FFN is the router ``mlp.gate.weight`` [n_experts, dim] and the experts'
    matrices stacked as GGUF holds them, ``mlp.experts.{gate,up,down}_proj`` [n_experts, ...]
    (``hidden_dim`` is then an expert's)."""
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
        ]
        if n_experts:
            e = n_experts
            specs += [
                TensorSpec(p + "mlp.gate.weight", b + "ffn_gate_inp.weight", (e, dim)),
                TensorSpec(p + "mlp.experts.gate_proj", b + "ffn_gate_exps.weight", (e, hidden_dim, dim)),
                TensorSpec(p + "mlp.experts.up_proj", b + "ffn_up_exps.weight", (e, hidden_dim, dim)),
                TensorSpec(p + "mlp.experts.down_proj", b + "ffn_down_exps.weight", (e, dim, hidden_dim)),
            ]
        else:
            specs += [
                TensorSpec(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (hidden_dim, dim)),
                TensorSpec(p + "mlp.up_proj.weight", b + "ffn_up.weight", (hidden_dim, dim)),
                TensorSpec(p + "mlp.down_proj.weight", b + "ffn_down.weight", (dim, hidden_dim)),
            ]
        if arch == "qwen2":
            specs += [TensorSpec(p + f"self_attn.{x}_proj.bias", b + f"attn_{x}.bias", (n,))
                      for x, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
        if arch in ("qwen3", "qwen3moe"):
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
                         std: float = 0.02, seed: int = 0, n_experts: int = 0) -> LazyTensors:
    """Random Llama weights in HF naming/orientation, as a lazy mapping (see :class:`LazyTensors`).

    Matrices ~ normal(0, std); norm weights ~ 1 + normal(0, 0.1).  Each tensor depends only on
    ``seed`` and its name, so any access order gives the same values.  ``tied=True`` omits
    ``lm_head.weight``; ``n_experts``: a mixture of experts (llama_tensor_specs).
    """
    specs = llama_tensor_specs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=n_kv_heads, vocab_size=vocab_size, head_dim=head_dim, tied=tied,
                               n_experts=n_experts)

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

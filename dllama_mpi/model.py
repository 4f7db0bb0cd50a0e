"""The Llama forward pass for one rank's shard, top to bottom. No I/O.

Every rank holds the full residual x [T, dim] and its own slice of every matrix
(see shard.py): attention heads q_heads, KV heads kv_heads, FFN units ffn, vocab rows.
Two reductions per layer: after wo and after w2 (both in-split: partial sums).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import numpy as np

from . import kernels
from .config import ModelConfig
from .quant import QK
from .shard import STACKS, ShardPlan, expert_names, stack_runs

Matrix = "np.ndarray | Q40Matrix | Q41Matrix | Q80Matrix | SplitMatrix"  # f32/f16 [out, in], a
# block-quantised runtime form, or a stack of parts of different forms


class SplitMatrix:
    """A stacked matrix (wq|wk|wv, w1|w3) whose parts differ in runtime type (a Q4_K_M
    layer: Q4_K wq and wk, Q6_K wv): one matrix per run of parts of one type, their output
    rows one after the other (`bounds`). Model._matmul runs each into its band of the output."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        self.bounds, r = [], 0
        for m in self.parts:
            n = m.shape[0] if isinstance(m, np.ndarray) else m.rows
            self.bounds.append((r, r + n))
            r += n
        self.rows = r

    @property
    def nbytes(self) -> int:
        return sum(int(m.nbytes) for m in self.parts)

    def __repr__(self) -> str:
        return f"SplitMatrix({self.parts!r})"


def is_quantised(m) -> bool:
    """A block-quantised runtime matrix (or a stack with such a part): takes Q80 inputs."""
    if isinstance(m, SplitMatrix):
        return any(is_quantised(p) for p in m.parts)
    return not isinstance(m, np.ndarray)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray   # f32 [dim]
    wqkv: Matrix            # out-split [q_cols + 2 * kv_cols, dim]: this rank's wq, wk, wv rows
    wo: Matrix              # in-split  [dim, q_cols]
    ffn_norm: np.ndarray    # f32 [dim]
    w13: Matrix | None      # out-split [2 * ffn, dim]: this rank's w1 (gate) rows, then w3 (up)
    w2: Matrix | None       # in-split  [dim, ffn]  (down); both None with experts
    bqkv: np.ndarray | None = None    # f32 [q_cols + 2 * kv_cols] q/k/v biases (Qwen2), cut like
                                      # the rows of wqkv (bq, bk in their interleaved rope order)
    q_norm: np.ndarray | None = None  # f32 [head_dim] per-head RMSNorm weights of q and k
    k_norm: np.ndarray | None = None  # f32 [head_dim] (Qwen3), replicated
    router: np.ndarray | None = None  # f32 [n_experts, dim], replicated (mixture of experts)
    experts: list | None = None       # per expert (w13, w2), this rank's slices as w13, w2

    @classmethod
    def from_slices(cls, t: dict[str, np.ndarray], matrix, type_of=None) -> "LayerWeights":
        """A layer from this rank's slices by short name (attn_norm, wq, wk, wv, wo, ffn_norm,
        w1, w2, w3 [, bq, bk, bv] [, q_norm, k_norm]), matrices as rows of f32 values or of
        GGML block bytes; matrix(rows, type) makes the runtime matrix of a runtime type, and
        type_of(short name) is each matrix's type (None: one type for all).  The matrices that
        read the same input are stacked: one matmul for q, k and v, one for gate and up --
        when their types agree; otherwise a SplitMatrix of the runs that agree."""
        type_of = type_of or (lambda name: None)

        def stack(names):
            parts = [matrix(np.concatenate([t[n] for n in run]) if len(run) > 1 else t[run[0]],
                            type_of(run[0])) for run in stack_runs(names, type_of)]
            return parts[0] if len(parts) == 1 else SplitMatrix(parts)

        bias = (np.concatenate([t["bq"], t["bk"], t["bv"]]) if "bq" in t else None)
        moe = "router" in t
        m = {field: stack(names) if not (moe and field in ("w13", "w2")) else None
             for field, names in STACKS.items()}
        experts = None
        if moe:
            n = len(t["router"])
            experts = [(stack(expert_names(e)[:2]), stack(expert_names(e)[2:])) for e in range(n)]
        return cls(attn_norm=t["attn_norm"], ffn_norm=t["ffn_norm"], **m,
                   bqkv=bias, q_norm=t.get("q_norm"), k_norm=t.get("k_norm"),
                   router=t.get("router"), experts=experts)

    def matrices(self) -> list:
        """Every runtime matrix of the layer, in the order a forward pass reads them."""
        out = [self.wqkv, self.wo]
        if self.experts is None:
            return out + [self.w13, self.w2]
        return out + [m for pair in self.experts for m in pair]


@dataclass
class ShardWeights:
    layers: list[LayerWeights]
    final_norm: np.ndarray  # f32 [dim]
    wcls: Matrix            # out-split [vocab rows, dim]

    def nbytes(self) -> int:
        def size(m):
            return m.nbytes
        total = size(self.final_norm) + size(self.wcls)
        for lw in self.layers:
            total += sum(size(getattr(lw, f)) for f in lw.__dataclass_fields__
                         if getattr(lw, f) is not None and f != "experts")
            if lw.experts is not None:
                total += sum(size(m) for pair in lw.experts for m in pair)
        return total


def pack_weights(weights: ShardWeights) -> None:
    """Move every matrix's data into one buffer, in the order a forward pass reads them.
    Decode streams the weights once per token; as one run of memory they sit on huge pages
    (numpy advises them for large buffers; 121 small matrices of SmolLM2 on 4 kB pages cost
    TLB misses) and the kernels' prefetch runs on from one matrix into the next."""
    mats = [m for lw in weights.layers for m in lw.matrices()] + [weights.wcls]
    arena = np.empty(sum(_aligned(a.nbytes) for m in mats for a in _data(m)), np.uint8)
    del mats                        # no reference may outlive the move: see below
    offset = 0

    def place(a: np.ndarray) -> np.ndarray:
        nonlocal offset
        if a.nbytes == 0:
            return a
        view = arena[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        offset += _aligned(a.nbytes)
        return view

    # layer by layer, the old copies freed as we go and their heap pages given back at once
    # (glibc keeps freed blocks below its mmap threshold, up to 32 MiB): otherwise the
    # arena and every old copy are resident together, twice the shard at the peak
    for lw in weights.layers:
        for name in ("wqkv", "wo", "w13", "w2"):
            if getattr(lw, name) is not None:
                setattr(lw, name, _moved(getattr(lw, name), place))
        if lw.experts is not None:
            lw.experts = [(_moved(a, place), _moved(b, place)) for a, b in lw.experts]
        trim_heap()
    weights.wcls = _moved(weights.wcls, place)
    trim_heap()


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc malloc_trim; a no-op elsewhere)."""
    import ctypes
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64          # every part on its own cache lines


def _data(m) -> list[np.ndarray]:
    if isinstance(m, np.ndarray):
        return [m]
    if isinstance(m, SplitMatrix):
        return [a for p in m.parts for a in _data(p)]
    return [m.buf] if hasattr(m, "buf") else [m.qs, m.d]


def _moved(m, place):
    if isinstance(m, np.ndarray):
        return place(m)
    if isinstance(m, SplitMatrix):
        m.parts = [_moved(p, place) for p in m.parts]
        return m
    m.move_data(place)
    return m


def rope_tables(config: ModelConfig, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_seq_len, head_dim/2] for interleaved-pair rope (f64 math, f32 table)."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) * 2 / config.head_dim)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float64)
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _Input:
    """A matmul input: f32 rows, and their Q80 form (made here when a quantised weight asks,
    unless a fused kernel already made it into the model's buffers)."""

    def __init__(self, x: np.ndarray, q80: tuple[np.ndarray, np.ndarray] | None = None):
        self.x = x
        self._q80 = q80
        self.buffers = q80 is not None     # the model's own arrays: kernel calls can be bound

    def q80(self) -> tuple[np.ndarray, np.ndarray]:
        if self._q80 is None:
            t, n = self.x.shape
            qs, d = np.empty((t, n), np.int8), np.empty((t, n // QK), np.float32)
            kernels.quantize_q80_act(qs, d, self.x)
            self._q80 = (qs, d)
        return self._q80


class _LayerCalls(NamedTuple):
    """A layer's steps (Transformer._layer_calls): calls of no arguments. Where the weights
    allow, the steps of a token-wise stretch run fused in one parallel region
    (kernels.bind_norm_matmul, bind_ffn), else one after the other; ffn is None with experts
    (the router runs between ffn_norm and the experts)."""
    attn_in: Callable[[], None]            # xb = rmsnorm(x) * attn_norm; qkv = wqkv · xb
    attend: Callable[[], None]             # att = attention(q, k, v) [+ bqkv] [q, k norms]
    wo: Callable[[], None]                 # attn_out = wo · att
    ffn_norm: Callable[[], None]           # xb = rmsnorm(x) * ffn_norm
    ffn: Callable[[], None] | None         # ffn_norm, then h13 = w13 · xb, h = silu(gate) * up,
                                           # ffn_out = w2 · h


def _in_turn(*calls) -> Callable[[], None]:
    """One call of no arguments that makes these calls one after the other."""
    def run() -> None:
        for call in calls:
            call()
    return run


class _BoundCalls:
    """Kernel calls checked and bound once for the model's own buffers (kernels.bind_*). A
    decode step of a 30-layer model is ~250 small kernel calls: checking every argument on
    every call cost ~1 ms of a SmolLM2 token. Entries keep their arguments alive, so the ids
    in a key cannot be reused by other objects."""

    def __init__(self):
        self.calls: dict = {}

    def __call__(self, bind, *args) -> None:
        self.get(bind, *args)()

    def get(self, bind, *args):
        """The bound call (made once) of bind(*args), not run."""
        key = (bind, kernels.get_num_threads(), *map(id, args))
        entry = self.calls.get(key)
        if entry is None:
            entry = self.calls[key] = (bind(*args), args)
        return entry[0]

    def clear(self) -> None:
        self.calls.clear()


class Transformer:
    def __init__(self, config: ModelConfig, plan: ShardPlan, weights: ShardWeights,
                 kv_cache, comm, wire: str = "f32"):
        self.config, self.plan, self.w = config, plan, weights
        self.kv, self.comm, self.wire = kv_cache, comm, wire
        self.cos, self.sin = rope_tables(config, kv_cache.max_seq_len)
        self.kv_layers = [kv_cache.layer(i) for i in range(config.n_layers)]
        self.kv_of_q = plan.kv_of_q()
        # quantised layers take Q80 inputs: norm and silu·mul then quantise in the same pass
        self.fuse_q80 = any(is_quantised(m) for lw in weights.layers for m in lw.matrices())
        self.scale = 1.0 / np.sqrt(config.head_dim)
        self._buffers: dict[int, dict[str, np.ndarray]] = {}   # views of _arena per row count
        self._arena: dict[str, np.ndarray] = {}
        self._rows = 0
        self._heads: dict[int, dict[str, np.ndarray]] = {}     # views of _head_arena
        self._head_arena: dict[str, np.ndarray] = {}
        self._head_rows = 0
        self._parts: dict[tuple, list[np.ndarray]] = {}        # split stacks' part outputs
        self._bound = _BoundCalls()
        self._norms = None          # the layers' norm weights for kernels.bind_layers
        self.wcls_q80 = not isinstance(weights.wcls, np.ndarray)  # the final norm makes Q80 too

    def buffer_nbytes(self) -> int:
        """Bytes of the forward's arenas and the rope tables (memory.py's buffers, without
        the reductions' and attention's scratch, which comm.py and the kernels keep)."""
        arenas = list(self._arena.values()) + list(self._head_arena.values())
        arenas += [a for parts in self._parts.values() for a in parts]
        return sum(a.nbytes for a in arenas) + self.cos.nbytes + self.sin.nbytes

    def _body_widths(self) -> dict[str, int]:
        c, p = self.config, self.plan
        return dict(x=c.dim, xb=c.dim, qkv=p.q_cols + 2 * p.kv_rows.size, att=p.q_cols,
                    attn_out=c.dim, h13=2 * p.ffn_len, h=p.ffn_len, ffn_out=c.dim)

    def _buf(self, t: int) -> dict[str, np.ndarray]:
        """The activations of a forward of t rows: views of the first t rows of one arena
        per name, sized for the most rows run so far (memory.py predicts one arena of
        max(prefill chunk, slots) rows, whatever mix of row counts the scheduler runs).
        The views are kept per t, so the kernel calls bound to them are too."""
        b = self._buffers.get(t)
        if b is not None:
            return b
        if t > self._rows:                  # a bigger forward: new arenas, old views dropped
            widths = self._body_widths()
            self._arena = {name: np.zeros((t, n), np.float32) for name, n in widths.items()}
            for name in (("xb", "att", "h") if self.fuse_q80 else ()):
                self._arena[name + "_q"] = np.zeros((t, widths[name]), np.int8)
                self._arena[name + "_d"] = np.zeros((t, widths[name] // QK), np.float32)
            self._arena["positions"], self._arena["slots"] = (np.zeros(t, np.int32)
                                                              for _ in range(2))
            self._rows = t
            self._buffers.clear()
            self._bound.clear()
        if len(self._buffers) >= 64:
            self._buffers.clear()
            self._bound.clear()
        b = {name: arr[:t] for name, arr in self._arena.items()}
        for name in (("xb", "att", "h") if self.fuse_q80 else ()):
            b[name + "_q80"] = (b[name + "_q"], b[name + "_d"])
        b["last_x"] = b["x"][t - 1:]        # the last row (logits of the last token)
        self._buffers[t] = b
        return b

    def _head(self, n: int) -> dict[str, np.ndarray]:
        """The output head's buffers for n rows (x, final [, final_q, final_d], logits):
        views of one arena sized for the most rows asked so far (one row at prefill, one
        per sequence at a decode step; every row for all_logits)."""
        h = self._heads.get(n)
        if h is not None:
            return h
        if n > self._head_rows:
            c, vocab = self.config, self.plan.vocab.size
            self._head_arena = dict(x=np.zeros((n, c.dim), np.float32),
                                    final=np.zeros((n, c.dim), np.float32),
                                    logits=np.zeros((n, vocab), np.float32))
            if self.wcls_q80:
                self._head_arena["final_q"] = np.zeros((n, c.dim), np.int8)
                self._head_arena["final_d"] = np.zeros((n, c.dim // QK), np.float32)
            self._head_rows = n
            self._heads.clear()
            self._bound.clear()
        if len(self._heads) >= 64:
            self._heads.clear()
            self._bound.clear()
        h = self._heads[n] = {name: arr[:n] for name, arr in self._head_arena.items()}
        return h

    def _matmul(self, out: np.ndarray, inp: _Input, w) -> None:
        """out [T, rows] = inp [T, cols] @ w[rows, cols]^T."""
        if isinstance(w, SplitMatrix):
            self._matmul_parts(out, inp, w)
        elif isinstance(w, np.ndarray):
            (kernels.matmul_f16 if w.dtype == np.float16 else kernels.matmul_f32)(out, inp.x, w)
        elif inp.buffers:
            self._bound(kernels.bind_matmul, out, *inp.q80(), w)
        else:
            kernels.bind_matmul(out, *inp.q80(), w)()

    def _matmul_parts(self, out: np.ndarray, inp: _Input, w: SplitMatrix) -> None:
        """Each part into its band of out's columns: a view when out has one row (still
        C-contiguous), else a buffer of its own, copied in. For the model's own buffers the
        part outputs are kept with them (stable arrays: the kernel calls stay bound)."""
        t = out.shape[0]
        views = inp.buffers and t == 1
        if inp.buffers:
            b = self._buf(t)
            key = ("parts", id(out), tuple(w.bounds))
            outs = b.get(key)
            if outs is None:
                outs = b[key] = ([out[:, lo:hi] for lo, hi in w.bounds] if t == 1 else
                                 [a[:t] for a in self._part_arena(w.bounds, t)])
        else:
            outs = [np.empty((t, hi - lo), np.float32) for lo, hi in w.bounds]
        for (lo, hi), m, o in zip(w.bounds, w.parts, outs):
            self._matmul(o, inp, m)
            if not views:
                out[:, lo:hi] = o

    def _part_arena(self, bounds, t: int) -> list[np.ndarray]:
        """The part outputs of a split stack with these bounds, for up to the most rows run
        (one arena per distinct stack shape; views of it per row count)."""
        key = tuple(bounds)
        arena = self._parts.get(key)
        if arena is None or arena[0].shape[0] < t:
            arena = self._parts[key] = [np.zeros((t, hi - lo), np.float32) for lo, hi in bounds]
            for b in self._buffers.values():       # views of the old arena: drop them
                for k in [k for k in b if isinstance(k, tuple) and k[2] == key]:
                    del b[k]
            self._bound.clear()
        return arena

    def _q80(self, b, name: str):
        """The Q80 buffers of b[name] when the weights take Q80 inputs, else None."""
        return b[name + "_q80"] if self.fuse_q80 else None

    def _layer_calls(self, b, index: int, lw: LayerWeights) -> _LayerCalls:
        """Layer `index`'s steps on the buffers b (one row count) as calls of no arguments,
        made once per row count and thread count. A decode step of a 30-layer model is ~250
        kernel calls; going through the helpers below for every one of them cost ~1 ms of
        Python a SmolLM2 token. The helpers say what each step does."""
        per_threads = b.setdefault("layer_calls", {})
        calls = per_threads.get(kernels.get_num_threads())
        if calls is None:
            calls = per_threads[kernels.get_num_threads()] = [None] * len(self.w.layers)
        lc = calls[index]
        if lc is None:
            xb, att, h = (_Input(b[n], self._q80(b, n)) for n in ("xb", "att", "h"))
            attn_norm, ffn_norm = self._norm_call(b, lw.attn_norm), self._norm_call(b, lw.ffn_norm)
            ffn = None
            if lw.experts is None:
                ffn = self._fused(kernels.bind_ffn, b["ffn_out"], b["h13"], *self._q80_parts(b, "h"),
                                  *self._q80_parts(b, "xb"), b["x"], lw.ffn_norm, self.config.norm_eps,
                                  lw.w13, lw.w2) or _in_turn(
                    ffn_norm, self._matmul_call(b["h13"], xb, lw.w13), self._silu_call(b),
                    self._matmul_call(b["ffn_out"], h, lw.w2))
            attn_in = self._fused(kernels.bind_norm_matmul, b["qkv"], *self._q80_parts(b, "xb"), b["x"],
                                  lw.attn_norm, self.config.norm_eps, lw.wqkv)
            lc = calls[index] = _LayerCalls(
                attn_in or _in_turn(attn_norm, self._matmul_call(b["qkv"], xb, lw.wqkv)),
                self._attend_call(b, lw, index), self._matmul_call(b["attn_out"], att, lw.wo),
                ffn_norm, ffn)
        return lc

    def _all_layers_call(self, b):
        """Every layer in one parallel region (kernels.bind_layers), or None: only on one rank
        (no partial sums between the steps), for plain Llama layers of 4-bit weights. Made
        once per row count and thread count; its call returns False for a step it cannot run."""
        per_threads = b.setdefault("all_layers", {})
        n = kernels.get_num_threads()
        if n in per_threads:
            return per_threads[n]
        c, layers = self.config, self.w.layers
        call = None
        if (self.fuse_q80 and self.comm.sums_identity and not (c.attn_bias or c.qk_norm)
                and all(lw.experts is None for lw in layers)):
            if self._norms is None:     # writeable, as the kernel takes them: copied once, not
                self._norms = [tuple(np.require(w, requirements="W") for w in (lw.attn_norm, lw.ffn_norm))
                               for lw in layers]                # once per row count
            call = kernels.bind_layers(
                b["x"], c.norm_eps, *self._q80_parts(b, "xb"), b["qkv"], *self._q80_parts(b, "att"),
                b["attn_out"], b["h13"], *self._q80_parts(b, "h"), b["ffn_out"],
                [(*self._norms[i], lw.wqkv, lw.wo, lw.w13, lw.w2, *self.kv_layers[i])
                 for i, lw in enumerate(layers)],
                b["positions"], b["slots"], self.cos, self.sin, self.kv_of_q, self.scale)
        per_threads[n] = call
        return call

    def _q80_parts(self, b, name: str) -> tuple:
        """(b[name], its Q80 values, its Q80 scales), or Nones when the weights take f32 rows."""
        return (b[name], *(self._q80(b, name) or (None, None)))

    def _fused(self, bind, *args):
        """The fused kernel call bind(*args) for the model's buffers (bound once), or None where
        the stretch cannot be fused (f32 weights, other weight types, too few rows a thread)."""
        if not self.fuse_q80:
            return None
        return self._bound.get(bind, *args)

    def _matmul_call(self, out: np.ndarray, inp: _Input, w):
        """_matmul(out, inp, w) as a call of no arguments (bound once where it can be)."""
        if inp.buffers and not isinstance(w, (SplitMatrix, np.ndarray)):
            return self._bound.get(kernels.bind_matmul, out, *inp.q80(), w)
        return partial(self._matmul, out, inp, w)

    def _norm_call(self, b, weight: np.ndarray):
        """rmsnorm(b["x"]) * weight into b["xb"] (and its Q80 form when the weights are
        4-bit), as a call of no arguments."""
        eps = self.config.norm_eps
        if self.fuse_q80:
            return self._bound.get(kernels.bind_rmsnorm_q80, b["xb"], b["xb_q"], b["xb_d"],
                                   b["x"], weight, eps)
        return partial(kernels.rmsnorm, b["xb"], b["x"], weight, eps)

    def _attend_call(self, b, lw: LayerWeights, index: int):
        """Attention of this rank's heads from b["qkv"] into b["att"] (and its Q80 form), as
        a call of no arguments: [+ bqkv] [q, k then RMSNorm per head], rope, the KV cache
        write, attention."""
        c, hd, qc = self.config, self.config.head_dim, self.plan.q_cols
        k_cache, v_cache = self.kv_layers[index]           # [slot, S, kv, hd]
        block = self._bound.get(kernels.bind_attention_block, b["att"], b["qkv"], k_cache,
                                v_cache, b["positions"], b["slots"], self.cos, self.sin,
                                self.kv_of_q, self.scale, self._q80(b, "att"))
        if not (c.attn_bias or c.qk_norm):
            return block

        def call() -> None:
            if c.attn_bias:
                b["qkv"] += lw.bqkv
            if c.qk_norm:  # RMSNorm of each head's q and k
                kernels.rmsnorm_heads(b["qkv"], 0, qc // hd, lw.q_norm, c.norm_eps)
                kernels.rmsnorm_heads(b["qkv"], qc, self.plan.kv_rows.size // hd, lw.k_norm,
                                      c.norm_eps)
            block()
        return call

    def _silu_call(self, b):
        """silu(gate) * up from b["h13"] into b["h"] (and its Q80 form when the weights are
        4-bit), as a call of no arguments."""
        if self.fuse_q80:
            return self._bound.get(kernels.bind_silu_mul_q80, b["h"], b["h_q"], b["h_d"],
                                   b["h13"])
        return partial(kernels.silu_mul, b["h"], b["h13"])

    def _silu_mul(self, b) -> _Input:
        self._silu_call(b)()
        return _Input(b["h"], self._q80(b, "h"))

    def _moe(self, b, inp: _Input, lw: LayerWeights) -> None:
        """b["ffn_out"] = sum over each row's chosen experts of weight * expert(xb): only the
        chosen experts' matrices are read; this rank's slice of each gives a partial sum like
        the dense FFN's, reduced by the caller."""
        out = b["ffn_out"]
        out[...] = 0
        c = self.config
        top, w = kernels.route(inp.x, lw.router, c.n_experts_used, c.expert_norm)
        t = inp.x.shape[0]
        if t == 1:     # a one-sequence decode step: its experts in index order, as below
            for e, weight in sorted(zip(top[0].tolist(), w[0].tolist())):
                out += weight * self._expert_on_buffers(b, inp, lw.experts[e])
            return
        for e in np.unique(top):
            rows, slot = np.nonzero(top == e)
            w13, w2 = lw.experts[int(e)]
            if len(rows) == t:
                out += w[rows, slot][:, None] * self._expert_on_buffers(b, inp, (w13, w2))
                continue
            sub = _Input(np.ascontiguousarray(inp.x[rows]))
            h13 = np.empty((len(rows), 2 * self.plan.ffn_len), np.float32)
            self._matmul(h13, sub, w13)
            h = np.empty((len(rows), self.plan.ffn_len), np.float32)
            kernels.silu_mul(h, h13)
            o = np.empty((len(rows), self.config.dim), np.float32)
            self._matmul(o, _Input(h), w2)
            out[rows] += w[rows, slot][:, None] * o

    def _expert_on_buffers(self, b, inp: _Input, expert) -> np.ndarray:
        """One expert on every row, in the dense FFN's buffers with bound kernel calls;
        attn_out is free here (its sum is already in x) and takes the expert's output."""
        w13, w2 = expert
        self._matmul(b["h13"], inp, w13)
        self._matmul(b["attn_out"], self._silu_mul(b), w2)
        return b["attn_out"]

    def forward(self, x_in: np.ndarray, positions: np.ndarray, all_logits: bool = False,
                slots: np.ndarray | None = None, logit_rows: np.ndarray | None = None):
        """x_in [T, dim] embedded tokens at positions [T] of the sequences in KV-cache slots
        [T] (None: all in slot 0) -> logits [T or 1, vocab] on root (None on other ranks).
        logit_rows (row indices, instead of all/last): logits [len(logit_rows), vocab]."""
        c = self.config
        t = x_in.shape[0]
        b = self._buf(t)
        b["positions"][:] = positions
        b["slots"][:] = 0 if slots is None else slots
        if b["positions"].max() >= self.kv.max_seq_len:
            raise ValueError(f"position {b['positions'].max()} beyond the KV cache "
                             f"({self.kv.max_seq_len} positions)")
        x = b["x"]
        x[...] = x_in
        all_layers = self._all_layers_call(b)
        if all_layers is None or not all_layers():   # else every layer ran in one parallel region
            for index, lw in enumerate(self.w.layers):
                step = self._layer_calls(b, index, lw)
                # attention: x += wo · attention(rope(q), rope(k), v), where [q k v] = wqkv·xb
                # [+ bqkv] [q, k then RMSNorm per head]; k and v go to the KV cache
                step.attn_in()                   # xb = rmsnorm(x) * attn_norm; qkv = wqkv · xb
                step.attend()                    # att = attention(q, k, v)
                step.wo()                        # attn_out = wo · att
                x += self.comm.allreduce_sum(b["attn_out"], self.wire)
                # feed-forward: x += w2 · (silu(w1·xb) * w3·xb), where [w1·xb w3·xb] = w13·xb
                if lw.experts is None:
                    step.ffn()                   # xb = rmsnorm(x) * ffn_norm; h13 = w13 · xb;
                                                 # h = silu(h13[gate]) * h13[up]; ffn_out = w2 · h
                else:   # the same with the experts the router picks, weighted
                    step.ffn_norm()
                    self._moe(b, _Input(b["xb"], self._q80(b, "xb")), lw)
                x += self.comm.allreduce_sum(b["ffn_out"], self.wire)
        if logit_rows is not None:                      # logits of the chosen rows
            if len(logit_rows) == 0:
                return np.zeros((0, c.vocab_size), np.float32) if self.comm.is_root else None
            h = self._head(len(logit_rows))
            np.take(b["x"], np.asarray(logit_rows, np.intp), axis=0, out=h["x"])
            rows_x = h["x"]
        elif all_logits:                                # logits of every row
            h, rows_x = self._head(t), b["x"]
        else:                                           # of the last row
            h, rows_x = self._head(1), b["last_x"]
        final, logits = h["final"], h["logits"]
        if self.wcls_q80:
            q80 = (h["final_q"], h["final_d"])
            self._bound(kernels.bind_rmsnorm_q80, final, *q80, rows_x, self.w.final_norm,
                        c.norm_eps)
        else:
            kernels.rmsnorm(final, rows_x, self.w.final_norm, c.norm_eps)
            q80 = None
        self._matmul(logits, _Input(final, q80), self.w.wcls)
        return self.comm.gather_rows(logits, self.plan.vocab_counts)

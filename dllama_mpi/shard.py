"""The tensor-parallel split, as pure functions of (config, rank, size).

Weights are W[out, in].
- out-split: a rank owns a band of output rows (wq, wk, wv, w1, w3, wcls);
- in-split:  a rank owns a band of input columns and produces a partial sum (wo, w2).
(Megatron says column- and row-parallel; Distributed Llama row and col slices.)

Attention is split by query heads: contiguous ranges, the first n_heads % size ranks
get one more. A rank holds every KV head its query heads need, so with more ranks than
KV heads a KV head can live on two ranks. FFN hidden units and vocabulary rows are split
in whole 32-blocks, remainder to the first ranks.

Everything about the split lives here: the ranges (plan), how each tensor is cut (SPLIT,
tensor_specs, slice_shape), and the checks a rank count must pass (check).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import DllamaError

BLOCK = 32

LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")
BIAS_TENSORS = ("bq", "bk", "bv")        # with config.attn_bias
QK_NORM_TENSORS = ("q_norm", "k_norm")   # with config.qk_norm

# How each tensor is split: "rep" replicated, "out:AXIS" a band of output rows, "in:AXIS" a
# band of input columns, "vec:AXIS" a band of an out-split vector (a bias, cut like its
# matrix's rows); AXIS names a range of ShardPlan (ShardPlan.range).
SPLIT = dict(attn_norm="rep", wq="out:q", wk="out:kv", wv="out:kv", wo="in:q",
             ffn_norm="rep", w1="out:ffn", w2="in:ffn", w3="out:ffn",
             bq="vec:q", bk="vec:kv", bv="vec:kv", q_norm="rep", k_norm="rep",
             final_norm="rep", wcls="out:vocab", router="rep")


@dataclass(frozen=True)
class Range:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def as_slice(self) -> slice:
        return slice(self.start, self.stop)

    def scaled(self, k: int) -> "Range":
        return Range(self.start * k, self.stop * k)


def split_even(n: int, size: int, rank: int) -> Range:
    """Contiguous split of n items; the first n % size ranks get one more."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return Range(start, start + base + (1 if rank < extra else 0))


def split_blocks(n: int, size: int, rank: int, block: int = BLOCK) -> Range:
    """Split n items in whole blocks (the last block may be partial), remainder blocks first."""
    nblocks = -(-n // block)
    b = split_even(nblocks, size, rank)
    return Range(min(b.start * block, n), min(b.stop * block, n))


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    q_heads: Range          # global query heads owned
    kv_heads: Range         # global KV heads held (those the query heads need)
    head_dim: int
    group: int              # query heads per KV head
    ffn: Range              # FFN hidden units owned
    vocab: Range            # output vocabulary rows owned
    vocab_counts: tuple[int, ...]   # vocabulary rows of every rank (the logits gather)

    @property
    def q_rows(self) -> Range:
        """Rows of wq (out-split) == columns of wo (in-split)."""
        return self.q_heads.scaled(self.head_dim)

    @property
    def kv_rows(self) -> Range:
        return self.kv_heads.scaled(self.head_dim)

    @property
    def q_cols(self) -> int:
        return self.q_rows.size

    @property
    def ffn_len(self) -> int:
        return self.ffn.size

    def range(self, axis: str) -> Range:
        """The band of an axis named in SPLIT: q, kv (rows of wq / wk, wv), ffn, vocab."""
        return {"q": self.q_rows, "kv": self.kv_rows, "ffn": self.ffn, "vocab": self.vocab}[axis]

    def kv_of_q(self) -> np.ndarray:
        """For each local query head, the index of its KV head in this rank's KV slice."""
        q = np.arange(self.q_heads.start, self.q_heads.stop)
        return (q // self.group - self.kv_heads.start).astype(np.int32)


def plan(config: ModelConfig, rank: int, size: int) -> ShardPlan:
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside 0..{size - 1}")
    if size > config.n_heads:
        raise ValueError(f"{size} ranks > {config.n_heads} query heads")
    group = config.group
    q = split_even(config.n_heads, size, rank)
    kv = Range(q.start // group, (q.stop - 1) // group + 1)
    counts = tuple(split_blocks(config.vocab_size, size, r).size for r in range(size))
    return ShardPlan(rank=rank, size=size, q_heads=q, kv_heads=kv, head_dim=config.head_dim,
                     group=group, ffn=split_blocks(config.hidden_dim, size, rank),
                     vocab=split_blocks(config.vocab_size, size, rank), vocab_counts=counts)


def check(config: ModelConfig, size: int, weights_float_type: str,
          quantised: bool | None = None) -> None:
    """Raise DllamaError if `size` ranks cannot split this model with these weights
    (`quantised`: some layer matrix is block-quantised; by default weights_float_type says)."""
    if size > config.n_heads:
        raise DllamaError(f"{size} ranks cannot split a model with {config.n_heads} query "
                          f"heads: run with at most {config.n_heads} ranks")
    if quantised is None:
        quantised = weights_float_type != "f32"
    if quantised:
        for r in range(size):
            p = plan(config, r, size)
            if config.dim % BLOCK or p.q_cols % BLOCK or p.ffn_len % BLOCK:
                raise DllamaError(
                    f"quantised weights need dim, each rank's attention width and FFN slice "
                    f"to be multiples of {BLOCK} (dim {config.dim}, head_dim "
                    f"{config.head_dim}, hidden {config.hidden_dim}, {size} ranks): use "
                    f"--weights-float-type f32")


# the matrices that read the same input, stacked into one matmul (model.LayerWeights)
STACKS = {"wqkv": ("wq", "wk", "wv"), "wo": ("wo",), "w13": ("w1", "w3"), "w2": ("w2",)}


def stack_runs(names: tuple[str, ...], type_of) -> list[tuple[str, ...]]:
    """A stack's parts grouped into runs of one runtime type (type_of(short name)): the parts
    of a run are stacked into one matrix; a stack whose parts differ in type (a Q4_K_M layer's
    Q4_K wq, wk and Q6_K wv) is held as several matrices, one per run."""
    runs: list[list[str]] = []
    for n in names:
        if runs and type_of(runs[-1][0]) == type_of(n):
            runs[-1].append(n)
        else:
            runs.append([n])
    return [tuple(r) for r in runs]


def expert_names(e: int) -> tuple[str, str, str]:
    """Short names of expert e's gate, up and down matrices (split like w1, w3, w2)."""
    return f"experts.{e}.w1", f"experts.{e}.w3", f"experts.{e}.w2"


def layer_tensors(config: ModelConfig) -> tuple[str, ...]:
    """Short names of the tensors every layer of this model holds: with experts, the
    router and every expert's w1, w3, w2 instead of the dense w1, w3, w2."""
    names = LAYER_TENSORS
    if config.n_experts:
        names = tuple(n for n in names if n not in ("w1", "w2", "w3")) + ("router",) + tuple(
            n for e in range(config.n_experts) for n in expert_names(e))
    return (names + (BIAS_TENSORS if config.attn_bias else ()) +
            (QK_NORM_TENSORS if config.qk_norm else ()))


def layer_stacks(config: ModelConfig) -> list[tuple[str, ...]]:
    """The matrices of a layer in the groups that read the same input (STACKS; every
    expert's w1|w3 and its w2 with experts)."""
    if not config.n_experts:
        return list(STACKS.values())
    return [STACKS["wqkv"], STACKS["wo"]] + [
        g for e in range(config.n_experts) for g in (expert_names(e)[:2], expert_names(e)[2:])]


def split_of(short: str) -> str:
    """How a layer tensor (short name, experts.3.w2 included) is split (SPLIT)."""
    return SPLIT[short.rsplit(".", 1)[-1]]


def tensor_specs(config: ModelConfig) -> list[tuple[str, str]]:
    """(canonical name, how it is split) in the order weights travel: layer by layer, then
    the final norm and the output matrix."""
    names = layer_tensors(config)
    specs = [(f"layers.{i}.{n}", split_of(n)) for i in range(config.n_layers) for n in names]
    return specs + [("final_norm", SPLIT["final_norm"]), ("wcls", SPLIT["wcls"])]


def is_matrix(kind: str) -> bool:
    return kind.startswith(("out:", "in:"))


def slice_shape(config: ModelConfig, name: str, kind: str, p: ShardPlan) -> tuple[int, ...]:
    """Shape of this rank's slice, as values [rows, cols] (or [n] for a vector)."""
    if kind == "rep":
        if name.endswith(".router"):
            return (config.n_experts, config.dim)
        return (config.head_dim,) if name.endswith(QK_NORM_TENSORS) else (config.dim,)
    split, axis = kind.split(":")
    size = p.range(axis).size
    if split == "vec":
        return (size,)
    if split == "out":
        return (size, config.dim)
    return (config.dim, size)


def in_split(w: np.ndarray, cols: Range, block_bytes: int | None = None) -> np.ndarray:
    """Band of input columns of W[out, in]. For block-quantised rows (block_bytes per 32
    values) the band must be whole blocks and is cut from the byte rows."""
    if block_bytes is None:
        return w[:, cols.as_slice()]
    if cols.start % BLOCK or cols.stop % BLOCK:
        raise ValueError(f"in-split of quantised rows needs whole blocks, got {cols}")
    return w[:, cols.start // BLOCK * block_bytes: cols.stop // BLOCK * block_bytes]

"""Bytes per rank, as pure functions of (config, run, rank count): what start-up reports,
what `info` predicts, and what a planner can sum. No arrays are made here.

- weights: every matrix in its runtime layout (f32, or the 4-bit/8-bit tile layouts of
  quant/, whose row tiles pad the row count), each of its own type in a mixed file, the
  stacked matrices (wq|wk|wv, w1|w3) as one where their types agree, every expert's
  w1|w3 and w2 slices with mixtures of experts (and the f32 router), plus the f32 norms and
  biases;
- KV cache: layers x slots x positions x this rank's KV heads x head_dim, K and V, f32;
- buffers: the activations of one decode row and of one prefill chunk (model.Transformer
  keeps one set per row count it has run) and the reduction buffers of comm.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, RunConfig
from .quant import QK, ROW_TILE_MAX_COLS
from .shard import STACKS, ShardPlan, layer_stacks, layer_tensors, plan, stack_runs

F32 = 4
Q40_SLAB_BYTES = 18          # per block in the slab layout: 16 nibble bytes + an f16 scale
# row-tile layouts (quant.pack_row_tiles): (rows per tile, bytes per (tile, block) record)
ROW_TILES = {"q40": (16, 16 * 16 + 2 * 16), "q41": (16, 16 * 16 + 2 * 2 * 16),
             "q80": (8, 8 * 32 + 2 * 8)}


def matrix_bytes(rows: int, cols: int, runtime_type: str) -> int:
    """A rows x cols matrix held as `runtime_type` (f32, f16, q40, q41, q80)."""
    if runtime_type in ("f32", "f16"):
        return rows * cols * (F32 if runtime_type == "f32" else 2)
    nb = cols // QK
    if runtime_type == "q40" and cols > ROW_TILE_MAX_COLS:
        return rows * nb * Q40_SLAB_BYTES
    tile, record = ROW_TILES[runtime_type]
    return -(-rows // tile) * nb * record


def _rows(c: ModelConfig, p: ShardPlan) -> dict[str, int]:
    return {"wq": p.q_cols, "wk": p.kv_rows.size, "wv": p.kv_rows.size, "wo": c.dim,
            "w1": p.ffn_len, "w3": p.ffn_len, "w2": c.dim}


def weight_bytes(config: ModelConfig, p: ShardPlan, run: RunConfig) -> int:
    """This rank's weights as the loaded shard holds them (model.ShardWeights.nbytes): every
    matrix in its runtime type (run.matrix_type), stacks split where their types differ."""
    c = config
    rows = _rows(c, p)
    cols = {"wo": p.q_cols, "w2": p.ffn_len}
    names = layer_tensors(c)
    vectors = 2 * c.dim                                                     # the two norms
    if "bq" in names:
        vectors += p.q_cols + 2 * p.kv_rows.size
    if "q_norm" in names:
        vectors += 2 * c.head_dim
    if c.n_experts:
        vectors += c.n_experts * c.dim                                      # the router
    total = c.n_layers * vectors * F32 + c.dim * F32
    for i in range(c.n_layers):
        def type_of(short, i=i):
            return run.matrix_type(f"layers.{i}.{short}")
        for parts in layer_stacks(c):
            for group in stack_runs(parts, type_of):
                last = group[0].rsplit(".", 1)[-1]
                total += matrix_bytes(sum(rows[n.rsplit(".", 1)[-1]] for n in group),
                                      cols.get(last, c.dim), type_of(group[0]))
    return total + matrix_bytes(p.vocab.size, c.dim, run.matrix_type("wcls"))


def split_stack_rows(config: ModelConfig, p: ShardPlan, run: RunConfig) -> int:
    """Output rows of the distinct split stacks (model.SplitMatrix: parts of different types):
    a forward of more than one row gives each its own part buffers (model._matmul_parts)."""
    rows, seen = _rows(config, p), set()
    for i in range(config.n_layers):
        for field, parts in STACKS.items():
            if config.n_experts and field in ("w13", "w2"):
                continue      # experts' outputs are fresh arrays, their parts' too
            runs = stack_runs(parts, lambda short: run.matrix_type(f"layers.{i}.{short}"))
            if len(runs) > 1:
                seen.add((field, tuple(sum(rows[n] for n in g) for g in runs)))
    return sum(sum(bounds) for _, bounds in seen)


def kv_bytes(config: ModelConfig, p: ShardPlan, max_seq_len: int, n_slots: int = 1) -> int:
    """K and V of this rank's KV heads, every layer, position and slot (f32)."""
    return 2 * F32 * config.n_layers * n_slots * max_seq_len * p.kv_heads.size * config.head_dim


def activation_bytes(config: ModelConfig, p: ShardPlan, rows: int, size: int,
                     q80_inputs: bool, wire: str) -> int:
    """The forward buffers of `rows` rows (model.Transformer._buf) and the reductions'
    send/receive buffers (comm.py) for that many rows."""
    c = config
    widths = dict(x=c.dim, xb=c.dim, qkv=p.q_cols + 2 * p.kv_rows.size, att=p.q_cols,
                  attn_out=c.dim, h13=2 * p.ffn_len, h=p.ffn_len, ffn_out=c.dim, final=c.dim,
                  logits=p.vocab.size)
    total = rows * sum(widths.values()) * F32 + 2 * rows * 4          # + positions, slots
    quantised = ("xb", "att", "h", "final") if q80_inputs else ()
    total += sum(rows * widths[n] + rows * (widths[n] // QK) * F32 for n in quantised)
    per_rank = rows * c.dim + rows * (c.dim // QK) * 2 if wire == "q80" else rows * c.dim * F32
    return total + (1 + size) * per_rank + rows * c.dim * F32


@dataclass(frozen=True)
class RankMemory:
    rank: int
    weights: int
    kv_cache: int
    buffers: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers


def per_rank(config: ModelConfig, run: RunConfig, size: int) -> list[RankMemory]:
    """Every rank's bytes for a run whose types are resolved (RunConfig.resolved)."""
    seq = run.resolved_max_seq_len(config)
    q80 = run.quantised_layers
    out = []
    for r in range(size):
        p = plan(config, r, size)
        split = split_stack_rows(config, p, run)
        buffers = sum(activation_bytes(config, p, t, size, q80, run.buffer_float_type)
                      + (t * split * F32 if t > 1 else 0)
                      for t in {run.parallel, run.prefill_chunk})
        out.append(RankMemory(r, weight_bytes(config, p, run),
                              kv_bytes(config, p, seq, run.parallel), buffers))
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

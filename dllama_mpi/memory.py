"""Bytes per rank, as pure functions of (config, run, rank count): what start-up reports,
what `info` predicts, and what a planner can sum. No arrays are made here.

- weights: every matrix in its runtime layout (f32, or the 4-bit/8-bit tile layouts of
  quant/, whose row tiles pad the row count), the stacked matrices (wq|wk|wv, w1|w3) as one,
  plus the f32 norms and biases;
- KV cache: layers x slots x positions x this rank's KV heads x head_dim, K and V, f32 or
  f16; in memory, or on disk (memory-mapped files: not counted in the total, which is the
  memory a rank holds; the pages of the file it touches are page cache, dropped under
  pressure);
- buffers: the activations of the largest step (a prefill chunk, or one row per slot),
  as model.Transformer keeps them (one arena, every row count a view of it), the output
  head's for one logits row per slot, the reduction buffers of comm.py (one arena too), the
  rope tables and attention's scratch rows. An upper bound: rows of an arena that no step
  reaches (logits of rows nobody samples) are never touched, so never resident.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, RunConfig
from .quant import QK, ROW_TILE_MAX_COLS
from .shard import ShardPlan, layer_tensors, plan

F32 = 4
Q40_SLAB_BYTES = 18          # per block in the slab layout: 16 nibble bytes + an f16 scale
# row-tile layouts (quant.pack_row_tiles): (rows per tile, bytes per (tile, block) record)
ROW_TILES = {"q40": (16, 16 * 16 + 2 * 16), "q41": (16, 16 * 16 + 2 * 2 * 16),
             "q80": (8, 8 * 32 + 2 * 8)}


def matrix_bytes(rows: int, cols: int, runtime_type: str) -> int:
    """A rows x cols matrix held as `runtime_type` (f32, q40, q41, q80)."""
    if runtime_type == "f32":
        return rows * cols * F32
    nb = cols // QK
    if runtime_type == "q40" and cols > ROW_TILE_MAX_COLS:
        return rows * nb * Q40_SLAB_BYTES
    tile, record = ROW_TILES[runtime_type]
    return -(-rows // tile) * nb * record


def weight_bytes(config: ModelConfig, p: ShardPlan, weights_type: str, output_type: str) -> int:
    """This rank's weights as the loaded shard holds them (model.ShardWeights.nbytes)."""
    c = config
    kv = p.kv_rows.size
    matrices = (matrix_bytes(p.q_cols + 2 * kv, c.dim, weights_type)       # wq|wk|wv
                + matrix_bytes(c.dim, p.q_cols, weights_type)               # wo
                + matrix_bytes(2 * p.ffn_len, c.dim, weights_type)          # w1|w3
                + matrix_bytes(c.dim, p.ffn_len, weights_type))             # w2
    vectors = 2 * c.dim                                                     # the two norms
    names = layer_tensors(c)
    if "bq" in names:
        vectors += p.q_cols + 2 * kv
    if "q_norm" in names:
        vectors += 2 * c.head_dim
    per_layer = matrices + vectors * F32
    return (c.n_layers * per_layer + c.dim * F32
            + matrix_bytes(p.vocab.size, c.dim, output_type))


KV_VALUE_BYTES = {"f32": 4, "f16": 2}


def kv_bytes(config: ModelConfig, p: ShardPlan, max_seq_len: int, n_slots: int = 1,
             float_type: str = "f32") -> int:
    """K and V of this rank's KV heads, every layer, position and slot."""
    return (2 * KV_VALUE_BYTES[float_type] * config.n_layers * n_slots * max_seq_len
            * p.kv_heads.size * config.head_dim)


def attention_bytes(config: ModelConfig, p: ShardPlan, max_seq_len: int, rows: int) -> int:
    """The rope tables (cos and sin, f32 [S, head_dim / 2]) and attention's scratch for
    forwards of up to `rows` rows (kernels.attention keeps one arena of min(rows x heads,
    256) rows of S f32)."""
    scratch = max(1, min(rows * p.q_heads.size, 256)) * max_seq_len * F32
    return max_seq_len * config.head_dim * F32 + scratch


def activation_bytes(config: ModelConfig, p: ShardPlan, rows: int, size: int,
                     q80_inputs: bool, wire: str, head_rows: int = 1,
                     wcls_q80: bool = False) -> int:
    """The forward's buffers for up to `rows` rows (model.Transformer keeps one arena of the
    most rows run, every row count a view of it), the output head's for up to `head_rows`
    rows of logits, and the reductions' send/receive buffers (comm.py, one arena too)."""
    c = config
    widths = dict(x=c.dim, xb=c.dim, qkv=p.q_cols + 2 * p.kv_rows.size, att=p.q_cols,
                  attn_out=c.dim, h13=2 * p.ffn_len, h=p.ffn_len, ffn_out=c.dim)
    total = rows * sum(widths.values()) * F32 + 2 * rows * 4          # + positions, slots
    if q80_inputs:
        total += sum(rows * widths[n] + rows * (widths[n] // QK) * F32 for n in ("xb", "att", "h"))
    head = head_rows * (2 * c.dim + p.vocab.size) * F32                # x, final, logits
    if wcls_q80:
        head += head_rows * (c.dim + (c.dim // QK) * F32)
    if size == 1:                                                      # no reductions
        return total + head
    per_rank = rows * c.dim + rows * (c.dim // QK) * 2 if wire == "q80" else rows * c.dim * F32
    return total + head + (1 + size) * per_rank + rows * c.dim * F32


@dataclass(frozen=True)
class RankMemory:
    rank: int
    weights: int
    kv_cache: int
    buffers: int
    kv_on_disk: bool = False

    @property
    def total(self) -> int:
        """Memory this rank holds (a KV cache on disk is not in it)."""
        return self.weights + self.buffers + (0 if self.kv_on_disk else self.kv_cache)

    @property
    def disk(self) -> int:
        return self.kv_cache if self.kv_on_disk else 0


def per_rank(config: ModelConfig, run: RunConfig, size: int) -> list[RankMemory]:
    """Every rank's bytes for a run whose types are resolved (RunConfig.resolved)."""
    seq = run.resolved_max_seq_len(config)
    q80 = run.weights_float_type in ("q40", "q41")
    out = []
    for r in range(size):
        p = plan(config, r, size)
        rows = max(run.parallel, run.prefill_chunk)     # the most rows a scheduler step has
        buffers = activation_bytes(config, p, rows, size, q80, run.buffer_float_type,
                                   head_rows=run.parallel,
                                   wcls_q80=run.output_float_type != "f32")
        buffers += attention_bytes(config, p, seq, rows)
        out.append(RankMemory(r, weight_bytes(config, p, run.weights_float_type,
                                              run.output_float_type),
                              kv_bytes(config, p, seq, run.parallel, run.kv_cache_float_type),
                              buffers, run.kv_storage == "disk"))
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

"""Bytes per rank, as pure functions of (config, run, rank count): what start-up reports,
what `info` predicts, and what a planner can sum. No arrays are made here.

- weights: every matrix in its runtime layout (f32, or the 4-bit/8-bit tile layouts of
  quant/, whose row tiles pad the row count), each of its own type in a mixed file, the
  stacked matrices (wq|wk|wv, w1|w3) as one where their types agree, every expert's
  w1|w3 and w2 slices with mixtures of experts (and the f32 router), plus the f32 norms and
  biases;
- KV cache: layers x slots x positions x this rank's KV heads x head_dim, K and V, f32 or
  f16; in memory, or on disk (memory-mapped files: not counted in the total, which is the
  memory a rank holds; the pages of the file it touches are page cache, dropped under
  pressure);
- buffers: the activations of the largest step (a prefill chunk, or one row per slot),
  as model.Transformer keeps them (one arena, every row count a view of it; split stacks'
  part outputs too), the output head's for one logits row per slot, the reduction buffers
  of comm.py (one arena too), the rope tables and attention's scratch rows. An upper
  bound: rows of an arena that no step reaches (logits of rows nobody samples) are never
  touched, so never resident. (Mixtures of experts also make each step's expert outputs
  afresh: transient, not counted.)
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import FLOAT_FORMS, ModelConfig, RunConfig
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


def weight_bytes(config: ModelConfig, p: ShardPlan, run: RunConfig,
                 experts_read: float | None = None) -> int:
    """This rank's weights as the loaded shard holds them (model.ShardWeights.nbytes): every
    matrix in its runtime type (run.matrix_type), stacks split where their types differ.
    With experts_read, the bytes a step reads instead: that many experts per layer (on
    average) of the n_experts held."""
    c = config
    expert_share = 1.0 if experts_read is None or not c.n_experts else experts_read / c.n_experts
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
                nbytes = matrix_bytes(sum(rows[n.rsplit(".", 1)[-1]] for n in group),
                                      cols.get(last, c.dim), type_of(group[0]))
                total += nbytes * expert_share if group[0].startswith("experts.") else nbytes
    return int(total) + matrix_bytes(p.vocab.size, c.dim, run.matrix_type("wcls"))


def experts_touched(config: ModelConfig, rows: int = 1) -> float:
    """Experts per layer a step of `rows` tokens reads, expected under uniform routing: each
    token picks n_experts_used of n_experts, so an expert is missed by all rows with
    probability (1 - used/n)^rows."""
    n, k = config.n_experts, config.n_experts_used
    return n * (1.0 - (1.0 - k / n) ** rows) if n else 0.0


def read_bytes(config: ModelConfig, p: ShardPlan, run: RunConfig, rows: int = 1) -> int:
    """Weight bytes this rank streams in one step of `rows` tokens: all it holds, except the
    experts no row chose (a dense model reads everything)."""
    return weight_bytes(config, p, run, experts_touched(config, rows) if config.n_experts
                        else None)


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


KV_VALUE_BYTES = {"f32": 4, "f16": 2}


def kv_bytes(config: ModelConfig, p: ShardPlan, max_seq_len: int, n_slots: int = 1,
             float_type: str = "f32") -> int:
    """K and V of this rank's KV heads, every layer, position and slot."""
    return (2 * KV_VALUE_BYTES[float_type] * config.n_layers * n_slots * max_seq_len
            * p.kv_heads.size * config.head_dim)


def attention_bytes(config: ModelConfig, p: ShardPlan, max_seq_len: int, rows: int,
                    nthreads: int = 1) -> int:
    """The rope tables (cos and sin, f32 [S, head_dim / 2]) and attention's scratch for
    forwards of up to `rows` rows on `nthreads` threads (kernels.attention.scratch_rows: one
    arena of a row of S f32 per head of each row run at once, at most 256 or one row's).
    Not held, so not counted: a decode step of more than 128 positions on several threads
    also takes, while it runs, its blocks' V sums (at most S/128 x heads x head_dim f32:
    1 MB for 32 heads of 64 at S = 16384)."""
    heads = p.q_heads.size
    scratch = min(heads * max(1, min(rows, nthreads)), max(heads, 256)) * max_seq_len * F32
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


def per_rank(config: ModelConfig, run: RunConfig, size: int, nthreads: int | None = None) -> list[RankMemory]:
    """Every rank's bytes for a run whose types are resolved (RunConfig.resolved), on
    `nthreads` threads per rank (default: --nthreads, 1 when automatic)."""
    threads = nthreads or run.nthreads or 1
    seq = run.resolved_max_seq_len(config)
    q80 = run.quantised_layers
    out = []
    for r in range(size):
        p = plan(config, r, size)
        rows = max(run.parallel, run.prefill_chunk)     # the most rows a scheduler step has
        split = split_stack_rows(config, p, run)
        buffers = activation_bytes(config, p, rows, size, q80, run.buffer_float_type,
                                   head_rows=run.parallel,
                                   wcls_q80=run.output_float_type not in FLOAT_FORMS)
        buffers += (rows * split * F32 if rows > 1 else 0) + attention_bytes(config, p, seq, rows, threads)
        out.append(RankMemory(r, weight_bytes(config, p, run),
                              kv_bytes(config, p, seq, run.parallel, run.kv_cache_float_type),
                              buffers, run.kv_storage == "disk"))
    return out


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

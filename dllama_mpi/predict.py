"""The capacity planner's model (`plan`): what N ranks on a given link hold and do, before
any hardware is bought. Pure functions of (model config, run, ranks, link, machine): no
I/O, no MPI, no arrays.

- **memory per rank**: memory.per_rank, the code start-up reports with, plus the process
  itself (Python, numpy, numba's compiled kernels, MPI: RUNTIME_BYTES, measured);
- **traffic per token**: the bytes comm.py counts for one decode step of one sequence, rank
  by rank: the step packet and the token's stored embedding row (broadcast by the root), two
  all-gathers of every rank's partial sum per layer (Q80: 34 bytes per 32 values; F32: 4
  per value), the gather of the logit slices on the root;
- **time per token**: compute + network, serial (a step does not overlap them).
  Compute: the bytes of a rank's weights and of the K/V it attends, streamed at a fraction
  of its share of the node's read bandwidth or of what its threads' kernels consume,
  whichever is less, plus fixed costs per layer (kernel calls from Python), per reduction
  (packing and summing) and per token on the root (sampling). Prompt: operations at the
  int8 throughput of the rank's cores plus costs per layer and row.
  Network: each collective timed by the algorithm MPICH picks for its size and rank count
  (MPIR_Allgather_intra_auto, MPIR_Bcast_intra_auto, the linear Gatherv), each message
  latency + bytes / bandwidth of a node's link (full duplex, a non-blocking switch).

The machine constants (Machine) are this project's 2-core test machine's, calibrated by
bench/bench_plan.py; give another machine's figures (`plan --read-bw`, `--cores`,
`--kernel-gb-s`, `--prefill-gops`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from .comm import STEP_HEADER
from .config import ModelConfig, RunConfig
from .memory import RankMemory, per_rank, read_bytes
from .quant import QK
from .shard import BLOCK, plan, split_blocks

F32 = 4
# RSS of a rank beyond the arrays memory.py counts: the interpreter, numpy, numba's compiled
# kernels, mpi4py and MPICH (measured by bench/bench_plan.py: 130-165 MiB on this machine)
RUNTIME_BYTES = 150 * 2**20
# GGML type -> (values, bytes) per block of a stored embedding row (what the root broadcasts)
ROW_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
              "Q4_1": (32, 20)}
# the file type a preset's embedding is assumed stored as, for each runtime weight type
PRESET_FILE_TYPE = {"q40": "Q4_0", "q41": "Q4_1", "f32": "F16"}


# -- models ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    published_params: float     # the model card's size
    source: str


def _llama3_factors(head_dim: int, theta: float, factor: float, original: int):
    from .formats.base import llama3_rope_factors
    return tuple(float(f) for f in llama3_rope_factors(
        {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": original},
        head_dim=head_dim, rope_theta=theta))


def _llama31(dim, hidden, layers, heads, kv, tied=False, factor=8.0, ctx=131072):
    head_dim = dim // heads
    return ModelConfig(arch="llama", dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, vocab_size=128256, context_length=ctx, head_dim=head_dim,
                       rope_theta=500000.0, norm_eps=1e-5, tied_embeddings=tied,
                       rope_freq_factors=_llama3_factors(head_dim, 500000.0, factor, 8192))


def _presets() -> dict[str, Preset]:
    return {
        "llama3.1-405b": Preset(_llama31(16384, 53248, 126, 128, 8), 405.85e9,
                                "meta-llama/Llama-3.1-405B config.json; 405B"),
        "llama3.1-70b": Preset(_llama31(8192, 28672, 80, 64, 8), 70.55e9,
                               "meta-llama/Llama-3.1-70B config.json; 70.6B"),
        "llama3.1-8b": Preset(_llama31(4096, 14336, 32, 32, 8), 8.03e9,
                              "meta-llama/Llama-3.1-8B config.json; 8.03B"),
        "llama3.2-3b": Preset(_llama31(3072, 8192, 28, 24, 8, tied=True, factor=32.0), 3.21e9,
                              "meta-llama/Llama-3.2-3B config.json; 3.21B"),
        "llama3.2-1b": Preset(_llama31(2048, 8192, 16, 32, 8, tied=True, factor=32.0), 1.24e9,
                              "meta-llama/Llama-3.2-1B config.json; 1.24B"),
        "qwen3-14b": Preset(ModelConfig(
            arch="qwen3", dim=5120, hidden_dim=17408, n_layers=40, n_heads=40, n_kv_heads=8,
            vocab_size=151936, context_length=40960, head_dim=128, rope_theta=1e6,
            norm_eps=1e-6, qk_norm=True), 14.8e9, "Qwen/Qwen3-14B config.json; 14.8B"),
        "smollm2-135m": Preset(ModelConfig(
            arch="llama", dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
            vocab_size=49152, context_length=8192, rope_theta=100000.0, tied_embeddings=True),
            134.5e6, "HuggingFaceTB/SmolLM2-135M config.json; 135M"),
        "synthetic-1.1b": Preset(ModelConfig(
            arch="llama", dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8,
            vocab_size=32000, context_length=4096), 1.1e9, "bench/make_synthetic.py"),
    }


PRESETS = _presets()


def n_params(c: ModelConfig) -> int:
    """Parameters of a model of this shape (embedding and output counted apart when untied)."""
    ffn = 3 * c.hidden_dim * c.dim * max(c.n_experts, 1) + c.n_experts * c.dim  # + the router
    per_layer = (2 * c.dim + c.q_dim * c.dim * 2 + 2 * c.kv_dim * c.dim + ffn
                 + (c.q_dim + 2 * c.kv_dim if c.attn_bias else 0)
                 + (2 * c.head_dim if c.qk_norm else 0))
    embeddings = c.vocab_size * c.dim * (1 if c.tied_embeddings else 2)
    return c.n_layers * per_layer + embeddings + c.dim


def matmul_params(c: ModelConfig, rank: int, size: int) -> int:
    """Multiply-adds per token of this rank's layer matrices (the output matrix apart)."""
    p = plan(c, rank, size)
    kv = p.kv_rows.size
    experts = c.n_experts_used or 1     # a token runs that many experts' FFN slices
    return c.n_layers * (c.dim * (p.q_cols + 2 * kv) + c.dim * p.q_cols
                         + 3 * c.dim * p.ffn_len * experts)


# -- links and machines --------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float    # bytes/s each way, per node
    latency: float      # s per message, MPI to MPI
    note: str = ""

    def describe(self) -> str:
        return (f"{self.name} ({_rate(self.bandwidth)}, {self.latency * 1e6:.3g} µs per message"
                f"{'; ' + self.note if self.note else ''})")


LINKS = {
    "1gbe": Link("1gbe", 117.5e6, 50e-6, "940 Mbit/s of TCP payload"),
    "10gbe": Link("10gbe", 1.175e9, 20e-6, "9.4 Gbit/s of TCP payload"),
    "25gbe": Link("25gbe", 2.94e9, 10e-6, "23.5 Gbit/s of TCP payload"),
    "usb4": Link("usb4", 2.5e9, 40e-6, "USB4/Thunderbolt 4 host-to-host IP, ~20 Gbit/s achieved"),
    "ib-hdr": Link("ib-hdr", 24e9, 1.5e-6, "InfiniBand HDR 200 Gbit/s, RDMA"),
    "shm": Link("shm", 2.4e9, 4e-6, "ranks of one node: MPICH shared memory, this machine"),
}

_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "b/s": 1,
               "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "kib/s": 2**10, "mib/s": 2**20,
               "gib/s": 2**30}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
               "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _number_unit(text: str, what: str):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zµ/]*)\s*", text.lower())
    if not m:
        raise ValueError(f"{what} {text!r} is not a number with a unit")
    return float(m.group(1)), m.group(2)


def parse_rate(text: str) -> float:
    """'1gbit', '100mbit', '2.5GB/s' -> bytes/s."""
    value, unit = _number_unit(text, "bandwidth")
    if unit not in _RATE_UNITS:
        raise ValueError(f"bandwidth {text!r}: unit must be one of {', '.join(_RATE_UNITS)}")
    return value * _RATE_UNITS[unit]


def parse_time(text: str) -> float:
    value, unit = _number_unit(text, "latency")
    if unit not in _TIME_UNITS:
        raise ValueError(f"latency {text!r}: unit must be one of s, ms, us, ns")
    return value * _TIME_UNITS[unit]


def parse_size(text: str) -> int:
    """'64GiB', '24 GB', '512MiB' -> bytes (a bare number is bytes)."""
    value, unit = _number_unit(text, "memory size")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"memory size {text!r}: unit must be one of GiB, GB, MiB, MB, TiB, TB")
    return int(value * _SIZE_UNITS[unit])


def parse_link(text: str) -> Link:
    """A preset name, or 'bw=1gbit,lat=50us' (both keys required)."""
    if text in LINKS:
        return LINKS[text]
    parts = dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv)
    if set(parts) != {"bw", "lat"} or len(text.split(",")) != 2:
        raise ValueError(f"link {text!r}: a preset ({', '.join(LINKS)}) or 'bw=RATE,lat=TIME' "
                         f"(e.g. bw=1gbit,lat=50us)")
    bw, lat = parse_rate(parts["bw"]), parse_time(parts["lat"])
    if bw <= 0 or lat < 0:
        raise ValueError(f"link {text!r}: bandwidth must be > 0 and latency >= 0")
    return Link(f"bw={parts['bw']},lat={parts['lat']}", bw, lat)


@dataclass(frozen=True)
class Machine:
    """One node. Defaults: this project's 2-core AMD EPYC VM (23 GiB), measured on
    2026-11-30: the kernel and reduction rates by probes, layer_s / token_s / prefill_ops /
    prefill_row_s fitted to the 1-rank runs of bench/bench_plan.py (SmolLM2, synthetic)."""
    read_bw: float = 36e9           # bytes/s the node's cores read from memory (numba probe)
    cores: int = 2                  # cores of the node; a rank runs cores // ranks_per_node threads
    ranks_per_node: int = 1         # ranks sharing its cores, memory, bandwidth and link
    # decode streams a rank's weights at min(mem_fraction x its share of read_bw,
    # kernel_bw x its threads): the 4-bit matmuls (Q80 x Q40/Q41) consume 17.9-20.2 GB/s
    # per core from memory here (a matmul probe), the probe's bandwidth is shared
    kernel_bw: float = 18.5e9
    mem_fraction: float = 0.9
    layer_s: float = 15e-6          # per layer per decode step: ~8 kernel calls from Python
    token_s: float = 250e-6         # per step on the root: packet, embedding row, sampling
    # per reduction on > 1 rank, CPU: packing and summing in rank order (comm.py), fixed +
    # per value and rank: Q80 (quantise, dequantise) and F32 (copies)
    reduce_s: tuple = (("q80", 13e-6, 1.2e-9), ("f32", 4e-6, 0.2e-9))
    skew_s: float = 12e-6           # per collective on > 1 rank: the ranks never arrive together
                                    # (quiet 2-rank runs here: 9-30 µs of sync per collective)
    prefill_ops: float = 148e9      # 2 x multiply-adds per second of prompt matmuls, per core
    prefill_row_s: float = 3.5e-6   # per layer per prompt row: norms, rope, attention, Q80
    memory: int = 0                 # bytes per node (0: not checked)

    @property
    def threads(self) -> int:
        """Threads of one rank."""
        return max(1, self.cores // self.ranks_per_node)

    @property
    def stream_bw(self) -> float:
        """Bytes/s one rank streams its weights at in decode."""
        return min(self.mem_fraction * self.read_bw / self.ranks_per_node,
                   self.kernel_bw * self.threads)

    @property
    def rank_ops(self) -> float:
        """Ops/s of one rank on prompt matrices."""
        return self.prefill_ops * self.threads


# -- traffic -----------------------------------------------------------------------------

def wire_bytes(dim: int, rows: int, wire: str) -> int:
    """One rank's contribution to a reduction of [rows, dim] (comm._reduce_buffers)."""
    return rows * (dim + dim // QK * 2) if wire == "q80" else rows * dim * F32


def embedding_row_bytes(dim: int, file_type: str) -> int:
    values, nbytes = ROW_BLOCKS[file_type]
    return dim // values * nbytes


@dataclass(frozen=True)
class Collective:
    kind: str           # bcast | allgather | gatherv
    nbytes: int         # bcast: the message; allgather: one rank's block; gatherv: the total
    count: int = 1


def step_collectives(c: ModelConfig, size: int, wire: str, row_bytes: int, rows: int = 1,
                     logit_rows: int = 1, rows_packet: bool = False) -> list[Collective]:
    """What one step of `rows` rows goes through, in order (engine.py): the step packet, the
    rows' positions and slots when they are several sequences' (forward_rows), their stored
    embedding rows, two all-gathers per layer, the logit slices of `logit_rows` rows."""
    if size == 1:
        return []
    out = [Collective("bcast", STEP_HEADER * 4)]
    if rows_packet:
        out.append(Collective("bcast", 2 * 4 * rows))
    return out + [Collective("bcast", rows * row_bytes),
                  Collective("allgather", wire_bytes(c.dim, rows, wire), 2 * c.n_layers),
                  Collective("gatherv", F32 * c.vocab_size * logit_rows)]


def decode_collectives(c: ModelConfig, size: int, wire: str, row_bytes: int,
                       rows: int = 1) -> list[Collective]:
    """A decode step: one sequence's token (engine.forward), or one row for each of `rows`
    sequences decoding together (engine.forward_rows, every row's logits)."""
    return step_collectives(c, size, wire, row_bytes, rows, rows, rows_packet=rows > 1)


@dataclass(frozen=True)
class Traffic:
    rank: int
    sent: int
    recv: int


def decode_traffic(c: ModelConfig, size: int, wire: str, row_bytes: int) -> list[Traffic]:
    """Bytes per decode token of one sequence, rank by rank, as comm.py counts them."""
    if size == 1:
        return [Traffic(0, 0, 0)]
    m = wire_bytes(c.dim, 1, wire)
    reduce = 2 * c.n_layers * m * (size - 1)
    counts = [split_blocks(c.vocab_size, size, r).size for r in range(size)]
    packet = STEP_HEADER * 4 + row_bytes
    out = [Traffic(0, reduce + packet * (size - 1), reduce + F32 * (c.vocab_size - counts[0]))]
    out += [Traffic(r, reduce + F32 * counts[r], reduce + packet) for r in range(1, size)]
    return out


def collective_seconds(kind: str, nbytes: int, size: int, link: Link, share: int = 1) -> float:
    """One collective on `size` ranks, by the algorithm MPICH's default selection picks.
    nbytes: bcast - the message; allgather - one rank's block; gatherv - all blocks.
    `share`: ranks sharing a node's link (its bandwidth is split between them)."""
    if size == 1:
        return 0.0
    a, b = link.latency, share / link.bandwidth
    steps = math.ceil(math.log2(size))
    pow2 = size & (size - 1) == 0
    if kind == "allgather":
        total = nbytes * size
        if total < 524288 and pow2:          # recursive doubling
            return steps * a + (size - 1) * nbytes * b
        if total < 81920:                    # Bruck
            return steps * a + (size - 1) * nbytes * b
        return (size - 1) * (a + nbytes * b)  # ring
    if kind == "bcast":
        if nbytes < 12288 or size < 8:       # binomial tree
            return steps * (a + nbytes * b)
        return (steps + size - 1) * a + 2 * (size - 1) / size * nbytes * b  # scatter + allgather
    if kind == "gatherv":                    # linear: everyone sends to the root at once
        return a + nbytes * (size - 1) / size * b
    raise ValueError(kind)


def network_seconds(collectives: list[Collective], size: int, link: Link, share: int = 1) -> float:
    """The link's time for these collectives (latencies + bytes / bandwidth)."""
    return sum(x.count * collective_seconds(x.kind, x.nbytes, size, link, share)
               for x in collectives)


# -- time --------------------------------------------------------------------------------

def kv_read_bytes(c: ModelConfig, rank: int, size: int, context: int,
                  kv_float_type: str = "f32") -> int:
    """K and V a decode token attends to on this rank at `context` cached positions."""
    width = F32 if kv_float_type == "f32" else 2
    return 2 * width * c.n_layers * context * plan(c, rank, size).kv_heads.size * c.head_dim


def reduce_seconds(c: ModelConfig, size: int, run: RunConfig, machine: Machine,
                   rows: int = 1) -> float:
    """CPU of one reduction of `rows` rows on `size` ranks (packing, summing)."""
    if size == 1:
        return 0.0
    fixed, per_value = dict((w, (a, b)) for w, a, b in machine.reduce_s)[run.buffer_float_type]
    return fixed + per_value * rows * c.dim * size


@dataclass(frozen=True)
class Speed:
    compute_s: float        # the slowest rank's compute per step
    network_s: float        # the collectives of one step
    latency_s: float        # of which message latencies
    overhead_s: float       # fixed costs in compute_s (per layer, reduction, token)
    tokens: int             # tokens per step
    wait_s: float = 0.0     # ranks waiting for each other in collectives (Machine.skew_s)

    @property
    def sync_s(self) -> float:
        """Time in collectives: what comm.py's sync_seconds measures."""
        return self.network_s + self.wait_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.network_s + self.wait_s

    @property
    def tok_s(self) -> float:
        return self.tokens / self.step_s


def decode_speed(c: ModelConfig, run: RunConfig, size: int, link: Link, machine: Machine,
                 memory: list[RankMemory], row_bytes: int, context: int = 0,
                 rows: int = 1) -> Speed:
    """One decode step of `rows` sequences (aggregate tok/s when rows > 1)."""
    bw, ops = machine.stream_bw, machine.rank_ops
    overhead = (c.n_layers * (machine.layer_s + 2 * reduce_seconds(c, size, run, machine, rows))
                + machine.token_s)
    worst = 0.0
    for m in memory:
        weights = m.weights if not c.n_experts else read_bytes(c, plan(c, m.rank, size), run, rows)
        stream = (weights + rows * kv_read_bytes(c, m.rank, size, context,
                                                 run.kv_cache_float_type)) / bw
        arith = 2 * rows * matmul_params(c, m.rank, size) / ops if rows > 1 else 0.0
        worst = max(worst, max(stream, arith))
    coll = decode_collectives(c, size, run.buffer_float_type, row_bytes, rows)
    net = network_seconds(coll, size, link, machine.ranks_per_node)
    lat = network_seconds(coll, size, replace(link, bandwidth=float("inf")),
                          machine.ranks_per_node)
    wait = machine.skew_s * sum(x.count for x in coll)
    return Speed(worst + overhead, net, lat, overhead, rows, wait)


def prefill_speed(c: ModelConfig, run: RunConfig, size: int, link: Link, machine: Machine,
                  row_bytes: int, prompt: int = 128) -> Speed:
    """A prompt of `prompt` tokens in forwards of run.prefill_chunk rows (last row's logits)."""
    ops = machine.rank_ops
    chunk = max(1, min(run.prefill_chunk, prompt))
    compute = net = lat = overhead = wait = 0.0
    done = 0
    while done < prompt:
        t = min(chunk, prompt - done)
        worst = 0.0
        for r in range(size):
            attn = 4 * c.n_layers * t * (done + t / 2) * plan(c, r, size).q_cols
            worst = max(worst, (2 * t * matmul_params(c, r, size) + attn) / ops)
        fixed = (c.n_layers * (t * machine.prefill_row_s + machine.layer_s
                               + 2 * reduce_seconds(c, size, run, machine, t)) + machine.token_s)
        head = 2 * c.dim * split_blocks(c.vocab_size, size, 0).size / ops   # last row's logits
        compute += worst + fixed + head
        overhead += fixed
        coll = step_collectives(c, size, run.buffer_float_type, row_bytes, t)  # last row's logits
        net += network_seconds(coll, size, link, machine.ranks_per_node)
        lat += network_seconds(coll, size, replace(link, bandwidth=float("inf")),
                               machine.ranks_per_node)
        wait += machine.skew_s * sum(x.count for x in coll)
        done += t
    return Speed(compute, net, lat, overhead, prompt, wait)


# -- the plan ------------------------------------------------------------------------------

def is_valid_size(c: ModelConfig, weights_type: str, n: int) -> bool:
    """Whether n ranks can split this model with these weights (shard.check's rules)."""
    if not 1 <= n <= c.n_heads:
        return False
    if weights_type in ("q40", "q41"):
        return not (c.dim % BLOCK or any(plan(c, r, n).q_cols % BLOCK or
                                         plan(c, r, n).ffn_len % BLOCK for r in range(n)))
    return True


def valid_sizes(c: ModelConfig, weights_type: str, limit: int) -> list[int]:
    """Rank counts 1..limit this model can be split into."""
    return [n for n in range(1, limit + 1) if is_valid_size(c, weights_type, n)]


@dataclass
class Plan:
    config: ModelConfig
    run: RunConfig
    size: int
    link: Link
    machine: Machine
    row_bytes: int
    context: int
    memory: list[RankMemory]
    traffic: list[Traffic]
    collectives: int
    decode: Speed
    prefill: Speed
    batch: Speed | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rank_bytes(self) -> list[int]:
        """What each rank's process holds: arrays + RUNTIME_BYTES."""
        return [m.total + RUNTIME_BYTES for m in self.memory]

    @property
    def node_bytes(self) -> int:
        """The fullest node: ranks_per_node of the largest ranks."""
        return self.machine.ranks_per_node * max(self.rank_bytes)

    @property
    def fits(self) -> bool | None:
        return None if not self.machine.memory else self.node_bytes <= self.machine.memory


def make_plan(c: ModelConfig, run: RunConfig, size: int, link: Link, machine: Machine,
              row_bytes: int, context: int = 0, prompt: int = 128) -> Plan:
    """run: resolved (RunConfig.resolved); size: a valid rank count (shard.check)."""
    memory = per_rank(c, run, size)
    coll = decode_collectives(c, size, run.buffer_float_type, row_bytes)
    batch = (decode_speed(c, run, size, link, machine, memory, row_bytes, context,
                          rows=run.parallel) if run.parallel > 1 else None)
    return Plan(c, run, size, link, machine, row_bytes, context, memory,
                decode_traffic(c, size, run.buffer_float_type, row_bytes),
                sum(x.count for x in coll),
                decode_speed(c, run, size, link, machine, memory, row_bytes, context),
                prefill_speed(c, run, size, link, machine, row_bytes, prompt), batch)


def smallest_fitting(c: ModelConfig, run: RunConfig, machine: Machine, limit: int) -> int | None:
    """The smallest valid rank count whose fullest node fits machine.memory (None: none up
    to `limit`, or no memory given). Memory only: no link needed."""
    if not machine.memory:
        return None
    for n in range(1, limit + 1):
        if not is_valid_size(c, run.weights_float_type, n):
            continue
        need = machine.ranks_per_node * max(m.total for m in per_rank(c, run, n))
        if need + machine.ranks_per_node * RUNTIME_BYTES <= machine.memory:
            return n
    return None


def _rate(bps: float) -> str:
    bits = bps * 8
    return f"{bits / 1e9:.3g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.3g} Mbit/s"

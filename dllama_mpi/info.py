"""`info`: a model's config, tensor types, parameters and bytes per rank (no MPI needed)."""
from __future__ import annotations

import collections
import math

from . import models
from .config import RunConfig
from .formats import expected_shapes
from .kvcache import KVCache
from .loading import tensor_specs, slice_shape
from .quant import Q40_BLOCK_BYTES, QK
from .session import open_model
from .shard import plan


def print_info(model_arg: str, ranks: int) -> int:
    model = open_model(models.resolve(model_arg))
    c = model.config
    run = RunConfig().resolved(model.preferred_weight_type())
    print(f"file: {model.path} (runs as {run.weights_float_type} by default)")
    for k, v in c.to_dict().items():
        if k == "rope_freq_factors" and v is not None:
            v = f"{len(v)} factors"
        print(f"  {k}: {v}")
    # the model's own tensors, by canonical name (not a file's extras such as rope_freqs)
    tensors = [model.tensor(name) for name in expected_shapes(c)]
    types = collections.Counter(t.type for t in tensors)
    params = sum(math.prod(t.shape) for t in tensors)
    print(f"tensors: {dict(sorted(types.items()))}; parameters: {params:,} ({_human(params)})")
    if ranks > c.n_heads:
        print(f"{ranks} ranks: impossible, at most {c.n_heads} (query heads)")
        return 1
    seq = run.resolved_max_seq_len(c)
    for r in range(ranks):
        p = plan(c, r, ranks)
        q40 = f32 = 0
        for name, kind in tensor_specs(c):
            shape = slice_shape(c, name, kind, p)
            n = shape[0] * (shape[1] if len(shape) > 1 else 1)
            f32 += 4 * n
            q40 += n // QK * Q40_BLOCK_BYTES if len(shape) == 2 else 4 * n
        kv = KVCache.bytes_needed(c.n_layers, seq, p.kv_heads.size, c.head_dim)
        print(f"rank {r}/{ranks}: heads {p.q_heads.start}-{p.q_heads.stop - 1}, "
              f"kv heads {p.kv_heads.start}-{p.kv_heads.stop - 1}, ffn {p.ffn.start}:{p.ffn.stop}, "
              f"vocab {p.vocab.start}:{p.vocab.stop}; weights q40 {q40 / 2**20:.1f} MiB / "
              f"f32 {f32 / 2**20:.1f} MiB; KV cache {kv / 2**20:.1f} MiB at {seq} positions")
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"

"""`info`: a model's config, tensor types, parameters and bytes per rank (no MPI needed).
The bytes come from memory.py, as start-up's report does, for the types a run would use."""
from __future__ import annotations

import collections
import math

from .. import registry
from ..config import MIXED, RunConfig
from ..formats import expected_shapes, open_model
from ..memory import mib, per_rank
from ..shard import plan


def print_info(model_arg: str, ranks: int, run: RunConfig | None = None) -> int:
    from ..runtime.startup import resolve_run
    model = open_model(registry.resolve(model_arg))
    c = model.config
    run = resolve_run(run or RunConfig(), model)
    weights = run.weights_float_type
    if weights == MIXED:
        counts = collections.Counter(run.tensor_types.values())
        weights += " (" + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())) + ")"
    print(f"file: {model.path} (runs as {weights}, output matrix "
          f"{run.output_float_type}, wire {run.buffer_float_type})")
    for k, v in c.to_dict().items():
        if k == "rope_freq_factors" and v is not None:
            v = f"{len(v)} factors"
        elif isinstance(v, float):
            v = f"{v:.7g}"      # norm_eps 1e-05, not the f32 value 9.999999747378752e-06
        print(f"  {k}: {v}")
    # the model's own tensors, by canonical name (not a file's extras such as rope_freqs)
    tensors = [model.tensor(name) for name in expected_shapes(c)]
    types = collections.Counter(t.type for t in tensors)
    nbytes = collections.Counter()
    for t in tensors:
        values, size = t.block
        nbytes[t.type] += math.prod(t.shape) // values * size
    params = sum(math.prod(t.shape) for t in tensors)
    print("tensors: " + ", ".join(f"{t} x{types[t]} ({mib(nbytes[t])})" for t in sorted(types))
          + f"; parameters: {params:,} ({_human(params)})")
    if ranks > c.n_heads:
        print(f"{ranks} ranks: impossible, at most {c.n_heads} (query heads)")
        return 1
    seq = run.resolved_max_seq_len(c)
    for m in per_rank(c, run, ranks):
        p = plan(c, m.rank, ranks)
        print(f"rank {m.rank}/{ranks}: heads {p.q_heads.start}-{p.q_heads.stop - 1}, "
              f"kv heads {p.kv_heads.start}-{p.kv_heads.stop - 1}, ffn {p.ffn.start}:{p.ffn.stop}, "
              f"vocab {p.vocab.start}:{p.vocab.stop}; weights {mib(m.weights)}, KV cache "
              f"{mib(m.kv_cache)} {'on disk' if m.kv_on_disk else 'in memory'} ({seq} "
              f"positions x {run.parallel} slots, {run.kv_cache_float_type}), buffers "
              f"{mib(m.buffers)}; total in memory {mib(m.total)}")
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"

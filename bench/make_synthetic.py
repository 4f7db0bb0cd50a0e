#!/usr/bin/env python
"""Write a synthetic (random-weight) Llama GGUF for benchmarks and tests.

    python bench/make_synthetic.py OUT.gguf [--preset synthetic-1.1b|synthetic-moe|tiny]
                                            [--vocab N] [--type f32|f16|q4_0|q8_0|q4_k_m|...]
                                            [--seed S]

synthetic-1.1b: dim 2048, hidden 8192, 16 layers, 32 heads, 8 KV heads, vocab 32000, untied
output, weights normal(0, 0.02), context 4096, q4_0, the synthetic "bytes" tokenizer (about
1.1 B parameters, ~0.6 GB in q4_0).  synthetic-moe: a Mixtral-like mixture of experts, dim 1024,
16 layers of 8 experts of 2816 units, 2 used per token (~1.2 B parameters, ~0.4 B read per
token).  If OUT already exists with the same preset, shape, type and
seed (recorded in ``dllama_mpi.synthetic.*`` metadata), nothing is written.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dllama_mpi.testing import FILE_TYPES, WEIGHT_TYPES, random_llama_tensors, write_llama_gguf  # noqa: E402

PRESETS = {
    "synthetic-1.1b": dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=32000,
                           context_length=4096, tied=False, std=0.02, weight_type="q4_0", rope_theta=10000.0),
    "tiny": dict(dim=256, hidden_dim=640, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048,
                 context_length=1024, tied=False, std=0.02, weight_type="q4_0", rope_theta=10000.0),
    # a Mixtral-like mixture of experts: 8 experts of 2816 units, 2 used per token (~1.2 B
    # parameters, ~0.4 B of them read per token)
    "synthetic-moe": dict(dim=1024, hidden_dim=2816, n_layers=16, n_heads=16, n_kv_heads=4,
                          vocab_size=32000, context_length=4096, tied=False, std=0.02,
                          weight_type="q4_0", rope_theta=10000.0, n_experts=8, n_experts_used=2),
}

_META = "dllama_mpi.synthetic."


def _existing_matches(path: Path, p: dict, preset: str, seed: int) -> bool:
    """True when ``path`` is a complete GGUF written by this script with the same parameters."""
    try:
        import gguf
        r = gguf.GGUFReader(path)
        f = r.fields

        def get(key):
            return f[key].contents() if key in f else None

        want = {
            "llama.embedding_length": p["dim"], "llama.feed_forward_length": p["hidden_dim"],
            "llama.block_count": p["n_layers"], "llama.attention.head_count": p["n_heads"],
            "llama.attention.head_count_kv": p["n_kv_heads"], "llama.vocab_size": p["vocab_size"],
            "llama.context_length": p["context_length"], "general.file_type": FILE_TYPES[p["weight_type"]],
            _META + "preset": preset, _META + "seed": seed,
        }
        if any(get(k) != v for k, v in want.items()):
            return False
        if abs(get(_META + "std") - p["std"]) > 1e-6:
            return False
        last = max(r.tensors, key=lambda t: t.data_offset)
        return last.data_offset + last.n_bytes <= path.stat().st_size
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="synthetic-1.1b")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    ap.add_argument("--type", dest="weight_type", choices=sorted(WEIGHT_TYPES), default=None,
                    help="weight type of the matrices (default: the preset's, q4_0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite even if OUT matches")
    args = ap.parse_args(argv)

    p = dict(PRESETS[args.preset])
    if args.vocab is not None:
        p["vocab_size"] = args.vocab
    if args.weight_type is not None:
        p["weight_type"] = args.weight_type

    out: Path = args.out
    if out.exists() and not args.force and _existing_matches(out, p, args.preset, args.seed):
        print(f"{out}: exists with matching metadata ({out.stat().st_size / 1e9:.3f} GB), not rewritten")
        return 0

    shape = {k: p[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")}
    moe = {k: p[k] for k in ("n_experts", "n_experts_used") if k in p}
    tensors = random_llama_tensors(**shape, tied=p["tied"], std=p["std"], seed=args.seed,
                                   n_experts=moe.get("n_experts", 0))
    n_params = sum(math.prod(s) for s in tensors.shapes.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_llama_gguf(out, **shape, context_length=p["context_length"], rope_theta=p["rope_theta"],
                     tensors=tensors, weight_type=p["weight_type"], tokenizer="bytes",
                     name=f"dllama-mpi {args.preset}",
                     extra_metadata={_META + "preset": args.preset, _META + "seed": args.seed,
                                     _META + "std": float(p["std"])}, **moe)
    dt = time.perf_counter() - t0
    print(f"{out}: {args.preset} {p['weight_type']} {n_params / 1e9:.3f} B params, "
          f"{os.path.getsize(out) / 1e9:.3f} GB written in {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

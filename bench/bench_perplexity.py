"""What each runtime choice costs in perplexity, on SmolLM2 against F32 (run by hand).

    python bench/bench_perplexity.py [--model smollm2-135m] [--text data/texts/us-public-domain.txt]
                                     [--ctx 512] [--stride 256]

Runs `perplexity`'s evaluation (apps/perplexity.py) for each variant — the weights, the
output matrix, the wire, the rank count — and prints perplexity ± its standard error, the
change against F32, and the top-1 agreement with the F32 run's predictions. The variants
the command line cannot spell (a 4-bit output matrix) go through RunConfig. The wire only
matters with more than one rank: those rows run on 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

# (label, weights, output, wire, ranks, KV cache type)
VARIANTS = [
    ("F32 weights, F32 wire (reference)", "f32", "f32", "f32", 1, "f32"),
    ("F32 weights, F32 wire, 2 ranks", "f32", "f32", "f32", 2, "f32"),
    ("F32 weights, Q80 wire, 2 ranks", "f32", "f32", "q80", 2, "f32"),
    ("F32 weights, F16 KV cache", "f32", "f32", "f32", 1, "f16"),
    ("Q41 layers + Q80 output (default)", "q41", "q80", "q80", 1, "f32"),
    ("Q41 layers + Q80 output, F16 KV cache", "q41", "q80", "q80", 1, "f16"),
    ("Q41 layers + Q80 output, Q80 wire, 2 ranks", "q41", "q80", "q80", 2, "f32"),
    ("Q41 layers + Q41 output", "q41", "q41", "q80", 1, "f32"),
    ("Q40 layers + Q80 output", "q40", "q80", "q80", 1, "f32"),
    ("Q40 everywhere", "q40", "q40", "q80", 1, "f32"),
]


def worker(args) -> None:
    from dllama_mpi import registry
    from dllama_mpi.apps.perplexity import evaluate
    from dllama_mpi.comm import make_comm
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.startup import start
    comm = make_comm()
    run = RunConfig(weights_float_type=args.weights, output_float_type=args.output,
                    buffer_float_type=args.wire, max_seq_len=args.ctx, prefill_chunk=args.batch,
                    nthreads=args.nthreads, kv_cache_float_type=args.kv)
    s = start(comm, registry.resolve(args.model) if comm.is_root else args.model, run)
    if not comm.is_root:
        s.engine.run_worker_loop()
        return
    with open(args.text, encoding="utf-8") as f:
        ids = s.tokenizer.encode(f.read())
    r = evaluate(s.engine, ids, args.ctx, args.stride, args.batch)
    s.engine.stop()
    print(json.dumps(dict(perplexity=r.perplexity, stderr=r.stderr, mean_nll=r.mean_nll,
                          nll=r.nll.tolist(), top1=r.top1.tolist(), tokens=int(r.nll.size),
                          tok_s=r.tokens_per_s, ranks=comm.size,
                          weights=s.run.weights_float_type, output=s.run.output_float_type,
                          wire=s.run.buffer_float_type)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--weights", default="f32")
    ap.add_argument("--output", default="f32")
    ap.add_argument("--wire", default="f32")
    ap.add_argument("--kv", default="f32")
    ap.add_argument("--only", nargs="+", default=None, metavar="WORD",
                    help="run the reference and the variants whose label holds one of these")
    ap.add_argument("--nthreads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=os.path.join(HERE, "..", "data", "texts",
                                                   "us-public-domain.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import numpy as np
    rows = []
    chosen = [v for i, v in enumerate(VARIANTS)
              if i == 0 or args.only is None or any(w in v[0] for w in args.only)]
    for label, weights, output, wire, ranks, kv in chosen:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable,
               os.path.abspath(__file__), "--worker", "--weights", weights, "--output", output,
               "--wire", wire, "--kv", kv, "--model", args.model, "--text", args.text, "--ctx",
               str(args.ctx), "--stride", str(args.stride), "--batch", str(args.batch)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
        if p.returncode != 0:
            raise RuntimeError(f"{label}: {p.stderr[-2000:]}")
        rows.append((label, json.loads(p.stdout.strip().splitlines()[-1])))
        print(f"{label}: {rows[-1][1]['perplexity']:.4f}", flush=True)
    ref = rows[0][1]
    lines = [f"{args.model}, {os.path.basename(args.text)}: {ref['tokens']} tokens scored, "
             f"windows of {args.ctx}, stride {args.stride}", "",
             "| runtime | ranks | perplexity ± s.e. | vs F32 | mean ΔNLL vs F32 (± s.e.) | "
             "top-1 agreement with F32 |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        d = np.array(r["nll"]) - np.array(ref["nll"])
        agree = np.mean(np.array(r["top1"]) == np.array(ref["top1"]))
        lines.append(f"| {label} | {r['ranks']} | {r['perplexity']:.4f} ± {r['stderr']:.3f} | "
                     f"{(r['perplexity'] / ref['perplexity'] - 1) * 100:+.2f}% | "
                     f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(d.size):.4f} | "
                     f"{agree:.1%} |")
    print("\n" + "\n".join(lines))
    out = os.path.join(HERE, "results", time.strftime("perplexity-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"rows": [(label, {k: v for k, v in r.items() if k not in ("nll", "top1")})
                            for label, r in rows], "table": lines}, f, indent=1)
    print(f"written {out}")


if __name__ == "__main__":
    main()

"""The spread of one batched decode step's time (run by hand, one process):

    python bench/bench_step.py [--model smollm2-135m] [--parallel 16] [--tokens 50]
        [--nthreads 2] [--steps 200]

N sequences (KV slots) of `tokens` tokens each decode their next token in one step
(engine.forward_rows, the scheduler's step), timed `steps` times in a row on the same
positions; prints the min, p10, median, p90 and max in ms and the median's tokens/s. A
shared VM's second CPU comes and goes: the median and p10 of many steps say more than one
timed run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from dllama_mpi.comm import SerialComm  # noqa: E402
from dllama_mpi.config import RunConfig  # noqa: E402
from dllama_mpi.registry import pull  # noqa: E402
from dllama_mpi.runtime.startup import start  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--nthreads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    n, tokens = args.parallel, args.tokens
    path = args.model if os.path.exists(args.model) else pull(args.model, quiet=True)
    run = RunConfig(nthreads=args.nthreads, max_seq_len=tokens + 8, parallel=n)
    engine = start(SerialComm(), path, run, want_tokenizer=False).engine
    ids = np.random.default_rng(0).integers(10, 1000, tokens).tolist()
    for slot in range(n):
        engine.forward(ids, 0, slot=slot)
    rows = np.arange(n, dtype=np.int32)
    step = (ids[:n], np.full(n, tokens, np.int32), rows, rows)
    for _ in range(5):                        # first calls: buffers, bound calls
        engine.forward_rows(*step)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.forward_rows(*step)
        times.append(time.perf_counter() - t0)
    engine.stop()
    ms = np.array(times) * 1e3
    p10, med, p90 = np.percentile(ms, [10, 50, 90])
    print(f"{args.parallel} sequences at position {tokens}, {args.nthreads} thread(s), {args.steps} steps: "
          f"min {ms.min():.2f}  p10 {p10:.2f}  median {med:.2f}  p90 {p90:.2f}  max {ms.max():.2f} ms  "
          f"({n / med * 1e3:.0f} tok/s at the median)")


if __name__ == "__main__":
    main()

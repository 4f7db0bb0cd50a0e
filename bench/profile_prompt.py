"""Where a prompt pass spends its time, kernel by kernel (run by hand, one process):

    python bench/profile_prompt.py [--model smollm2-135m] [--tokens 128] [--nthreads 1] [--reps 3]
        [--parallel N]

Wraps every bound kernel call (kernels.bind_*) and every direct kernel call with a timer, runs
the prompt `reps` times (fixed token ids, one new token) and prints per kernel the seconds per
pass (best pass), the calls and, as "python + serial rest", the pass time the kernels miss.
With --parallel N it profiles instead one batched decode step: N sequences (KV slots), each
`tokens` long already, each decoding its next token in the same step (the scheduler's step).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from dllama_mpi import kernels  # noqa: E402

_T = defaultdict(float)
_N = defaultdict(int)


def _label(name, args):
    shapes = [a.shape for a in args if isinstance(a, np.ndarray)]
    w = [a for a in args if hasattr(a, "rows") and hasattr(a, "cols")]
    if w:
        return f"{name} {type(w[0]).__name__} {w[0].rows}x{w[0].cols} T={shapes[0][0] if shapes else '?'}"
    return f"{name} {shapes[0] if shapes else ''}"


def _timed(label, fn):
    def call(*a, **k):
        t0 = time.perf_counter()
        r = fn(*a, **k)
        _T[label] += time.perf_counter() - t0
        _N[label] += 1
        return r
    return call


def _wrap_module():
    for name in dir(kernels):
        fn = getattr(kernels, name)
        if name.startswith("bind_"):
            def bind(*a, _fn=fn, _name=name, **k):
                bound = _fn(*a, **k)
                if bound is None:            # a fused stretch that cannot run here (fused_tokens)
                    return None
                inner = getattr(bound, "func", None)
                return _timed(_label(getattr(inner, "__name__", _name), a), bound)
            setattr(kernels, name, bind)
        elif callable(fn) and name in ("matmul_q80_q40", "matmul_q80_q41", "matmul_q80_q80", "matmul_f32",
                                       "quantize_q80_act", "rmsnorm", "rmsnorm_q80", "silu_mul_q80",
                                       "attention_block", "rope_interleaved", "attention"):
            def direct(*a, _fn=fn, _name=name, **k):
                return _timed(_label(_name, a), _fn)(*a, **k)
            setattr(kernels, name, direct)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--nthreads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=0)
    args = ap.parse_args()
    _wrap_module()
    from dllama_mpi.comm import SerialComm
    from dllama_mpi.config import RunConfig
    from dllama_mpi.registry import pull
    from dllama_mpi.runtime.generation import generate
    from dllama_mpi.runtime.startup import start
    path = args.model if os.path.isfile(args.model) else pull(args.model, quiet=True)
    n = args.parallel
    run = RunConfig(nthreads=args.nthreads, max_seq_len=args.tokens + 8, parallel=max(1, n))
    s = start(SerialComm(), path, run, want_tokenizer=False)
    ids = list(np.random.default_rng(0).integers(10, 1000, args.tokens))
    if n:
        for slot in range(n):
            s.engine.forward(ids, 0, slot=slot)

    def one_pass():
        if n:      # every sequence's next token at position `tokens` (rewritten each pass)
            s.engine.forward_rows(ids[:n], np.full(n, args.tokens, np.int32),
                                  np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32))
        else:
            generate(s.engine, ids, 1, lambda l: int(np.argmax(l)), set(), args.tokens + 8,
                     prefill_chunk=args.tokens)

    best, best_k = float("inf"), {}
    for _ in range(args.reps + 1):           # the first pass binds and warms up
        _T.clear()
        _N.clear()
        t0 = time.perf_counter()
        one_pass()
        dt = time.perf_counter() - t0
        if dt < best:
            best, best_k = dt, (dict(_T), dict(_N))
    s.engine.stop()
    tk, nk = best_k
    what = (f"one decode step of {n} sequences at position {args.tokens} {best * 1e3:.1f} ms "
            f"({n / best:.1f} tok/s)" if n else
            f"prompt pass of {args.tokens} tokens + 1 decode step {best * 1e3:.1f} ms "
            f"({args.tokens / best:.1f} tok/s)")
    print(f"kernel path {getattr(kernels, 'KERNELS', '(no KERNELS: before the paths)')}, "
          f"{args.nthreads} thread(s): {what}")
    for label in sorted(tk, key=tk.get, reverse=True):
        print(f"  {tk[label] * 1e3:8.2f} ms  {nk[label]:4d} calls  {label}")
    print(f"  {(best - sum(tk.values())) * 1e3:8.2f} ms            python + serial rest")


if __name__ == "__main__":
    main()

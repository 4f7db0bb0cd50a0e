"""One measured run, under mpiexec: prompt tokens/s and decode tokens/s on fixed token ids.

    mpiexec -n R python bench/bench_decode.py --model M.gguf --nthreads T [--prompt-tokens 20]
        [--steps 64] [--parallel 1] [--weights-float-type q40] [--buffer-float-type q80]

Prints one JSON line (rank 0): the speeds, the bytes of weights all ranks read per token
(for the roofline), and per-rank per-token compute/sync/bytes.  With --parallel N > 1,
N sequences (random prompts) decode together and decode_tok_s is the aggregate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from dllama_mpi.comm import make_comm  # noqa: E402
from dllama_mpi.config import RunConfig  # noqa: E402
from dllama_mpi.memory import read_bytes  # noqa: E402
from dllama_mpi.shard import plan  # noqa: E402
from dllama_mpi.runtime.generation import generate, generate_batch  # noqa: E402
from dllama_mpi.apps.inference import decode_averages  # noqa: E402
from dllama_mpi.runtime.startup import start  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--nthreads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--weights-float-type", default="auto")
    ap.add_argument("--buffer-float-type", default="auto")
    ap.add_argument("--parallel", type=int, default=1)
    args = ap.parse_args()
    run = RunConfig(weights_float_type=args.weights_float_type,
                    buffer_float_type=args.buffer_float_type,
                    nthreads=args.nthreads, max_seq_len=args.prompt_tokens + args.steps + 8,
                    prefill_chunk=max(128, args.prompt_tokens), parallel=args.parallel)
    comm = make_comm()
    s = start(comm, args.model, run, want_tokenizer=False)
    run = s.run
    if not comm.is_root:
        s.engine.run_worker_loop()
        s.engine.gather_step_stats()
        return
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, s.config.vocab_size, args.prompt_tokens).tolist()
    # warm-up forward of the whole prompt (first-call costs; llama-bench warms up with the same
    # prompt too), then reset the cache positions by starting at 0
    s.engine.forward(prompt, 0)
    greedy = lambda l: int(np.argmax(l))  # noqa: E731
    if args.parallel > 1:
        prompts = [rng.integers(3, s.config.vocab_size, args.prompt_tokens).tolist()
                   for _ in range(args.parallel)]
        s.engine.forward_rows(prompt[:args.parallel], [0] * args.parallel,
                              list(range(args.parallel)))  # warm-up of the rows path
        b = generate_batch(s.engine, prompts, [args.steps] * args.parallel,
                           [greedy] * args.parallel, set(), s.max_seq_len, args.parallel,
                           run.prefill_chunk)
        n_prompt = sum(len(p) for p in prompts)
        speeds = dict(prompt_tok_s=n_prompt / b.prefill_seconds, decode_tok_s=b.decode_tokens_per_s,
                      generated=sum(len(g.generated_tokens) for g in b.generations))
    else:
        g = generate(s.engine, prompt, args.steps, greedy, set(), s.max_seq_len, run.prefill_chunk)
        speeds = dict(prompt_tok_s=g.prompt_tokens_per_s, decode_tok_s=g.decode_tokens_per_s,
                      generated=len(g.generated_tokens))
    s.engine.stop()
    per_rank = [decode_averages(steps[1:]) for steps in s.engine.gather_step_stats()]
    weight_bytes = sum(m.weights for m in s.memory)
    # what a step streams: a mixture of experts reads only the chosen experts (expected
    # count under uniform routing for `parallel` rows; random weights route near-uniformly)
    read = sum(read_bytes(s.config, plan(s.config, m.rank, comm.size), run, args.parallel)
               for m in s.memory)
    print(json.dumps({
        "model": os.path.basename(args.model), "ranks": comm.size, "nthreads": s.nthreads,
        "weights": run.weights_float_type, "wire": run.buffer_float_type,
        "prompt_tokens": len(prompt), "parallel": args.parallel, **speeds,
        "weight_bytes_held": weight_bytes, "weight_bytes_per_token": read,
        "per_rank": per_rank}))


if __name__ == "__main__":
    main()

"""Inter-token latency of running streams while a long prompt arrives (one process).

    python bench/bench_itl.py [--model smollm2-135m] [--streams 4] [--prompt-tokens 2000]
        [--budget 256] [--nthreads 1]

`--streams` sequences decode (greedy, ignore_eos); after they have made --warm tokens each a
prompt of --prompt-tokens arrives. Three policies, each on a fresh scheduler over the same
session:
  chunked   decode rows and one prompt chunk share every step, within --budget tokens
  alone     the old behaviour: the prompt is prefilled alone (chunks of 128) and decode
            resumes when it is done (Scheduler(prefill_alone=True))
  one-step  the prompt as one chunk beside the decode rows (token budget without limit)
For each: the streams' gaps between tokens from the long prompt's arrival until every
stream has made --after tokens past the prompt's first token (max, p50, p99), that first
token's latency (TTFT), and the streams' tokens/s from the arrival to that first token.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from dllama_mpi.comm import SerialComm  # noqa: E402
from dllama_mpi.config import RunConfig, SamplingParams  # noqa: E402
from dllama_mpi.runtime.scheduler import Scheduler  # noqa: E402
from dllama_mpi.runtime.startup import start  # noqa: E402


def one_policy(s, args, name, **policy) -> dict:
    sched = Scheduler(s.engine, n_slots=args.streams + 1, max_seq_len=s.max_seq_len,
                      eos_ids=set(), prefix_cache=False, **policy)
    rng = np.random.default_rng(1)
    vocab = s.config.vocab_size
    stamps: list[list[float]] = [[] for _ in range(args.streams)]
    warm = threading.Barrier(args.streams + 1)

    def on_token(i):
        def cb(ev):
            stamps[i].append(time.perf_counter())
            if len(stamps[i]) == args.warm:
                threading.Thread(target=warm.wait, daemon=True).start()
        return cb

    loop = threading.Thread(target=sched.run)
    loop.start()
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    streams = [sched.submit(rng.integers(3, vocab, 16).tolist(), params, on_token=on_token(i))
               for i in range(args.streams)]
    warm.wait()
    t_submit = time.perf_counter()
    long = sched.submit(rng.integers(3, vocab, args.prompt_tokens).tolist(),
                        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    c = long.wait()
    t_first = t_submit + c.prompt_seconds
    while any(sum(t > t_first for t in st) < args.after for st in stamps):
        time.sleep(0.005)
    t_end = max([t for t in st if t > t_first][args.after - 1] for st in stamps)
    for h in streams:
        h.cancel()
    sched.close()
    loop.join()
    gaps, made = [], 0
    for st in stamps:
        t = np.array(st)
        inside = (t[1:] > t_submit) & (t[1:] <= t_end)     # gaps ending after the arrival
        gaps += (t[1:] - t[:-1])[inside].tolist()
        made += int(((t > t_submit) & (t <= t_first)).sum())
    g = np.array(gaps) * 1e3
    return dict(policy=name, ttft_s=c.prompt_seconds, gaps=len(g), max_ms=g.max(),
                p50_ms=np.percentile(g, 50), p99_ms=np.percentile(g, 99),
                stream_tok_s=made / (t_first - t_submit), steps=sched.steps_total)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--warm", type=int, default=8, help="tokens per stream before the prompt")
    ap.add_argument("--after", type=int, default=16,
                    help="tokens per stream after the prompt's first, in the measured window")
    ap.add_argument("--decode-tokens", type=int, default=400)
    ap.add_argument("--nthreads", type=int, default=1)
    ap.add_argument("--policies", default="chunked,alone,one-step")
    args = ap.parse_args()
    run = RunConfig(nthreads=args.nthreads, parallel=args.streams + 1,
                    max_seq_len=args.prompt_tokens + args.decode_tokens + 32)
    s = start(SerialComm(), args.model, run, want_tokenizer=False)
    policies = {"chunked": dict(token_budget=args.budget),
                "alone": dict(token_budget=128, prefill_alone=True),
                "one-step": dict(token_budget=10**9)}
    for t in (args.budget, 128):          # warm-up: buffers of the step shapes used below
        s.engine.forward_rows([5] * t, list(range(t)), [0] * t, logit_rows=[0, t - 1])
    print(f"{args.streams} streams decoding; a {args.prompt_tokens}-token prompt arrives "
          f"({s.config.n_layers} layers, dim {s.config.dim}, {s.nthreads} threads)")
    for name in args.policies.split(","):
        r = one_policy(s, args, name, **policies[name])
        print(f"{r['policy']:>9}: TTFT {r['ttft_s']:.2f} s; stream gaps "
              f"({r['gaps']} gaps): max {r['max_ms']:.0f} ms, p50 {r['p50_ms']:.0f} ms, "
              f"p99 {r['p99_ms']:.0f} ms; streams {r['stream_tok_s']:.1f} tok/s "
              f"in that window", flush=True)


if __name__ == "__main__":
    main()

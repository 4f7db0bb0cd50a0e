"""The per-token cost of structured output (one process): decode with and without a
response_format on the same prompt, and the time spent in the grammar (mask + advance) and
in the sampler per token.

    python bench/bench_grammar.py [--model smollm2-135m] [--tokens 64] [--nthreads 1]
        [--repeat 3]

Each case runs --repeat times (greedy; the schema case stops when its JSON is complete, the
free case runs to the same number of tokens with ignore_eos); the best run is reported as
ms per decode token. The grammar's share is timed around Matcher.allowed / accept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dllama_mpi import grammar  # noqa: E402
from dllama_mpi.comm import SerialComm  # noqa: E402
from dllama_mpi.config import RunConfig, SamplingParams  # noqa: E402
from dllama_mpi.runtime.startup import scheduler_for, start  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "city": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PROMPT = ("Describe a fictional person as JSON with the keys name, age, city and hobbies "
          "(a list of strings).")


class Timed:
    """Wraps a Matcher: time spent in allowed() and accept() (per token: `per_token`)."""
    per_token: list[float] = []

    def __init__(self, m):
        self.m = m

    def allowed(self, n=None):
        t = time.perf_counter()
        try:
            return self.m.allowed(n)
        finally:
            Timed.per_token.append(time.perf_counter() - t)

    def accept(self, token):
        t = time.perf_counter()
        try:
            return self.m.accept(token)
        finally:
            Timed.per_token[-1] += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.m, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--nthreads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    s = start(SerialComm(), args.model, RunConfig(max_seq_len=512, nthreads=args.nthreads))
    tok = s.tokenizer
    sched = scheduler_for(s)
    compiler = sched.grammar
    t0 = time.perf_counter()
    compiler.ll_tokenizer()
    build = time.perf_counter() - t0
    rf = grammar.response_format_text({"type": "json_schema", "json_schema": {
        "name": "person", "schema": SCHEMA, "strict": True}})
    t0 = time.perf_counter()
    compiler.matcher(rf)
    compile_s = time.perf_counter() - t0
    make = compiler.matcher
    compiler.matcher = lambda text: Timed(make(text))
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))

    first = []

    def run(params):
        best = None
        for _ in range(args.repeat):
            Timed.per_token = []
            c = sched.generate(prompt, params)
            if not first and Timed.per_token:
                first.append(Timed.per_token[0])
            n = len(c.generated_tokens)
            per = c.decode_seconds / max(1, n - 1)
            if best is None or per < best[0]:
                best = (per, n, Timed.per_token, c)
        return best

    schema_run = run(SamplingParams(temperature=0, max_tokens=args.tokens, response_format=rf))
    n = schema_run[1]
    free_run = run(SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    print(json.dumps({
        "model": args.model, "nthreads": args.nthreads, "tokens": n,
        "ll_tokenizer_build_s": round(build, 3), "schema_compile_ms": round(compile_s * 1e3, 2),
        "ms_per_token_free": round(free_run[0] * 1e3, 3),
        "ms_per_token_schema": round(schema_run[0] * 1e3, 3),
        "grammar_ms_per_token_mean": round(float(np.mean(schema_run[2])) * 1e3, 4),
        "grammar_ms_per_token_p50": round(float(np.median(schema_run[2])) * 1e3, 4),
        "grammar_ms_first_run_first_token": round(first[0] * 1e3, 3),
        "finish": schema_run[3].finish_reason, "text": schema_run[3].text}, ensure_ascii=False))


if __name__ == "__main__":
    main()

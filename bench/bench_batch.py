"""`batch` throughput at several --max-batch, and the cost of resuming a big output.

    python bench/bench_batch.py [--model smollm2-135m] [--ranks 2] [--max-batch 1,4,16,32]
        [--steps 64] [--requests 0] [--nthreads 0] [--resume-lines 100000]

For each --max-batch: the batch command under `mpiexec -n RANKS` on a generated prompts file
(--requests prompts, default max(16, 2 x max-batch)), each generating --steps tokens (greedy,
--ignore-eos); prints the aggregate tokens/s of its summary (generated tokens / wall time of
the run, prefill included; model loading excluded). Then the resume overhead: the time to
scan a --resume-lines output (records shaped like real chat answers) for the custom_ids it
holds, and to read a --resume-lines OpenAI input skipping every line already done.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from dllama_mpi.apps import batch_io, batch_records  # noqa: E402

TOPICS = ["the water cycle", "compilers", "the printing press", "vaccines", "hash tables",
          "plate tectonics", "photosynthesis", "the french revolution"]


def write_prompts(path: str, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {"messages": [{"role": "user", "content":
                    f"Request {i}: explain {TOPICS[i % len(TOPICS)]} in a few sentences."}]}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")


def run_batch(args, folder: str, max_batch: int) -> dict:
    n = args.requests or max(16, 2 * max_batch)
    inp = os.path.join(folder, f"in-{max_batch}.jsonl")
    out = os.path.join(folder, f"out-{max_batch}.jsonl")
    write_prompts(inp, n)
    cmd = [sys.executable, "-m", "dllama_mpi", "batch", "--model", args.model, "--input", inp,
           "--output", out, "--max-batch", str(max_batch), "--steps", str(args.steps),
           "--ignore-eos", "--temperature", "0", "--quiet"]
    if args.nthreads:
        cmd += ["--nthreads", str(args.nthreads)]
    if args.ranks > 1:
        cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(args.ranks)] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
    if p.returncode != 0:
        raise SystemExit(f"batch failed ({p.returncode}):\n{p.stderr}")
    m = re.search(r"generated (\d+) tokens in ([\d.]+) s: ([\d.]+) tok/s aggregate", p.stderr)
    return dict(max_batch=max_batch, requests=n, tokens=int(m.group(1)),
                seconds=float(m.group(2)), tok_s=float(m.group(3)))


def resume_cost(folder: str, lines: int) -> dict:
    out, inp = os.path.join(folder, "big-out.jsonl"), os.path.join(folder, "big-in.jsonl")
    text = "The water cycle moves water between the sea, the air and the land. " * 4
    with open(out, "wb") as f:
        for i in range(lines):
            body = {"id": f"chatcmpl-{i:024x}", "object": "chat.completion",
                    "created": 1760000000, "model": "smollm2-135m", "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                         "refusal": None},
                                 "logprobs": None, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 64, "total_tokens": 104,
                              "prompt_tokens_details": {"cached_tokens": 0}}}
            f.write(batch_records.encode_record(batch_records.ok_record(f"req-{i}", body)))
    write_prompts(inp, lines)
    size = os.path.getsize(out)
    t = time.perf_counter()
    done = batch_records.scan_records(out)
    scan = time.perf_counter() - t
    assert done.records == lines
    t = time.perf_counter()
    skipped = 0
    for item in batch_io.read_items(inp, "openai"):
        skipped += done.has(item.custom_id, 0)
    skip = time.perf_counter() - t
    assert skipped == lines
    return dict(lines=lines, mb=size / 2**20, scan=scan, skip=skip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-batch", default="1,4,16,32")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--nthreads", type=int, default=0)
    ap.add_argument("--resume-lines", type=int, default=100_000)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        print(f"batch on {args.model}, {args.ranks} ranks, {args.steps} tokens a request, "
              f"greedy, --ignore-eos", flush=True)
        print(f"{'max-batch':>9} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8}",
              flush=True)
        for mb in [int(x) for x in args.max_batch.split(",") if x]:
            r = run_batch(args, folder, mb)
            print(f"{r['max_batch']:>9} {r['requests']:>8} {r['tokens']:>7} "
                  f"{r['seconds']:>8.2f} {r['tok_s']:>8.1f}", flush=True)
        if args.resume_lines:
            r = resume_cost(folder, args.resume_lines)
            print(f"resume: scan of a {r['lines']}-record output ({r['mb']:.0f} MB): "
                  f"{r['scan']:.2f} s; reading a {r['lines']}-line input, all done: "
                  f"{r['skip']:.2f} s", flush=True)


if __name__ == "__main__":
    main()

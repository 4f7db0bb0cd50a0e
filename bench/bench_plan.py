"""`plan` against reality (run by hand; never part of the tests).

    python bench/bench_plan.py [--repeats 3] [--steps 64] [--models smollm2,synthetic]
                               [--ranks 1,2] [--out bench/results/plan-<time>.json]
    mpiexec -n R python bench/bench_plan.py --worker --model M [...]   (one measured run)

For each model and rank count (1 thread per rank: this machine has 2 cores) it measures a
run — memory per rank after start-up (the process's resident memory without the pages of
the model file it maps), decode tok/s (a 20-token prompt, then `--steps` tokens), prompt
tok/s (one 128-row forward), sync ms and bytes per token — and prints it beside what
`plan` predicts for the same run: the same model file and types, the read bandwidth probed
in the same invocation (1 rank: one core's; 2 ranks on this node: the node's, shared), the
`shm` link (ranks of one node), context = prompt + steps / 2.

The compute model's constants (predict.Machine) were calibrated on this machine from the
1-rank runs (the stream fraction, the per-layer and per-token costs, prompt ops/s); the
2-rank rows test the split, the reductions and the link model. Every run's JSON is written
under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

MiB = 2**20


# -- the measured run (under mpiexec) -----------------------------------------------------

def process_memory(model_path: str | None) -> dict:
    """This process's resident memory (kB fields of /proc/self/status) and the resident
    pages of the model file's mappings (page cache, shared by a node's ranks)."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(rest.split()[0]) * 1024
    mapped = 0
    if model_path:
        real = os.path.realpath(model_path)
        current = None
        with open("/proc/self/smaps") as f:
            for line in f:
                parts = line.split()
                if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                    current = parts[5] if len(parts) >= 6 else None
                elif parts[0] == "Rss:" and current == real:
                    mapped += int(parts[1]) * 1024
    status["model_file_rss"] = mapped
    status["held"] = status["VmRSS"] - mapped
    return status


def worker(args) -> None:
    import numpy as np

    from dllama_mpi import registry
    from dllama_mpi.apps.inference import decode_averages
    from dllama_mpi.comm import make_comm
    from dllama_mpi.config import RunConfig
    from dllama_mpi.runtime.generation import generate
    from dllama_mpi.runtime.startup import start

    comm = make_comm()
    path = registry.resolve(args.model) if comm.is_root else None
    path = comm.bcast_obj(path)
    before = process_memory(None)
    run = RunConfig(weights_float_type=args.weights_float_type,
                    buffer_float_type=args.buffer_float_type, nthreads=args.nthreads,
                    max_seq_len=max(args.prompt_tokens + args.steps, args.prefill) + 8,
                    prefill_chunk=args.prefill, load=args.load)
    s = start(comm, path, run, want_tokenizer=False)
    after = process_memory(path)
    memory = comm.allgather_obj(dict(before=before, after=after))
    row_bytes = s.engine.embedding.empty(1).nbytes
    if not comm.is_root:
        s.engine.run_worker_loop()
        s.engine.gather_step_stats()
        return
    rng = np.random.default_rng(0)
    finite, top = [True], []

    def greedy(logits) -> int:
        finite[0] = finite[0] and bool(np.isfinite(logits).all())
        if not top:                  # the prompt's next-token ranking: ten likeliest ids
            top.extend(int(i) for i in np.argsort(-logits, kind="stable")[:10])
        return int(np.argmax(logits))

    s.engine.forward(rng.integers(3, s.config.vocab_size, 2).tolist(), 0)     # warm-up
    prompt = rng.integers(3, s.config.vocab_size, args.prompt_tokens).tolist()
    g = generate(s.engine, prompt, args.steps, greedy, set(), s.max_seq_len, run.prefill_chunk)
    n_decode = len(s.engine.steps)
    long = rng.integers(3, s.config.vocab_size, args.prefill).tolist()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        s.engine.forward(long, 0)
        times.append(time.perf_counter() - t0)
    s.engine.stop()
    steps = s.engine.gather_step_stats()
    per_rank = [decode_averages(st[1:n_decode]) for st in steps]
    print(json.dumps({
        "model": path, "ranks": comm.size, "nthreads": s.nthreads,
        "weights": s.run.weights_float_type, "output": s.run.output_float_type,
        "wire": s.run.buffer_float_type, "max_seq_len": s.max_seq_len,
        "prompt_tokens": len(prompt), "steps": args.steps,
        "decode_tok_s": g.decode_tokens_per_s, "prefill_tokens": args.prefill,
        "prefill_tok_s": args.prefill / statistics.median(times),
        "generated": len(g.generated_tokens), "generated_tokens": g.generated_tokens,
        "finite": finite[0], "top10": top, "row_bytes": row_bytes,
        "memory_predicted": [dict(weights=m.weights, kv_cache=m.kv_cache, buffers=m.buffers)
                             for m in s.memory],
        "memory_measured": memory, "per_rank": per_rank}), flush=True)


def worker_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nthreads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--weights-float-type", default="auto")
    ap.add_argument("--buffer-float-type", default="auto")
    ap.add_argument("--load", default="auto")


def run_worker(model: str, ranks: int, extra=(), launcher=None, timeout=3600) -> dict:
    """One measured run under mpiexec (or `launcher`: a command prefix that starts
    `ranks` ranks of the given command)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, *extra]
    if launcher is None:
        launcher = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks)]
    p = subprocess.run([*launcher, *cmd], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(launcher + cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- prediction ---------------------------------------------------------------------------

def predicted(r: dict, read_bw: float, link=None, ranks_per_node: int | None = None,
              cores: int | None = None) -> dict:
    """plan's figures for the run r (a worker's JSON) on this machine."""
    from dllama_mpi import predict
    from dllama_mpi.config import RunConfig
    from dllama_mpi.formats import open_model
    model = open_model(r["model"])
    config = model.config
    model.close()
    run = RunConfig(weights_float_type=r["weights"], output_float_type=r["output"],
                    buffer_float_type=r["wire"], max_seq_len=r["max_seq_len"],
                    prefill_chunk=r["prefill_tokens"])
    rpn = r["ranks"] if ranks_per_node is None else ranks_per_node
    machine = predict.Machine(read_bw=read_bw, ranks_per_node=rpn,
                              cores=cores or rpn * r["nthreads"])
    p = predict.make_plan(config, run, r["ranks"], link or predict.LINKS["shm"], machine,
                          r["row_bytes"], context=r["prompt_tokens"] + r["steps"] // 2,
                          prompt=r["prefill_tokens"])
    return dict(rank_bytes=p.rank_bytes, decode_tok_s=p.decode.tok_s,
                decode_network_ms=1e3 * p.decode.network_s, decode_sync_ms=1e3 * p.decode.sync_s,
                decode_compute_ms=1e3 * p.decode.compute_s,
                decode_latency_ms=1e3 * (p.decode.latency_s + p.decode.wait_s),
                prefill_tok_s=p.prefill.tok_s,
                sent=[t.sent for t in p.traffic], weights=[m.weights for m in p.memory])


def err(pred: float, meas: float) -> str:
    return f"{(pred / meas - 1) * 100:+.0f}%" if meas else "—"


def table(rows) -> str:
    """rows: (name, worker JSON, prediction)."""
    lines = ["| model | ranks × threads | memory/rank predicted | measured | error | "
             "decode tok/s predicted | measured | error | sync ms/token predicted | measured "
             "(rank 0) | prompt tok/s predicted | measured | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r, p in rows:
        held = max(m["after"]["held"] for m in r["memory_measured"])
        pmem = max(p["rank_bytes"])
        sync = r["per_rank"][0]["sync_ms"]
        lines.append(
            f"| {name} | {r['ranks']} × {r['nthreads']} | {pmem / MiB:.0f} MiB | "
            f"{held / MiB:.0f} MiB | {err(pmem, held)} | {p['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s']:.1f} | {err(p['decode_tok_s'], r['decode_tok_s'])} | "
            f"{p['decode_sync_ms']:.2f} | {sync:.2f} | {p['prefill_tok_s']:.1f} | "
            f"{r['prefill_tok_s']:.1f} | {err(p['prefill_tok_s'], r['prefill_tok_s'])} |")
    return "\n".join(lines)


def bandwidth() -> tuple[float, float]:
    from dllama_mpi.apps.probe import read_bandwidth
    return read_bandwidth(1 << 30, 4, threads=1), read_bandwidth(1 << 30, 4, threads=2)


def models(names) -> dict:
    from dllama_mpi.registry import pull
    out = {}
    for name in names:
        if name == "smollm2":
            out[name] = pull("smollm2-135m")
        elif name == "synthetic":
            path = os.path.join(HERE, "results", "synthetic-1.1b-q4_0.gguf")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic.py"), path],
                           check=True)
            out[name] = path
        else:
            out[name] = name
    return out


def median_run(model, ranks, repeats, extra=()) -> dict:
    runs = [run_worker(model, ranks, extra) for _ in range(repeats)]
    out = dict(runs[0])
    for key in ("decode_tok_s", "prefill_tok_s"):
        out[key] = statistics.median(r[key] for r in runs)
        out["all_" + key] = [r[key] for r in runs]
    out["per_rank"] = [dict(rank, sync_ms=statistics.median(r["per_rank"][i]["sync_ms"]
                                                            for r in runs))
                       for i, rank in enumerate(runs[0]["per_rank"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="smollm2,synthetic")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--from-json", default=None, help="print the table of an earlier run")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.from_json:
        with open(args.from_json) as f:
            d = json.load(f)
        print(table([(n, r, p) for n, r, p in d["rows"]]))
        return
    extra = ["--steps", str(args.steps), "--prompt-tokens", str(args.prompt_tokens),
             "--prefill", str(args.prefill)]
    paths = models(args.models.split(","))
    bw_before = bandwidth()
    measured = []
    for name, path in paths.items():
        for ranks in [int(x) for x in args.ranks.split(",")]:
            measured.append((name, median_run(path, ranks, args.repeats, extra)))
    bw_after = bandwidth()
    bw1, bw2 = max(bw_before[0], bw_after[0]), max(bw_before[1], bw_after[1])
    rows = [(name, r, predicted(r, bw1 if r["ranks"] == 1 else bw2)) for name, r in measured]
    print(f"read bandwidth (probe): {bw1 / 1e9:.1f} GB/s on 1 core, {bw2 / 1e9:.1f} on 2 "
          f"(before {bw_before[0] / 1e9:.1f}/{bw_before[1] / 1e9:.1f}, after "
          f"{bw_after[0] / 1e9:.1f}/{bw_after[1] / 1e9:.1f})\n")
    print(table(rows))
    out = os.path.join(HERE, "results", time.strftime("plan-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump({"bandwidth": [bw1, bw2], "rows": rows}, f, indent=1)
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()

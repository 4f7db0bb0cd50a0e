"""The benchmark table (run by hand; never part of the tests).

    python bench/run_bench.py [--repeats 3] [--steps 64] [--quick] [--sweep]
    python bench/run_bench.py --from-json bench/results/bench-<time>.json

Makes the synthetic 1.1B Llama (bench/make_synthetic.py) if needed, pulls SmolLM2, then for
each workload runs bench/bench_decode.py under mpiexec several times and takes medians.
Workloads: decode of one sequence, a 128-token prompt, and 16 sequences decoding together
(aggregate tok/s).  --sweep adds decode at 1..4 ranks and batches of 1, 4, 16 for the plot.
The read-bandwidth roofline is probed in the same invocation (before and after; the best
is used). Prints a markdown table of our figures (peers are compared in the same sitting by
bench/side_by_side.py, never from a figure of another day), writes
bench/results/bench-<time>.json and, when matplotlib is
installed (pip install -e '.[bench]'), bench/results/bench-<time>.png: tok/s against ranks
and against batch size.
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

def bandwidth() -> tuple[float, float]:
    """(1-thread, 2-thread) read GB/s: a vectorised numba sum over 1 GB of uint64."""
    from bench_kernels import probe
    return probe(1 << 30, 1, 4), probe(1 << 30, 2, 4)


def one_run(model: str, ranks: int, threads: int, steps: int, prompt: int,
            parallel: int = 1) -> dict:
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable,
           os.path.join(HERE, "bench_decode.py"), "--model", model, "--nthreads", str(threads),
           "--steps", str(steps), "--prompt-tokens", str(prompt), "--parallel", str(parallel)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def median_run(model, ranks, threads, steps, prompt, repeats, parallel=1) -> dict:
    runs = [one_run(model, ranks, threads, steps, prompt, parallel) for _ in range(repeats)]
    out = dict(runs[0])
    out["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in runs)
    out["prompt_tok_s"] = statistics.median(r["prompt_tok_s"] for r in runs)
    out["all_decode_tok_s"] = [r["decode_tok_s"] for r in runs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, one repeat")
    ap.add_argument("--sweep", action="store_true",
                    help="also decode at 1..4 ranks and batches of 1, 4, 16 (for the plot)")
    ap.add_argument("--from-json", metavar="RESULTS.json",
                    help="print the table and redraw the plot of an earlier run")
    args = ap.parse_args()
    if args.from_json:
        from_json(args.from_json)
        return
    from dllama_mpi.registry import pull
    models = {"smollm2": pull("smollm2-135m")}
    if not args.quick:
        synth = os.path.join(HERE, "results", "synthetic-1.1b-q4_0.gguf")
        os.makedirs(os.path.dirname(synth), exist_ok=True)
        subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic.py"), synth], check=True)
        models["synthetic"] = synth
    repeats = 1 if args.quick else args.repeats
    bw_before = bandwidth()
    rows = []
    for name, path in models.items():
        for ranks, threads in ((1, 1), (1, 2), (2, 1)):
            r = median_run(path, ranks, threads, args.steps, 20, repeats)
            rows.append((name, ranks, threads, "decode", r))
        r = median_run(path, 1, 1, 1, 128, repeats)
        rows.append((name, 1, 1, "prompt", r))
        for threads in ((1, 2) if name == "synthetic" else (1,)):
            r = median_run(path, 1, threads, args.steps, 20, repeats, parallel=16)
            rows.append((name, 1, threads, "batch16", r))
    sweep = []
    if args.sweep:
        for name, path in models.items():
            for ranks in (1, 2, 3, 4):
                sweep.append((name, ranks, 1, 1, median_run(path, ranks, 1, args.steps, 20, repeats)))
            for parallel in (4, 16):
                sweep.append((name, 1, 1, parallel,
                              median_run(path, 1, 1, args.steps, 20, repeats, parallel)))
    bw_after = bandwidth()
    bw1, bw2 = max(bw_before[0], bw_after[0]), max(bw_before[1], bw_after[1])
    table = make_table(rows, bw1, bw2, f" (before {bw_before[0]:.1f}/{bw_before[1]:.1f}, after "
                                       f"{bw_after[0]:.1f}/{bw_after[1]:.1f})")
    print(table)
    out = os.path.join(HERE, "results", time.strftime("bench-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"bandwidth_gb_s": [bw1, bw2], "rows": [
            dict(r, workload_model=n, kind=k) for n, a, b, k, r in rows],
            "sweep": [dict(r, workload_model=n) for n, _, _, _, r in sweep],
            "table": table}, f, indent=1)
    print(f"\nwritten {out}")
    plot(rows, sweep, out[:-len(".json")] + ".png")


def make_table(rows, bw1: float, bw2: float, note: str = "") -> str:
    """The markdown table; rows: (model, ranks, threads, kind, bench_decode result)."""
    lines = [f"read bandwidth (numba probe): {bw1:.1f} GB/s on 1 core, {bw2:.1f} GB/s on 2{note}",
             "", "| model | ranks × threads | workload | tok/s | roofline tok/s | fraction | "
             "sync ms/token | kB sent/token (rank 0) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ranks, threads, kind, r in rows:
        bw = bw1 if ranks * threads == 1 else bw2
        roof = bw * 1e9 / r["weight_bytes_per_token"]
        tok = r["prompt_tok_s"] if kind == "prompt" else r["decode_tok_s"]
        frac = f"{tok / roof:.0%}" if kind == "decode" else "compute-bound"
        roof_s = f"{roof:.1f}" if kind == "decode" else "—"
        pr = r["per_rank"][0]
        label = {"decode": "decode", "batch16": "16 sequences, aggregate"}.get(
            kind, f"prompt ({r['prompt_tokens']} tokens)")
        lines.append(f"| {name} | {ranks} × {threads} | {label} | {tok:.1f} | {roof_s} | {frac} | "
                     f"{pr['sync_ms']:.2f} | {pr['bytes_sent'] / 1e3:.1f} |")
    return "\n".join(lines)


def from_json(path: str) -> None:
    """Print the table (and redraw the plot) of an earlier run."""
    with open(path) as f:
        d = json.load(f)
    rows = [(r["workload_model"], r["ranks"], r["nthreads"], r["kind"], r) for r in d["rows"]]
    sweep = [(r["workload_model"], r["ranks"], r["nthreads"], r["parallel"], r) for r in d["sweep"]]
    print(make_table(rows, *d["bandwidth_gb_s"]))
    plot(rows, sweep, path[:-len(".json")] + ".png")


def plot(rows, sweep, path: str) -> None:
    """tok/s against ranks (1 thread each) and against sequences decoding together."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({n for n, *_ in rows}):
        by_ranks = {k: r["decode_tok_s"] for n, k, t, p, r in sweep if n == name and p == 1}
        by_ranks.update({k: r["decode_tok_s"] for n, k, t, kind, r in rows
                         if n == name and kind == "decode" and t == 1 and k not in by_ranks})
        by_batch = {p: r["decode_tok_s"] for n, k, t, p, r in sweep if n == name and k == 1 and t == 1}
        by_batch.update({16 if kind == "batch16" else 1: r["decode_tok_s"] for n, k, t, kind, r in rows
                         if n == name and k == 1 and t == 1 and kind in ("decode", "batch16")})
        for ax, pts in ((a1, by_ranks), (a2, by_batch)):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    a1.set(xlabel="ranks (1 thread each; >2 oversubscribe this 2-core machine)",
           ylabel="decode tok/s", title="one sequence")
    a2.set(xlabel="sequences decoding together (1 rank, 1 thread)", ylabel="aggregate tok/s",
           title="batched decode", xscale="log", xticks=[1, 4, 16], xticklabels=["1", "4", "16"])
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"written {path}")


if __name__ == "__main__":
    main()

"""Side by side with llama.cpp, in one sitting: ours and theirs interleaved on the same files.

    python bench/side_by_side.py --llama-cpp /tmp/peers/llama.cpp/build/bin \\
        [--models smollm2 synthetic synthetic-q4_k_m synthetic-moe] [--threads 1 2] [--rounds 3] \\
        [--workloads prompt batch16 decode] [--no-check] [--dllama PATH/dllama]
    python bench/side_by_side.py --llama-cpp DIR --workloads batch1 batch4 batch16 batch32 \
        --threads 2 --rounds 2            # the batch sweep

llama.cpp is built by hand from its public source in a folder outside this repository (the
README's Speed section says how); this script only runs its binaries. For every (model,
workload, threads) it runs ours and theirs in turn, A B in odd rounds and B A in even ones,
so a drift of the machine weighs on both alike, and reports the medians and their ratio.

Workloads (the same token counts on both sides):
  prompt   one 128-token prompt          ours: bench_decode.py --prompt-tokens 128 --steps 1
                                         theirs: llama-bench -p 128 -n 0 (prompt tok/s)
  batchN   N sequences decoding together, 20-token prompts, 64 tokens each (aggregate decode
           tok/s, prefill excluded)      ours: bench_decode.py --parallel N
                                         theirs: llama-batched-bench -npp 20 -ntg 64 -npl N (S_TG)
  decode   one sequence, 64 tokens       ours: bench_decode.py --prompt-tokens 20 --steps 64
                                         theirs: llama-bench -p 0 -n 64 (tg64)
Ours runs as one rank (`mpiexec -n 1`) with --nthreads T; theirs with -t T.

--dllama adds Distributed Llama (its `dllama inference`, one process, --nthreads T, the Q80
wire) to the prompt and decode rows, third in each round: its prompt tok/s is its
"Evaluation" figure for a prompt of ~130 tokens, its decode tok/s its "Prediction" figure of
64 tokens after a 20-token prompt. It reads only its own .m files: the GGUF is converted with
`python -m dllama_mpi convert --to dllama --weights-float-type q40` (a Q4_0 file exactly;
SmolLM2's Q4_1 is requantised to Q4_0, the only 4-bit type it has) into bench/results/.

A peer's speed counts only when its answers check out: unless --no-check, the same sitting
first computes SmolLM2's perplexity on the same text with llama.cpp's `llama-perplexity`
(non-overlapping windows of 512 tokens, the second half of each scored) and with ours
(windows of 512 every 256 tokens: every token scored once with at least 256 tokens of
context). The token sets differ, so the two differ by a few percent; a broken peer is off by
multiples (an AMX build of this llama.cpp tree gave 337 against 22 on an Intel Xeon). A
peer more than 25% off ours is marked BROKEN in the table's header: its rows are no bar.

Prints a markdown table (with the CPU model and its vector flags, the load average before
and after) and writes bench/results/side-by-side-<time>.json with every run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

WORKLOADS = ("prompt", "batch16", "decode")


def label(workload: str) -> str:
    if workload.startswith("batch"):
        n = int(workload[5:])
        return "1 sequence (decode)" if n == 1 else f"{n} sequences decoding together (aggregate)"
    return {"prompt": "prompt 128", "decode": "decode"}[workload]


def workload_arg(text: str) -> str:
    if text in ("prompt", "decode") or (text.startswith("batch") and text[5:].isdigit()
                                        and int(text[5:]) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"prompt, decode or batchN (N >= 1), got {text!r}")
FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
         "amx_int8")
TEXT = os.path.join(ROOT, "data", "texts", "us-public-domain.txt")


def cpu() -> tuple[str, list[str]]:
    model, flags = "?", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in FLAGS if x in have]
    except OSError:
        pass
    return model, flags


def model_path(name: str) -> str:
    if name == "smollm2":
        from dllama_mpi.registry import pull
        return pull("smollm2-135m")
    if name.startswith("synthetic"):
        # synthetic (the 1.1B, Q4_0), synthetic-TYPE (e.g. synthetic-q4_k_m), synthetic-moe
        preset, kind = ("synthetic-moe", "q4_0") if name == "synthetic-moe" else (
            "synthetic-1.1b", name.partition("-")[2] or "q4_0")
        path = os.path.join(HERE, "results", f"{preset}-{kind}.gguf")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic.py"), path,
                            "--preset", preset, "--type", kind], check=True)
        return path
    return name                                  # a GGUF path


def _run(cmd: list[str], timeout: float = 1800) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


WEIGHT_BYTES: dict[str, int] = {}      # model -> weight bytes a decode token reads (ours)


def ours(model: str, workload: str, threads: int) -> float:
    if workload.startswith("batch"):
        args = ["--prompt-tokens", "20", "--steps", "64", "--parallel", workload[5:]]
    else:
        args = {"prompt": ["--prompt-tokens", "128", "--steps", "1"],
                "decode": ["--prompt-tokens", "20", "--steps", "64"]}[workload]
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", "1", sys.executable,
           os.path.join(HERE, "bench_decode.py"), "--model", model, "--nthreads", str(threads),
           *args]
    r = json.loads(_run(cmd).strip().splitlines()[-1])
    WEIGHT_BYTES[model] = r["weight_bytes_per_token"]
    return r["prompt_tok_s"] if workload == "prompt" else r["decode_tok_s"]


def read_bandwidth() -> dict[int, float]:
    """threads -> GB/s read by a vectorised numba sum over 1 GB (bench_kernels.probe), in a
    fresh process so its threads do not linger in this one."""
    code = ("import json, sys; sys.path.insert(0, %r); from bench_kernels import probe; "
            "print(json.dumps({t: probe(1 << 30, t, 4) for t in (1, 2)}))" % HERE)
    return {int(k): v for k, v in json.loads(_run([sys.executable, "-c", code])).items()}


def theirs(bin_dir: str, model: str, workload: str, threads: int) -> float:
    if workload.startswith("batch"):
        n = int(workload[5:])
        cmd = [os.path.join(bin_dir, "llama-batched-bench"), "-m", model,
               "-c", str(max(2048, n * 96)), "-b", "2048", "-ub", "512", "-npp", "20",
               "-ntg", "64", "-npl", str(n),
               "-t", str(threads), "--output-format", "jsonl"]
        for line in _run(cmd).splitlines():
            if line.startswith("{"):
                return float(json.loads(line)["speed_tg"])
        raise SystemExit(f"error: no result line from {' '.join(cmd)}")
    pn = ["-p", "128", "-n", "0"] if workload == "prompt" else ["-p", "0", "-n", "64"]
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", model, *pn, "-t", str(threads),
           "-r", "1", "-o", "json"]
    return float(json.loads(_run(cmd))[0]["avg_ts"])


def dllama_files(model: str) -> tuple[str, str]:
    """Distributed Llama's .m and .t of a GGUF (converted once into bench/results/)."""
    stem = os.path.splitext(os.path.basename(model))[0]
    m = os.path.join(HERE, "results", f"{stem}-q40.m")
    if not os.path.exists(m):
        _run([sys.executable, "-m", "dllama_mpi", "convert", model, "--to", "dllama", "-o", m,
              "--weights-float-type", "q40", "--no-progress"])
    return m, m[:-2] + ".t"


def dllama(binary: str, model: str, workload: str, threads: int) -> float:
    m, t = dllama_files(model)
    # its tokenizer splits these prompts into about one token per character: 22 "hello"s
    # are ~130 tokens, the second prompt ~20
    prompt, steps = (("hello " * 22).strip(), 140) if workload == "prompt" else \
        ("Tell me a good story.", 84)
    out = _run([binary, "inference", "--model", m, "--tokenizer", t, "--buffer-float-type",
                "q80", "--prompt", prompt, "--steps", str(steps), "--nthreads", str(threads),
                "--max-seq-len", "256", "--temperature", "0"])
    part = out.split("Evaluation" if workload == "prompt" else "Prediction", 1)[1]
    return float(re.search(r"tokens/s: ([0-9.]+)", part).group(1))


def check_peer(bin_dir: str, model: str, threads: int) -> tuple[float, float]:
    """(llama.cpp's perplexity, ours) of SmolLM2 over TEXT (see the module docstring)."""
    out = subprocess.run([os.path.join(bin_dir, "llama-perplexity"), "-m", model, "-f", TEXT,
                          "-c", "512", "-b", "512", "-t", str(threads)],
                         capture_output=True, text=True, timeout=1800)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode != 0 or not m:
        raise SystemExit(f"error: llama-perplexity failed:\n{(out.stdout + out.stderr)[-2000:]}")
    mine = json.loads(_run([sys.executable, "-m", "dllama_mpi", "perplexity", "--model", model,
                            "--text", TEXT, "--ctx", "512", "--stride", "256",
                            "--nthreads", str(threads), "--json"]))
    return float(m.group(1)), float(mine["perplexity"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, metavar="BIN_DIR",
                    help="the folder of llama.cpp's llama-bench, llama-batched-bench, "
                    "llama-perplexity")
    ap.add_argument("--models", nargs="+", default=["smollm2", "synthetic"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", type=workload_arg, default=list(WORKLOADS),
                    help="prompt, decode, batchN (default: prompt batch16 decode)")
    ap.add_argument("--no-check", action="store_true", help="skip the perplexity check")
    ap.add_argument("--dllama", metavar="PATH", default=None,
                    help="Distributed Llama's dllama binary: a third column (prompt, decode)")
    args = ap.parse_args()
    for tool in ("llama-bench", "llama-batched-bench"):
        if not os.access(os.path.join(args.llama_cpp, tool), os.X_OK):
            raise SystemExit(f"error: no {tool} in {args.llama_cpp}")
    models = {name: model_path(name) for name in args.models}
    cpu_model, flags = cpu()
    load0 = os.getloadavg()
    bw = read_bandwidth()
    check = None
    if not args.no_check and "smollm2" in models:
        check = check_peer(args.llama_cpp, models["smollm2"], max(args.threads))
        print(f"perplexity check (SmolLM2): llama.cpp "
              f"{check[0]:.3f}, ours {check[1]:.3f}", file=sys.stderr)
    cases = [(m, w, t) for m in models for w in args.workloads for t in args.threads]
    runs: dict[tuple, dict[str, list[float]]] = {
        c: {"ours": [], "llama.cpp": [], "Distributed Llama": []} for c in cases}
    for rnd in range(args.rounds):
        for case in cases:
            name, workload, threads = case
            order = ("ours", "llama.cpp") if rnd % 2 == 0 else ("llama.cpp", "ours")
            if args.dllama and not workload.startswith("batch"):
                order += ("Distributed Llama",)
            for who in order:
                if who == "ours":
                    tok = ours(models[name], workload, threads)
                elif who == "llama.cpp":
                    tok = theirs(args.llama_cpp, models[name], workload, threads)
                else:
                    tok = dllama(args.dllama, models[name], workload, threads)
                runs[case][who].append(tok)
                print(f"round {rnd + 1}: {name} {workload} {threads}t {who}: {tok:.1f} tok/s",
                      file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    bw_after = read_bandwidth()
    bw = {t: max(bw[t], bw_after[t]) for t in bw}
    broken = check is not None and abs(check[0] / check[1] - 1) > 0.25
    lines = [f"CPU: {cpu_model} ({', '.join(flags)}); {os.cpu_count()} CPUs; load average "
             f"{load0[0]:.2f} before, {load1[0]:.2f} after; {args.rounds} interleaved rounds, "
             f"medians in tok/s",
             ("peer check: not run" if check is None else
              f"peer check: SmolLM2 perplexity llama.cpp {check[0]:.2f}, ours {check[1]:.2f}"
              + (" — llama.cpp BROKEN on this CPU: its rows are not a bar" if broken else
                 " (agree within 25%)")),
             f"read bandwidth (numba probe, best of before and after): {bw[1]:.1f} GB/s on 1 "
             f"thread, {bw[2]:.1f} on 2; a decode row's roofline = bandwidth / the weight "
             f"bytes a token reads",
             "", "| model | workload | threads | dllama_mpi | of roofline | llama.cpp | ratio | "
             "Distributed Llama | ratio | runs (ours; llama.cpp) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for (name, workload, threads), r in runs.items():
        a, b = statistics.median(r["ours"]), statistics.median(r["llama.cpp"])
        c = statistics.median(r["Distributed Llama"]) if r["Distributed Llama"] else None
        rows.append(dict(model=name, workload=workload, threads=threads, ours=r["ours"],
                         llama_cpp=r["llama.cpp"], dllama=r["Distributed Llama"],
                         ours_median=a, llama_cpp_median=b, dllama_median=c))
        dl = f"{c:.1f} | {a / c:.2f}" if c else "— | —"
        roof = "—"
        if workload == "decode" and models[name] in WEIGHT_BYTES:
            roof = f"{a * WEIGHT_BYTES[models[name]] / (bw[min(threads, 2)] * 1e9):.0%}"
        lines.append(f"| {name} | {label(workload)} | {threads} | {a:.1f} | {roof} | {b:.1f} | "
                     f"{a / b:.2f} | {dl} | {', '.join(f'{x:.1f}' for x in r['ours'])}; "
                     f"{', '.join(f'{x:.1f}' for x in r['llama.cpp'])} |")
    for name in models:
        for workload in args.workloads:
            if {1, 2} <= set(args.threads):
                one = statistics.median(runs[(name, workload, 1)]["ours"])
                two = statistics.median(runs[(name, workload, 2)]["ours"])
                p1 = statistics.median(runs[(name, workload, 1)]["llama.cpp"])
                p2 = statistics.median(runs[(name, workload, 2)]["llama.cpp"])
                lines.append(f"\n{name} {workload}: 2 threads / 1 thread = {two / one:.2f} "
                             f"(llama.cpp {p2 / p1:.2f})")
    table = "\n".join(lines)
    print(table)
    out = os.path.join(HERE, "results", time.strftime("side-by-side-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(cpu=cpu_model, flags=flags, load=[load0, load1], check=check,
                       read_bandwidth_gb_s=bw, weight_bytes_per_token=WEIGHT_BYTES,
                       models=models, rows=rows, table=table), f, indent=1)
    print(f"\nwritten {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load time and peak memory per rank, scatter against direct loading.

    python bench/bench_load.py [--models smollm2 smollm2-h5 synthetic] [--ranks 1 2 3 4]
                               [--modes scatter direct]
        launches `mpiexec -n N python bench/bench_load.py --worker ...` for every model, rank
        count and load mode; prints a table and writes bench/results/load-<time>.json
    mpiexec -n N python bench/bench_load.py --worker --model PATH --load scatter|direct
        one measured start-up; rank 0 prints one JSON line with every rank's figures

Models: smollm2 — the SmolLM2-135M GGUF (tests/tiny.py smollm2_path()); smollm2-h5 — its
conversion to our HDF5 store (q40, written to bench/results/ once); synthetic — the random
1.1B Q4_0 Llama bench/results/synthetic-1.1b-q4_0.gguf (bench/make_synthetic.py, once).

What a rank measures, in the order session.start() does it (kernels are compiled or loaded
from numba's cache first, outside the measurement):
  open_s    the root opens and checks the model, the config is broadcast, and in direct mode
            every other rank opens the file too
  load_s    loading.load_shard() on this rank: the root reads, converts and sends every
            slice (scatter) or every rank reads its own (direct); a scatter worker's time is
            mostly waiting for the root
  shard     bytes of this rank's weights (ShardWeights.nbytes)
  base      VmRSS before opening (interpreter, numpy, numba, compiled kernels)
  peak      VmHWM from opening to the end of loading (the high-water mark is reset first by
            writing 5 to /proc/self/clear_refs): anonymous memory and the pages of
            memory-mapped model files this rank touched
  held      RssAnon after loading minus before, once session.start's clean-up is done
            (direct workers close the model; malloc_trim): the memory this rank keeps
  mapped    RssFile after loading minus before: pages of the model file this rank touched
            (page cache, shared by every rank of the node, dropped under pressure)
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
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)

MIB = 2 ** 20


# ----------------------------------------------------------------------------- one rank

def _status() -> dict[str, int]:
    """Bytes of VmRSS, VmHWM, RssAnon, RssFile from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(model_arg: str, load: str) -> None:
    import time as _time

    from dllama_mpi import kernels
    from dllama_mpi.comm import make_comm
    from dllama_mpi.config import ModelConfig, RunConfig
    from dllama_mpi.loading import load_shard
    from dllama_mpi.runtime.startup import (_direct_load, _root_open, _warm_kernels, open_model,
                                    release_free_memory)

    comm = make_comm()
    kernels.choose_threading_layer("q40")
    kernels.set_num_threads(1)
    _warm_kernels(comm)
    comm.barrier()
    reset = _reset_peak()
    before = _status()

    t0 = _time.perf_counter()
    model = None
    status = None
    if comm.is_root:
        model, _, run = _root_open(model_arg, RunConfig(load=load), comm.size, False, None)
        status = (model.config.to_dict(), run, model.path,
                  list(getattr(model, "parts", [model.path])))
    config, run, path, files = comm.bcast_obj(status)
    config = ModelConfig.from_dict(config)
    direct = _direct_load(comm, run.load, files)
    if direct and not comm.is_root:
        model = open_model(path)
    open_s = _time.perf_counter() - t0
    comm.barrier()

    t1 = _time.perf_counter()
    weights = load_shard(comm, model, config, run, progress=False, direct=direct)
    load_s = _time.perf_counter() - t1
    loaded = _status()                # file pages while the model is still mapped
    if direct and not comm.is_root:   # then what session.start does after loading
        model.close()
    release_free_memory()
    st = _status()
    mine = {"rank": comm.rank, "open_s": open_s, "load_s": load_s, "shard": weights.nbytes(),
            "base": before["VmRSS"], "peak": st["VmHWM"] if reset else None,
            "anon": st["RssAnon"], "file": loaded["RssFile"],
            "anon_base": before["RssAnon"], "file_base": before["RssFile"]}
    comm.barrier()
    wall = _time.perf_counter() - t0
    everyone = comm.allgather_obj(mine)
    if comm.is_root:
        print(json.dumps({"model": os.path.basename(os.path.normpath(model_arg)),
                          "ranks": comm.size,
                          "load": "direct" if direct else "scatter" if comm.size > 1 else "-",
                          "weights": run.weights_float_type, "output": run.output_float_type,
                          "file_bytes": _file_bytes(path), "wall_s": wall,
                          "per_rank": everyone}))


def _file_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- driver

def model_path(name: str) -> str:
    if name == "synthetic":
        path = os.path.join(RESULTS, "synthetic-1.1b-q4_0.gguf")
        if not os.path.exists(path):
            subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic.py"), path],
                           check=True)
        return path
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny import smollm2_path
    gguf = smollm2_path()
    if name == "smollm2":
        return gguf
    if name == "smollm2-h5":
        path = os.path.join(RESULTS, "smollm2-135m-q40.h5")
        if not os.path.exists(path):
            from dllama_mpi.apps.convert import convert
            convert(gguf, path, "q40", progress=False)
        return path
    raise SystemExit(f"unknown model {name!r} (smollm2, smollm2-h5, synthetic)")


def measure(path: str, ranks: int, load: str, timeout: float) -> dict:
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable,
           os.path.abspath(__file__), "--worker", "--model", path, "--load", load]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | ranks | load | rank | open s | load s | shard MiB | peak RSS MiB "
            "| peak − base MiB | held MiB | mapped MiB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        for p in r["per_rank"]:
            peak = p["peak"] if p["peak"] is not None else float("nan")
            lines.append(
                f"| {r['model']} | {r['ranks']} | {r['load']} | {p['rank']} | {p['open_s']:.2f} "
                f"| {p['load_s']:.2f} | {p['shard'] / MIB:.1f} | {peak / MIB:.0f} "
                f"| {(peak - p['base']) / MIB:.0f} | {(p['anon'] - p['anon_base']) / MIB:.0f} "
                f"| {(p['file'] - p['file_base']) / MIB:.0f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per run: the root against the worst worker."""
    head = ("| model | ranks | load | wall s | shard MiB | root: held / mapped / peak − base MiB "
            "| workers (max): held / mapped / peak − base MiB |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        ps = r["per_rank"]

        def cols(p):
            return (f"{(p['anon'] - p['anon_base']) / MIB:.0f} / "
                    f"{(p['file'] - p['file_base']) / MIB:.0f} / "
                    f"{(p['peak'] - p['base']) / MIB:.0f}" if p["peak"] is not None else "?")
        worst = max(ps[1:], key=lambda p: p["anon"] - p["anon_base"]) if len(ps) > 1 else None
        lines.append(f"| {r['model']} | {r['ranks']} | {r['load']} | {r['wall_s']:.2f} "
                     f"| {max(p['shard'] for p in ps) / MIB:.0f} | {cols(ps[0])} "
                     f"| {cols(worst) if worst else '—'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="one measured run (under mpiexec)")
    ap.add_argument("--model", help="--worker: the model path")
    ap.add_argument("--load", default="scatter", choices=("scatter", "direct"))
    ap.add_argument("--models", nargs="+", default=["smollm2", "smollm2-h5", "synthetic"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--modes", nargs="+", default=["scatter", "direct"],
                    choices=("scatter", "direct"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mpiexec run")
    ap.add_argument("--tables", nargs="+", metavar="RESULT.json",
                    help="print the tables of saved results (later files replace a model's rows)")
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.load)
        return
    if args.tables:
        by_model: dict[str, list] = {}
        for path in args.tables:
            with open(path) as f:
                saved = json.load(f)["rows"]
            for name in dict.fromkeys(r["model"] for r in saved):
                by_model[name] = [r for r in saved if r["model"] == name]
        rows = [r for rs in by_model.values() for r in rs]
        print(table(rows) + "\n\n" + summary(rows))
        return
    rows = []
    for name in args.models:
        path = model_path(name)
        for n in args.ranks:
            for mode in (args.modes if n > 1 else args.modes[:1]):  # one rank: no sending
                r = measure(path, n, mode, args.timeout)
                r["model"] = name
                rows.append(r)
                print(f"{name} {n} ranks {r['load']}: wall {r['wall_s']:.2f} s", file=sys.stderr)
    print(table(rows) + "\n\n" + summary(rows))
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, time.strftime("load-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

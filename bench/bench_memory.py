"""Memory per rank: what memory.py predicts against what each rank really holds.

    python bench/bench_memory.py [--models smollm2 synthetic] [--ranks 1 2]
                                 [--storages memory disk] [--slot-counts 1 16] [--max-seq-len 512]
        runs `mpiexec -n N python bench/bench_memory.py --worker ...` for every combination;
        prints a table and writes bench/results/memory-<time>.json
    mpiexec -n N python bench/bench_memory.py --worker --model PATH --storage memory|disk
                                              --slots S --max-seq-len L
        one measured run; rank 0 prints one JSON line with every rank's figures

A measured run is what the program does: session.start (the root opens the model and the
tokenizer, every rank loads its shard and makes its KV cache), then `slots` prompts of one
prefill chunk (128 tokens) decode to the end of the context through the scheduler, `slots`
at a time: the worst case memory.py predicts (every buffer and scratch row in use, every KV
position written). Kernels are compiled
(or loaded from numba's cache) first, outside the measurement. Per rank, from
/proc/self/status:

  base       RssAnon before start (interpreter, the libraries a run imports, compiled kernels)
  held       RssAnon at the end minus base: the anonymous memory the run added -- weights,
             an in-memory KV cache (every page written at start), buffers, and Python objects
             (the root's tokenizer above all: measured alone first, and shown)
  predicted  memory.py's total for this rank (weights + buffers + KV cache in memory)
  kv file    RssFile gained: pages of the model file and of a disk KV cache this rank
             touched (page cache: shared, dropped under pressure, not in `predicted`)
  peak       VmHWM over the run (reset at base) minus the RSS at base: anonymous and file
             pages at their highest, loading included
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
sys.path.insert(0, HERE)

MIB = 2 ** 20


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _import_everything() -> None:
    """The libraries a run imports (part of the base, like the interpreter)."""
    import gguf  # noqa: F401
    import tokenizers  # noqa: F401

    import dllama_mpi.apps.inference  # noqa: F401
    import dllama_mpi.formats.gguf  # noqa: F401
    import dllama_mpi.loading  # noqa: F401
    import dllama_mpi.runtime.generation  # noqa: F401
    import dllama_mpi.tokenizer  # noqa: F401


def _tokenizer_bytes(model: str) -> int:
    """Anonymous memory of the model's tokenizer (the root holds one; memory.py does not
    count it): RssAnon with one built, minus without, the heap trimmed after."""
    import gc

    from dllama_mpi.registry import resolve
    from dllama_mpi.model import trim_heap
    from dllama_mpi.tokenizer import Tokenizer
    before = _status()["RssAnon"]
    tok = Tokenizer.from_gguf(resolve(model))
    tok.encode("warm up the tokenizer")
    held = _status()["RssAnon"] - before
    del tok
    gc.collect()
    trim_heap()
    return held


def worker(model: str, storage: str, slots: int, max_seq_len: int, kv_type: str) -> None:
    import numpy as np

    from bench_load import _reset_peak
    from dllama_mpi import kernels
    from dllama_mpi.comm import make_comm
    from dllama_mpi.config import RunConfig
    from dllama_mpi.memory import per_rank
    from dllama_mpi.runtime.generation import generate_batch
    from dllama_mpi.runtime.progress import Stages, warm_kernels
    from dllama_mpi.runtime.startup import run_root, start

    comm = make_comm()
    kernels.choose_threading_layer("q40")
    kernels.set_num_threads(1)
    warm_kernels(comm, set(kernels.ALL_NEEDS) - {"tests"}, Stages(False))
    _import_everything()
    tokenizer = _tokenizer_bytes(model) if comm.is_root else 0
    comm.barrier()
    reset = _reset_peak()
    before = _status()
    run = RunConfig(max_seq_len=max_seq_len, nthreads=1, parallel=slots,
                    kv_cache_storage=storage, kv_cache_float_type=kv_type)
    t0 = time.perf_counter()
    s = start(comm, model, run, progress=False)
    predicted = per_rank(s.config, s.run, comm.size)[comm.rank]

    def body(session):
        rng = np.random.default_rng(0)
        n = session.run.prefill_chunk
        prompts = [[int(t) for t in rng.integers(100, session.config.vocab_size - 100, n)]
                   for _ in range(slots)]
        return generate_batch(session.engine, prompts, [s.max_seq_len] * slots,
                              [lambda l: int(np.argmax(l))] * slots, set(), s.max_seq_len,
                              slots)

    run_root(s, body)
    wall = time.perf_counter() - t0
    after = _status()
    mine = {"rank": comm.rank, "base": before["RssAnon"], "rss_base": before["VmRSS"],
            "held": after["RssAnon"] - before["RssAnon"],
            "file": after["RssFile"] - before["RssFile"],
            "peak": after["VmHWM"] - before["VmRSS"] if reset else None,
            "tokenizer": tokenizer, "predicted": predicted.total, "weights": predicted.weights,
            "kv": predicted.kv_cache, "kv_on_disk": predicted.kv_on_disk,
            "buffers": predicted.buffers}
    everyone = comm.allgather_obj(mine)
    if comm.is_root:
        print(json.dumps({"model": os.path.basename(model), "ranks": comm.size,
                          "storage": storage, "slots": slots, "max_seq_len": s.max_seq_len,
                          "kv_type": kv_type, "weights_type": s.run.weights_float_type,
                          "wall_s": wall, "per_rank": everyone}))


def measure(path: str, ranks: int, storage: str, slots: int, max_seq_len: int, kv_type: str,
            timeout: float) -> dict:
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable,
           os.path.abspath(__file__), "--worker", "--model", path, "--storage", storage,
           "--slots", str(slots), "--max-seq-len", str(max_seq_len), "--kv", kv_type]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | ranks | KV | slots | rank | predicted MiB (weights + KV + buffers) "
            "| held MiB (tokenizer) | held − tokenizer / predicted | file pages MiB "
            "| peak − base MiB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        for p in r["per_rank"]:
            kv = "disk" if p["kv_on_disk"] else f"{p['kv'] / MIB:.0f}"
            peak = f"{p['peak'] / MIB:.0f}" if p["peak"] is not None else "?"
            tok = p.get("tokenizer", 0)
            held = f"{p['held'] / MIB:.0f}" + (f" ({tok / MIB:.0f})" if tok else "")
            lines.append(
                f"| {r['model']} | {r['ranks']} | {r['storage']} {r['kv_type']} | {r['slots']} "
                f"| {p['rank']} | {p['predicted'] / MIB:.0f} ({p['weights'] / MIB:.0f} + {kv} + "
                f"{p['buffers'] / MIB:.0f}) | {held} "
                f"| {(p['held'] - tok) / p['predicted']:.2f} | {p['file'] / MIB:.0f} | {peak} |")
    return "\n".join(lines)


def model_path(name: str) -> str:
    from bench_load import model_path as load_bench_model
    return load_bench_model(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--storage", default="memory", choices=("memory", "disk"))
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--kv", default="f32", choices=("f32", "f16"))
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--models", nargs="+", default=["smollm2", "synthetic"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--storages", nargs="+", default=["memory", "disk"])
    ap.add_argument("--slot-counts", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--kv-types", nargs="+", default=["f32"])
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--tables", nargs="+", metavar="RESULT.json")
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.storage, args.slots, args.max_seq_len, args.kv)
        return
    if args.tables:
        rows = [r for path in args.tables for r in json.load(open(path))["rows"]]
        print(table(rows))
        return
    rows = []
    for name in args.models:
        path = model_path(name)
        for n in args.ranks:
            for storage in args.storages:
                for slots in args.slot_counts:
                    for kv in args.kv_types:
                        r = measure(path, n, storage, slots, args.max_seq_len, kv, args.timeout)
                        r["model"] = name
                        rows.append(r)
                        worst = max((p["held"] - p["tokenizer"]) / p["predicted"]
                                    for p in r["per_rank"])
                        print(f"{name} {n} ranks {storage} {kv} {slots} slots: held/predicted "
                              f"up to {worst:.2f}, wall {r['wall_s']:.1f} s", file=sys.stderr)
    print(table(rows))
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, time.strftime("memory-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

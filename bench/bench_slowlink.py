"""Two ranks over an emulated slow link (run by hand, as root; never part of the tests).

    python bench/bench_slowlink.py [--rates 1gbit,100mbit] [--wires q80,f32]
                                   [--models smollm2] [--repeats 1]
    python bench/bench_slowlink.py --check      # can this machine do it? (exit 0, or 3 + why)
    python bench/bench_slowlink.py --allgather-only --rates 100mbit

How the traffic is made to cross the link instead of shared memory: two network
namespaces made for the run, joined by a veth pair, each end rate-limited by a `tbf` qdisc
(netem, which could add latency, is missing from these kernels). Each rank runs in its own
namespace *and* its own UTS namespace (another hostname), started by MPICH's hydra with a
launcher script in place of ssh (`ip netns exec NS unshare -u ...`), so hydra sees two
hosts; MPICH is told not to use shared memory (MPIR_CVAR_NOLOCAL=1) and UCX to use TCP on
the veth only (UCX_TLS=tcp,self, UCX_NET_DEVICES=dlp0), since UCX's own shared-memory
transports would otherwise find the other rank through /dev/shm. A timed Allgather of
1 MiB per rank proves it: at 100 Mbit/s it must take >= 84 ms (shared memory: ~0.3 ms).

Then, per rate and wire (Q80: 34 bytes per 32 values; F32: 4 per value), a measured run
(bench_plan.py's worker: SmolLM2 by default, 1 thread per rank) against `plan` with the
link bw=RATE (x 0.95: TCP/IP headers), lat=the measured 16-byte Allgather time. Caveat: a
token bucket limits the average rate, not the time each packet takes on the wire: a message
smaller than the bucket (`--burst`, default 1 ms of the rate) passes at veth speed when the
bucket is full, where a real link would spend size / rate on it. Smaller buckets (one frame,
4 KiB; with or without GSO on the veth) gave erratic millisecond stalls on small messages
and could not reach 1 Gbit/s for large ones.

Namespaces and veths are named after this process id and removed at the end (or on error).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

ADDRS = ("10.77.0.1", "10.77.0.2")
DEV = "dlp0"
TCP_PAYLOAD = 0.95      # of the link rate: 1448 payload bytes per 1514-byte frame, roughly


def _sh(*cmd, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def can_run() -> str | None:
    """None when namespaces, veth and tbf work here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH"
    name = f"dlpchk{os.getpid() % 100000}"
    try:
        p = _sh("ip", "netns", "add", name, check=False)
        if p.returncode != 0:
            return f"cannot create a network namespace: {p.stderr.strip()}"
        p = _sh("ip", "-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb",
                check=False)
        if p.returncode != 0:
            return f"cannot create a veth pair: {p.stderr.strip()}"
        p = _sh("tc", "-n", name, "qdisc", "add", "dev", "va", "root", "tbf", "rate", "100mbit",
                "burst", "16kb", "latency", "50ms", check=False)
        if p.returncode != 0:
            return f"cannot add a tbf qdisc: {p.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", name, check=False)
    if shutil.which("mpiexec") is None:
        return "no mpiexec on PATH"
    return None


def burst_bytes(rate: str, burst: str | None) -> str:
    """tbf's bucket: at least a few frames, and the bytes of 1 ms at the rate (rate / HZ)."""
    if burst:
        return burst
    from dllama_mpi.predict import parse_rate
    return f"{max(4096, int(parse_rate(rate) / 1000))}b"


@contextlib.contextmanager
def slow_link(rate: str, burst: str | None = None):
    """Two namespaces joined by a veth rate-limited to `rate` each way; yields the command
    prefix that starts 2 ranks, one in each (hydra with the namespace launcher)."""
    tag = f"{os.getpid() % 100000}"
    ns = (f"dlp{tag}a", f"dlp{tag}b")
    tmp = tempfile.mkdtemp(prefix="dllama-slowlink-")
    try:
        for n in ns:
            _sh("ip", "netns", "add", n)
        _sh("ip", "link", "add", f"dlp{tag}x", "type", "veth", "peer", "name", f"dlp{tag}y")
        for n, end, addr in zip(ns, (f"dlp{tag}x", f"dlp{tag}y"), ADDRS):
            _sh("ip", "link", "set", end, "netns", n)
            _sh("ip", "-n", n, "link", "set", end, "name", DEV)
            _sh("ip", "-n", n, "addr", "add", f"{addr}/24", "dev", DEV)
            _sh("ip", "-n", n, "link", "set", "lo", "up")
            _sh("ip", "-n", n, "link", "set", DEV, "up")
            _sh("tc", "-n", n, "qdisc", "add", "dev", DEV, "root", "tbf", "rate", rate,
                "burst", burst_bytes(rate, burst), "latency", "100ms")
        launcher = os.path.join(tmp, "nslaunch")
        with open(launcher, "w") as f:
            f.write("#!/bin/sh\n# hydra's launcher: [ssh options] HOST CMD... -> CMD in HOST's "
                    "network namespace, with its own hostname\n"
                    'while [ "${1#-}" != "$1" ]; do shift; done\nhost=$1; shift\n'
                    f'case $host in {ADDRS[0]}) ns={ns[0]}; hn=dlp-node-a;; '
                    f'{ADDRS[1]}) ns={ns[1]}; hn=dlp-node-b;; '
                    '*) echo "unknown host $host" >&2; exit 1;; esac\n'
                    'exec ip netns exec $ns unshare -u sh -c "hostname $hn; $*"\n')
        os.chmod(launcher, 0o755)
        env = ["-genv", "MPIR_CVAR_NOLOCAL", "1", "-genv", "UCX_TLS", "tcp,self",
               "-genv", "UCX_NET_DEVICES", DEV]
        prefix = ["ip", "netns", "exec", ns[0], "unshare", "-u", "--",
                  shutil.which("mpiexec") or "mpiexec", "-launcher", "ssh", "-launcher-exec",
                  launcher, "-hosts", ",".join(ADDRS), "-n", "2", "-ppn", "1", *env]
        yield prefix
    finally:
        for n in ns:
            _sh("ip", "netns", "del", n, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


ALLGATHER = r"""
import json, sys, time
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
out = {"hosts": c.allgather(MPI.Get_processor_name())}
for n, reps in ((16, 200), (612, 200), (2304, 100), (65536, 10), (1 << 20, 3)):
    send = np.ones(n, np.uint8); recv = np.empty(n * c.size, np.uint8)
    for _ in range(3):
        c.Allgather(send, recv)
    best = []
    for _ in range(reps):
        c.Barrier(); t = time.perf_counter(); c.Allgather(send, recv)
        best.append(time.perf_counter() - t)
    out[str(n)] = sorted(best)[len(best) // 2]
if c.rank == 0:
    print(json.dumps(out), flush=True)
"""


def allgather_times(prefix) -> dict:
    """Median seconds of an Allgather of n bytes per rank, n = 16 B .. 1 MiB."""
    p = subprocess.run([*prefix, sys.executable, "-c", ALLGATHER], capture_output=True,
                       text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"allgather over the link failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    from bench_plan import models, run_worker
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="1gbit,100mbit")
    ap.add_argument("--wires", default="q80,f32")
    ap.add_argument("--models", default="smollm2")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--burst", default=None, help="tbf bucket (default: max(4 KiB, 1 ms of rate))")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="only say whether it can run here")
    ap.add_argument("--allgather-only", action="store_true")
    args = ap.parse_args()
    why = can_run()
    if why:
        print(f"cannot emulate a slow link here: {why}")
        return 3
    if args.check:
        print("ok: network namespaces, veth and tbf work here")
        return 0
    from dllama_mpi import predict
    from bench_plan import predicted
    paths = {} if args.allgather_only else models(args.models.split(","))
    rows, probes = [], {}
    for rate in args.rates.split(","):
        with slow_link(rate, args.burst) as prefix:
            t = allgather_times(prefix)
            probes[rate] = t
            need = (1 << 20) * 8 / predict.parse_rate(rate) / 8
            print(f"{rate}: hosts {t['hosts']}; Allgather 16 B {t['16'] * 1e6:.0f} µs, 612 B "
                  f"{t['612'] * 1e6:.0f} µs, 2304 B {t['2304'] * 1e6:.0f} µs, 64 KiB "
                  f"{t['65536'] * 1e3:.2f} ms, 1 MiB {t[str(1 << 20)] * 1e3:.1f} ms "
                  f"(1 MiB at the rate: {need * 1e3:.1f} ms)", flush=True)
            link = predict.Link(f"bw={rate}x{TCP_PAYLOAD},lat={t['16'] * 1e6:.0f}us",
                                predict.parse_rate(rate) * TCP_PAYLOAD, t["16"])
            for name, path in paths.items():
                for wire in args.wires.split(","):
                    runs = [run_worker(path, 2, ["--steps", str(args.steps), "--buffer-float-type",
                                                 wire], launcher=prefix)
                            for _ in range(args.repeats)]
                    r = sorted(runs, key=lambda x: x["decode_tok_s"])[len(runs) // 2]
                    p = predicted(r, bw2_node(), link, ranks_per_node=1)
                    # the token bucket: latencies, plus what each message needs beyond the
                    # bucket, or what all the bytes need beyond the time the link has while
                    # the ranks compute, whichever is more
                    bucket = predict.parse_size(burst_bytes(rate, args.burst))
                    wire_ms = 1e3 * max(p["sent"]) / link.bandwidth
                    over_ms = 1e3 * sum(n * max(0, size - bucket) for size, n in
                                        messages(r)) / link.bandwidth
                    p["tbf_sync_ms"] = p["decode_latency_ms"] + max(
                        over_ms, wire_ms - p["decode_compute_ms"])
                    p["tbf_tok_s"] = 1e3 / (p["decode_compute_ms"] + p["tbf_sync_ms"])
                    rows.append((rate, name, wire, r, p))
                    print(f"  {name} {wire}: {r['decode_tok_s']:.1f} tok/s (plan "
                          f"{p['decode_tok_s']:.1f}), sync {r['per_rank'][0]['sync_ms']:.2f} ms "
                          f"(plan {p['decode_sync_ms']:.2f})", flush=True)
    if rows:
        print("\n| link | model | wire | kB sent/token (rank 0) | sync ms/token measured (rank 0)"
              " | plan: real link | plan: token bucket | decode tok/s measured | plan: real link "
              "| plan: token bucket |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for rate, name, wire, r, p in rows:
            m = r["decode_tok_s"]
            print(f"| {rate} | {name} | {wire} | {r['per_rank'][0]['bytes_sent'] / 1e3:.1f} | "
                  f"{r['per_rank'][0]['sync_ms']:.2f} | {p['decode_sync_ms']:.2f} | "
                  f"{p['tbf_sync_ms']:.2f} | {m:.1f} | {p['decode_tok_s']:.1f} "
                  f"({(p['decode_tok_s'] / m - 1) * 100:+.0f}%) | {p['tbf_tok_s']:.1f} "
                  f"({(p['tbf_tok_s'] / m - 1) * 100:+.0f}%) |")
    out = os.path.join(HERE, "results", time.strftime("slowlink-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"allgather": probes, "rows": rows}, f, indent=1)
    print(f"written {out}")
    return 0


def messages(r: dict) -> list[tuple[int, int]]:
    """(bytes, count) of the messages one rank puts on its link per decode token (2 ranks:
    each collective is one message each way)."""
    from dllama_mpi import predict
    from dllama_mpi.formats import open_model
    model = open_model(r["model"])
    c = model.config
    model.close()
    out = []
    for x in predict.decode_collectives(c, 2, r["wire"], r["row_bytes"]):
        size = x.nbytes // 2 if x.kind == "gatherv" else x.nbytes
        out.append((size, x.count))
    return out


_BW2 = []


def bw2_node() -> float:
    """Each rank's share of this machine's read bandwidth (the two 'nodes' are one machine:
    a node per rank for the link, half the 2-core bandwidth each for compute)."""
    if not _BW2:
        from bench_plan import bandwidth
        _BW2.append(bandwidth()[1] / 2)
    return _BW2[0]


if __name__ == "__main__":
    sys.exit(main())

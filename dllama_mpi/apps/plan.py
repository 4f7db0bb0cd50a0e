"""`plan`: what N ranks on a given link will hold and do, before buying the hardware.

    python -m dllama_mpi plan (--model M | --preset P) -n N [--link 10gbe] [--node-memory 64GiB]
        [--weights-float-type q40] [--max-seq-len S] [--max-batch B] [--sweep [--plot F.png]]
        [--read-bw GB/s | --probe] [--json]

Per rank: weights, KV cache, buffers (memory.py, as start-up reports) and the process.
Per token: bytes each rank sends and receives, collectives. Predicted decode and prompt
tok/s (predict.py: compute + network). No MPI: it runs anywhere, in a second.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from .. import registry, shard
from ..config import BUFFER_TYPES, KV_FLOAT_TYPES, WEIGHT_TYPES, RunConfig
from ..errors import DllamaError
from ..memory import mib
from ..predict import (LINKS, PRESET_FILE_TYPE, PRESETS, RUNTIME_BYTES, Machine, Plan,
                       embedding_row_bytes, make_plan, n_params, parse_link, parse_size,
                       smallest_fitting, is_valid_size)

SWEEP_MAX = 16


def _arg(parse):
    """An argparse type from a parser raising ValueError (its message becomes the error)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def _gb_s(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model file or folder, or a known model name: its "
                       "shape, tensor types and embedding rows as stored")
    which.add_argument("--preset", choices=sorted(PRESETS),
                       help="a published model shape (no file needed)")
    p.add_argument("-n", "--ranks", type=_arg(_positive), default=None,
                   help="ranks (one per node unless --ranks-per-node); required without --sweep")
    p.add_argument("--weights-float-type", choices=("auto",) + WEIGHT_TYPES, default="auto",
                   help="as for inference (auto: the file's; q40 for a preset)")
    p.add_argument("--buffer-float-type", choices=("auto",) + BUFFER_TYPES, default="auto",
                   help="the wire, as for inference")
    p.add_argument("--kv-cache-float-type", choices=KV_FLOAT_TYPES, default="f32",
                   help="the KV cache's values, as for inference (f16: half the bytes)")
    p.add_argument("--max-seq-len", type=_arg(_count), default=0,
                   help="KV cache positions (0: the model's context, at most 4096)")
    p.add_argument("--max-batch", type=_arg(_positive), default=1,
                   help="sequences decoding together (KV-cache slots); > 1 adds their "
                   "aggregate tok/s")
    p.add_argument("--link", type=_arg(parse_link), default="1gbe",
                   help=f"between nodes: {', '.join(LINKS)}, or 'bw=RATE,lat=TIME' "
                   "(e.g. bw=2.5gbit,lat=80us)")
    p.add_argument("--node-memory", type=_arg(parse_size), default=None,
                   help="memory of one node (e.g. 64GiB): warns when a node does not fit and "
                   "names the smallest rank count that does")
    p.add_argument("--ranks-per-node", type=_arg(_positive), default=1,
                   help="ranks sharing one node's cores, memory, read bandwidth and link")
    p.add_argument("--cores", type=_arg(_positive), default=Machine.cores,
                   help="cores of a node (a rank runs cores / ranks-per-node threads)")
    bw = p.add_mutually_exclusive_group()
    bw.add_argument("--read-bw", type=_arg(_gb_s), default=Machine.read_bw / 1e9, metavar="GB/s",
                    help="a node's memory read bandwidth, all its cores (the default: this "
                    "project's 2-core test machine)")
    bw.add_argument("--probe", action="store_true",
                    help="measure this machine's read bandwidth (all its cores; ~2 s)")
    p.add_argument("--kernel-gb-s", type=_arg(_gb_s), default=Machine.kernel_bw / 1e9,
                   metavar="GB/s", help="what the 4-bit matmuls consume per core from cache "
                   "(the default: this project's test machine)")
    p.add_argument("--prefill-gops", type=_arg(_gb_s), default=Machine.prefill_ops / 1e9,
                   metavar="GOP/s", help="int8 throughput per core on prompt matrices (the "
                   "default: this project's test machine)")
    p.add_argument("--context", type=_arg(_count), default=256,
                   help="positions in the KV cache while decoding (attention reads them)")
    p.add_argument("--prompt", type=_arg(_positive), default=128,
                   help="prompt tokens of the prompt-speed prediction")
    p.add_argument("--sweep", action="store_true",
                   help=f"a table for 1..{SWEEP_MAX} ranks on every link preset")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="with --sweep: draw predicted decode tok/s against ranks per link "
                   "(needs matplotlib: pip install -e '.[bench]')")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# -- inputs --------------------------------------------------------------------------------

def resolve_inputs(args):
    """(config, resolved run, stored embedding row bytes, description) of --model/--preset."""
    run = RunConfig(weights_float_type=args.weights_float_type,
                    buffer_float_type=args.buffer_float_type, max_seq_len=args.max_seq_len,
                    parallel=args.max_batch, kv_cache_float_type=args.kv_cache_float_type)
    if args.preset:
        preset = PRESETS[args.preset]
        w = "q40" if args.weights_float_type == "auto" else args.weights_float_type
        file_type = PRESET_FILE_TYPE[w]
        run = replace(run, weights_float_type=w).resolved(w, file_type)
        config = preset.config
        row = embedding_row_bytes(config.dim, file_type)
        what = (f"{args.preset} (preset: {preset.source}; as a {file_type} file)")
    else:
        from ..formats import open_model
        from ..runtime.startup import resolve_run
        model = open_model(registry.resolve(args.model))
        try:
            config = model.config
            run = resolve_run(run, model)      # each matrix's own type in a mixed file
            emb = model.tensor("embedding")
            import numpy as np
            row = int(np.asarray(emb.data[0:1]).nbytes)
            what = f"{model.path} (embedding stored as {emb.type})"
        finally:
            model.close()
    run.validate(config)
    return config, run, row, what


def machine_of(args) -> tuple[Machine, str]:
    m = Machine(ranks_per_node=args.ranks_per_node, memory=args.node_memory or 0,
                read_bw=args.read_bw * 1e9, prefill_ops=args.prefill_gops * 1e9,
                cores=args.cores, kernel_bw=args.kernel_gb_s * 1e9)
    source = ("default: this project's test machine" if m.read_bw == Machine.read_bw
              else "given")
    if args.probe:
        from .probe import read_bandwidth
        m = replace(m, read_bw=read_bandwidth())
        source = "probed on this machine, all cores"
    return m, source


# -- output --------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else mib(int(n))


def _speed_line(label: str, s, per: str = "step") -> str:
    net = (f", network {1e3 * s.network_s:.2f} ms ({1e3 * s.latency_s:.2f} ms of it latency), "
           f"waiting for other ranks {1e3 * s.wait_s:.2f} ms" if s.network_s else "")
    return (f"{label}: {s.tok_s:.3g} tok/s (per {per}: compute {1e3 * s.compute_s:.2f} ms, "
            f"{1e3 * s.overhead_s:.2f} ms of it fixed costs{net})")


def _rank_groups(p: Plan):
    """Consecutive ranks with identical figures, as (first, last, memory, traffic)."""
    groups = []
    for m, t in zip(p.memory, p.traffic):
        key = (m.weights, m.kv_cache, m.buffers, t.sent, t.recv)
        if groups and groups[-1][4] == key and m.rank > 0 and groups[-1][0] > 0:
            groups[-1][1] = m.rank
        else:
            groups.append([m.rank, m.rank, m, t, key])
    return groups


def print_plan(p: Plan, what: str, machine_source: str, smallest: int | None, out=sys.stdout):
    c, run = p.config, p.run
    seq = run.resolved_max_seq_len(c)
    w = out.write
    w(f"model: {what}; {n_params(c) / 1e9:.2f} B parameters, {c.n_layers} layers, dim "
      f"{c.dim}, FFN {c.hidden_dim}, {c.n_heads}/{c.n_kv_heads} heads, vocab {c.vocab_size}\n")
    w(f"run: {p.size} ranks ({p.machine.ranks_per_node} per node), weights "
      f"{run.weights_float_type}, output matrix {run.output_float_type}, wire "
      f"{run.buffer_float_type}, KV cache {run.kv_cache_float_type} {seq} positions x {run.parallel} slots\n")
    w(f"link: {p.link.describe()}\n")
    m = p.machine
    w(f"node: {m.cores} cores, read {m.read_bw / 1e9:.1f} GB/s ({machine_source}); a rank "
      f"runs {m.threads} thread(s), streams {m.stream_bw / 1e9:.1f} GB/s in decode, "
      f"{m.rank_ops / 1e9:.0f} G ops/s on prompts\n")
    w("per rank (weights + KV cache + buffers + process = total):\n")
    for first, last, m, t, _ in _rank_groups(p):
        who = f"rank {first}" if first == last else f"ranks {first}-{last}"
        w(f"  {who}: {_gib(m.weights)} + {_gib(m.kv_cache)} + {_gib(m.buffers)} + "
          f"{_gib(RUNTIME_BYTES)} = {_gib(m.total + RUNTIME_BYTES)}; per token sends "
          f"{t.sent / 1e3:.1f} kB, receives {t.recv / 1e3:.1f} kB\n")
    if p.size > 1:
        w(f"per token: {p.collectives} collectives (2 all-gathers per layer of "
          f"{c.dim}-value partial sums, the step packet and embedding row, the logits)\n")
    w(_speed_line(f"decode (context {p.context})", p.decode) + "\n")
    if p.batch is not None:
        w(_speed_line(f"decode, {run.parallel} sequences together (aggregate)", p.batch) + "\n")
    w(_speed_line(f"prompt ({p.prefill.tokens} tokens)", p.prefill, "prompt") + "\n")
    if p.fits is not None:
        node = p.node_bytes
        if p.fits:
            w(f"fits: a node holds {_gib(node)} of {_gib(p.machine.memory)}\n")
        else:
            nxt = (f"the smallest rank count that fits is {smallest}" if smallest else
                   f"no rank count up to {c.n_heads} (its query heads) fits")
            w(f"warning: does not fit: a node needs {_gib(node)}, it has "
              f"{_gib(p.machine.memory)}; {nxt}\n")


def plan_json(p: Plan, what: str, machine_source: str, smallest) -> dict:
    def speed(s):
        return None if s is None else dict(
            tok_s=s.tok_s, step_ms=1e3 * s.step_s, compute_ms=1e3 * s.compute_s,
            network_ms=1e3 * s.network_s, latency_ms=1e3 * s.latency_s,
            wait_ms=1e3 * s.wait_s, sync_ms=1e3 * s.sync_s,
            fixed_ms=1e3 * s.overhead_s, tokens_per_step=s.tokens)
    run = p.run
    return {
        "model": what, "parameters": n_params(p.config), "config": p.config.to_dict(),
        "ranks": p.size, "ranks_per_node": p.machine.ranks_per_node,
        "weights_float_type": run.weights_float_type, "output_float_type": run.output_float_type,
        "buffer_float_type": run.buffer_float_type, "kv_cache_float_type": run.kv_cache_float_type,
        "max_seq_len": run.resolved_max_seq_len(p.config), "max_batch": run.parallel,
        "link": dict(name=p.link.name, bandwidth_bytes_s=p.link.bandwidth,
                     latency_s=p.link.latency),
        "read_bw_bytes_s": p.machine.read_bw, "read_bw_source": machine_source,
        "cores": p.machine.cores, "threads_per_rank": p.machine.threads,
        "stream_bytes_s": p.machine.stream_bw, "prefill_ops_s": p.machine.rank_ops,
        "context": p.context,
        "per_rank": [dict(rank=m.rank, weights=m.weights, kv_cache=m.kv_cache,
                          buffers=m.buffers, runtime=RUNTIME_BYTES,
                          total=m.total + RUNTIME_BYTES, bytes_sent=t.sent, bytes_recv=t.recv)
                     for m, t in zip(p.memory, p.traffic)],
        "collectives_per_token": p.collectives, "embedding_row_bytes": p.row_bytes,
        "decode": speed(p.decode), "batch_decode": speed(p.batch),
        "prefill": dict(speed(p.prefill), prompt_tokens=p.prefill.tokens),
        "node_memory": p.machine.memory or None, "node_bytes": p.node_bytes,
        "fits": p.fits, "smallest_fitting_ranks": smallest,
    }


def sweep_rows(config, run, machine, row, context, prompt, links) -> list[dict]:
    rows = []
    for n in range(1, SWEEP_MAX + 1):
        if not is_valid_size(config, run.weights_float_type, n):
            rows.append(dict(ranks=n, valid=False))
            continue
        plans = {name: make_plan(config, run, n, link, machine, row, context, prompt)
                 for name, link in links.items()}
        any_plan = next(iter(plans.values()))
        rows.append(dict(
            ranks=n, valid=True, rank_bytes=max(any_plan.rank_bytes),
            node_bytes=any_plan.node_bytes, fits=any_plan.fits,
            sent_per_token=any_plan.traffic[0].sent,
            decode_tok_s={k: p.decode.tok_s for k, p in plans.items()},
            prefill_tok_s={k: p.prefill.tok_s for k, p in plans.items()}))
    return rows


def print_sweep(rows, links, ranks_per_node: int = 1, out=sys.stdout) -> None:
    names = list(links)
    out.write(f"\npredicted decode tok/s by ranks and link ({ranks_per_node} rank(s) per "
              "node):\n\n")
    out.write("| ranks | largest rank | fits | kB sent/token (rank 0) | "
              + " | ".join(names) + " |\n")
    out.write("|---|---|---|---|" + "---|" * len(names) + "\n")
    for r in rows:
        if not r["valid"]:
            out.write(f"| {r['ranks']} | cannot split | | |" + " |" * len(names) + "\n")
            continue
        fits = {None: "", True: "yes", False: "no"}[r["fits"]]
        out.write(f"| {r['ranks']} | {_gib(r['rank_bytes'])} | {fits} | "
                  f"{r['sent_per_token'] / 1e3:.1f} | "
                  + " | ".join(f"{r['decode_tok_s'][n]:.3g}" for n in names) + " |\n")


def plot_sweep(rows, links, title: str, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DllamaError("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in links:
        pts = [(r["ranks"], r["decode_tok_s"][name]) for r in rows if r["valid"]]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    fitting = [r["ranks"] for r in rows if r["valid"] and r["fits"] is False]
    if fitting:
        ax.axvspan(0.5, max(fitting) + 0.5, color="0.85", label="does not fit a node")
    ax.set(xlabel="ranks (one per node)", ylabel="predicted decode tok/s", title=title,
           yscale="log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise DllamaError(f"cannot write {path}: {e.strerror or e}") from None
    plt.close(fig)


def run(args) -> int:
    if args.ranks is None and not args.sweep:
        raise DllamaError("plan needs -n N (ranks), or --sweep")
    if args.plot and not args.sweep:
        raise DllamaError("--plot draws the sweep: add --sweep")
    config, run_cfg, row, what = resolve_inputs(args)
    machine, source = machine_of(args)
    smallest = smallest_fitting(config, run_cfg, machine, config.n_heads)
    result = None
    plan = None
    if args.ranks is not None:
        shard.check(config, args.ranks, run_cfg.weights_float_type)
        plan = make_plan(config, run_cfg, args.ranks, args.link, machine, row, args.context,
                         args.prompt)
    links = dict(LINKS)
    links.pop("shm")
    if args.link.name not in links:
        links[args.link.name] = args.link
    rows = (sweep_rows(config, run_cfg, machine, row, args.context, args.prompt, links)
            if args.sweep else None)
    if args.plot:
        name = args.preset or config.arch
        plot_sweep(rows, links, f"{name}: {run_cfg.weights_float_type} weights, "
                   f"{run_cfg.buffer_float_type} wire, read {machine.read_bw / 1e9:.0f} GB/s "
                   f"per node", args.plot)
    if args.json:
        result = plan_json(plan, what, source, smallest) if plan else {
            "model": what, "parameters": n_params(config), "smallest_fitting_ranks": smallest}
        if rows is not None:
            result["sweep"] = rows
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    if plan is not None:
        print_plan(plan, what, source, smallest)
    else:
        sys.stdout.write(f"model: {what}; {n_params(config) / 1e9:.2f} B parameters\n")
        if machine.memory:
            sys.stdout.write(f"smallest rank count that fits {_gib(machine.memory)} per node: "
                             f"{smallest or 'none'}\n")
    if rows is not None:
        print_sweep(rows, links, machine.ranks_per_node)
    if args.plot:
        sys.stdout.write(f"\nwritten {args.plot}\n")
    return 0

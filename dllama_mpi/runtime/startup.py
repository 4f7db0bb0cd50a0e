"""Start-up shared by every command: open, validate, load, build the engine (start); and
the skeleton every command runs on it (run_root): workers follow the root's steps, the
root runs the command, then all ranks gather step statistics and leave together.

The root opens the model and tokenizer and validates the run before anything is
loaded; a problem there is reported once, by the root, and every rank exits.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable

from .. import kernels, registry, shard
from ..comm import Comm, SerialComm
from ..config import ModelConfig, RunConfig
from ..embedding import Embedding
from ..errors import DllamaError, StartupFailed  # noqa: F401  (StartupFailed: re-exported)
from ..formats import open_model
from ..kvcache import KVCache, job_tag
from ..memory import RankMemory, mib
from ..memory import per_rank as memory_per_rank
from ..model import Transformer, pack_weights, trim_heap
from . import interrupt
from .engine import Engine, StepStats
from .scheduler import Scheduler
from .progress import Stages, cores, first_line, kernels_needed, load_with_progress, model_line, warm_kernels


@dataclass
class RankInfo:
    rank: int
    pid: int
    host: str


@dataclass
class Session:
    comm: Comm | SerialComm
    config: ModelConfig
    run: RunConfig                # with its "auto" types resolved
    engine: Engine
    tokenizer: object = None      # root only (tokenizer.Tokenizer)
    max_seq_len: int = 0
    nthreads: int = 1
    memory: list[RankMemory] | None = None   # every rank's bytes (memory.py), measured
    ranks: list[RankInfo] | None = None      # every rank's pid and host

    def close(self) -> None:
        """Release what outlives the process otherwise (the KV cache's folder)."""
        self.engine.model.kv.close()

    def print_memory(self) -> None:
        """One line per rank on stderr: what it holds, and its pid and host (the launcher
        names a rank that dies by its pid)."""
        kv = self.engine.model.kv
        for m in self.memory:
            where = "on disk" if m.kv_on_disk else "in memory"
            who = ""
            if self.ranks is not None and self.comm.size > 1:
                info = self.ranks[m.rank]
                who = f"; pid {info.pid} on {info.host}"
            print(f"rank {m.rank}: weights {mib(m.weights)}, KV cache {mib(m.kv_cache)} "
                  f"{where} ({self.max_seq_len} positions x {self.run.parallel} slots, "
                  f"{kv.float_type}), buffers {mib(m.buffers)}, total {mib(m.total)}; "
                  f"{self.nthreads} threads{who}", file=sys.stderr)


def default_threads(comm, local_ranks: int | None = None) -> int:
    """The cores this rank may use / the ranks on its node, at most numba's thread limit."""
    local = comm.node_local_size() if local_ranks is None else local_ranks
    return max(1, min(cores() // local, kernels.max_threads()))


def _root_open(model_arg: str, run: RunConfig, size: int, want_tokenizer: bool,
               tokenizer_path: str | None):
    path = registry.resolve(model_arg)
    model = open_model(path, tokenizer_path)
    run = resolve_run(run, model)
    run.validate(model.config)
    shard.check(model.config, size, run.weights_float_type, run.quantised_layers)
    tokenizer = model.tokenizer() if want_tokenizer else None
    if tokenizer is not None:
        _check_tokenizer(tokenizer, model.config.vocab_size, tokenizer_path or path)
    return model, tokenizer, run


def _check_tokenizer(tok, vocab_size: int, where: str) -> None:
    """A tokenizer from another model: ids the embedding table does not have. (Fewer ids
    than the model is normal: vocabularies are padded to round sizes.)"""
    special = [i for i in [tok.bos_id, *tok.eos_ids] if i is not None]
    if tok.vocab_size > vocab_size or any(i >= vocab_size for i in special):
        raise DllamaError(f"the tokenizer of {where} has {tok.vocab_size} tokens (special ids "
                          f"up to {max(special, default=0)}), the model {vocab_size}: they do "
                          f"not belong together")


def _fail(comm, message: str, code: int = 1):
    """Every rank: the root prints the one error line; everyone raises StartupFailed."""
    if comm.is_root:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise StartupFailed(code, message)


def _agree(comm, error: str | None, cleanup=None) -> None:
    """Every rank: if any rank found an error, all leave with the first one (the root's
    words, or `rank R: ...` for another rank's)."""
    errors = comm.allgather_obj(error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if not bad:
        return
    if cleanup is not None:
        cleanup()
    r, e = bad[0]
    _fail(comm, e if r == 0 else f"rank {r}: {e}")


def _agree_signals(comm, signals, cleanup=None) -> None:
    """Every rank, given every rank's pending signal: leave together if there is one."""
    for r, sig in enumerate(signals):
        if sig is not None:
            if cleanup is not None:
                cleanup()
            e = interrupt.Interrupted(sig, rank=r)
            _fail(comm, str(e), e.exit_code)


def resolve_run(run: RunConfig, model) -> RunConfig:
    """The run's "auto" types settled for this model file (RunConfig.resolved), with each
    matrix's own runtime type when the file mixes types (formats' runtime_types)."""
    types = getattr(model, "runtime_types", None)
    return run.resolved(model.preferred_weight_type(), model.output_type(),
                        types() if types is not None else None)


def start(comm, model_arg: str, run: RunConfig, want_tokenizer: bool = True,
          kv_dir: str | None = None, tokenizer_path: str | None = None,
          root_check=None, after_open=None, progress: bool = True) -> Session:
    """root_check: called first on the root (e.g. to read an input file); after_open(tokenizer,
    max_seq_len): called on the root once the model is open, before anything is loaded (e.g.
    to check the prompt's length); their DllamaError is reported like a bad model.
    progress: the root prints a line per stage on stderr (progress.py). kv_dir: as
    run.kv_cache_dir.

    Every rank checks what only it can (threads, its KV cache files and their disk space,
    the memory of its node) before anything is loaded; a signal during start-up is acted on
    at its end, by every rank together (runtime/interrupt.py)."""
    if kv_dir is not None and run.kv_cache_dir is None:
        run = dataclasses.replace(run, kv_cache_dir=kv_dir)
    interrupt.enter_session()              # signals from now on: the root decides
    return _start(comm, model_arg, run, want_tokenizer, tokenizer_path, root_check,
                  after_open, progress)


def _start(comm, model_arg, run, want_tokenizer, tokenizer_path, root_check, after_open,
           progress) -> Session:
    model = tokenizer = None
    status = None
    stages = Stages(comm.is_root and progress)
    local_ranks = comm.node_local_size()
    nthreads = run.nthreads or default_threads(comm, local_ranks)
    stages.line(first_line(comm.size, local_ranks, nthreads, run.nthreads))
    if comm.is_root:
        try:
            if root_check is not None:
                root_check()
            model, tokenizer, run = _root_open(model_arg, run, comm.size, want_tokenizer,
                                                tokenizer_path)
            if after_open is not None:
                after_open(tokenizer, run.resolved_max_seq_len(model.config))
            status = ("ok", model.config.to_dict(), run, model.path,
                      list(getattr(model, "parts", [model.path])), job_tag())
            stages.line(model_line(model, run))
        except DllamaError as e:
            status = ("error", str(e))
        if interrupt.pending() is not None:
            status = ("signal", interrupt.pending())
    status = comm.bcast_obj(status)
    if status[0] == "error":
        _fail(comm, status[1])
    if status[0] == "signal":
        _agree_signals(comm, [status[1]])
    config, run, path, files, job = (ModelConfig.from_dict(status[1]), status[2], status[3],
                                     status[4], status[5])
    me = shard.plan(config, comm.rank, comm.size)
    max_seq_len = run.resolved_max_seq_len(config)
    predicted = memory_per_rank(config, run, comm.size, nthreads)
    node = comm.allgather_obj((socket.gethostname(), os.getpid()))
    ranks = [RankInfo(r, pid, host) for r, (host, pid) in enumerate(node)]
    kv = None
    error = None
    try:
        _check_threads(nthreads)
        _check_node_memory(predicted, ranks, comm.rank)
        if run.kv_storage == "disk":   # before loading: the files, their blocks reserved
            kv = _kv_cache(config, run, me, max_seq_len, comm.rank, job)
    except DllamaError as e:
        error = str(e)
    _agree(comm, error)

    direct = _direct_load(comm, run.load, files)
    if direct and not comm.is_root:
        model = open_model(path)
    kernels.choose_threading_layer(run.weights_float_type)
    kernels.set_num_threads(nthreads)
    needs = kernels_needed(config, me, run, nthreads)
    if run.kv_cache_float_type == "f16":
        needs.add("kv_f16")
    warm_kernels(comm, needs, stages,
                 f"{run.weights_float_type} weights, {run.output_float_type} output")
    weights = load_with_progress(comm, model, config, run, direct, stages)
    pack_weights(weights)
    if direct and not comm.is_root:
        model.close()
    trim_heap()      # the heap that loading freed (read and conversion buffers)
    if kv is None:
        kv = _kv_cache(config, run, me, max_seq_len, comm.rank, job)
    transformer = Transformer(config, me, weights, kv, comm, wire=run.buffer_float_type)
    embedding = Embedding.of(model.tensor("embedding")) if comm.is_root else None
    codec = comm.bcast_obj(embedding.codec if comm.is_root else None)
    embedding = embedding or Embedding(codec)
    engine = Engine(comm, transformer, embedding)
    mine = RankMemory(comm.rank, weights.nbytes(), kv.nbytes, predicted[comm.rank].buffers,
                      kv.storage == "disk")
    everyone = comm.allgather_obj((mine, interrupt.pending()))
    _agree_signals(comm, [sig for _, sig in everyone], kv.close)
    comm.stats.reset()
    return Session(comm, config, run, engine, tokenizer, max_seq_len, nthreads,
                   [m for m, _ in everyone], ranks)


def _kv_cache(config, run, me, max_seq_len: int, rank: int, job: str) -> KVCache:
    return KVCache(config.n_layers, max_seq_len, me.kv_heads.size, config.head_dim,
                   directory=run.kv_cache_dir, tag=f"rank{rank}", n_slots=run.parallel,
                   float_type=run.kv_cache_float_type, storage=run.kv_storage, job=job,
                   commit=True)


def _check_threads(nthreads: int) -> None:
    limit = kernels.max_threads()
    if nthreads > limit:
        raise DllamaError(f"--nthreads {nthreads}: at most {limit} threads per rank here "
                          f"(the CPUs numba sees; NUMBA_NUM_THREADS sets it)")


def _check_node_memory(predicted: list[RankMemory], ranks: list[RankInfo], rank: int) -> None:
    """The memory.py totals of this node's ranks against what the node can give (MemAvailable
    and free swap, within this process's cgroup limit)."""
    mine = [m for m, info in zip(predicted, ranks) if info.host == ranks[rank].host]
    need = sum(m.total for m in mine)
    available = available_memory()
    if available is None or need <= available:
        return
    kv = sum(m.kv_cache for m in mine if not m.kv_on_disk)
    weights = sum(m.weights for m in mine)
    buffers = sum(m.buffers for m in mine)
    who = f"its {len(mine)} ranks need" if len(mine) > 1 else "this rank needs"
    raise DllamaError(f"not enough memory on {ranks[rank].host}: {who} {mib(need)} (weights "
                      f"{mib(weights)}, KV cache {mib(kv)}, buffers {mib(buffers)}), "
                      f"{mib(available)} available (lower --max-seq-len or --parallel, "
                      f"--kv-cache-float-type f16, --kv-cache-storage disk, or more nodes)")


def available_memory() -> int | None:
    """Bytes this process could still get: MemAvailable + SwapFree, capped by the cgroup's
    memory.max - memory.current (cgroup v2, as SLURM sets it) where there is one."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in
                    (line.split(":", 1) for line in f if ":" in line)}
        avail = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/proc/self/cgroup") as f:
            rel = next(line.strip().split(":", 2)[2] for line in f if line.startswith("0::"))
        folder = "/sys/fs/cgroup" + rel
        with open(os.path.join(folder, "memory.max")) as f:
            limit = f.read().strip()
        if limit != "max":
            with open(os.path.join(folder, "memory.current")) as f:
                avail = min(avail, int(limit) - int(f.read()))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return avail


def _direct_load(comm, mode: str, files: list[str]) -> bool:
    """direct: every rank reads its own slices (shared filesystem); scatter: the root reads
    and sends; auto: direct when every rank can read the model's files (every part of a
    split GGUF)."""
    if mode == "scatter" or comm.size == 1:
        return False
    readable = comm.allgather_obj(all(os.access(f, os.R_OK) for f in files))
    if all(readable):
        return True
    if mode == "direct":
        missing = [r for r, ok in enumerate(readable) if not ok]
        what = files[0] if len(files) == 1 else f"all {len(files)} parts of {files[0]}"
        _fail(comm, f"--load direct, but ranks {missing} cannot read {what}")
    return False


def run_root(session: Session, body: Callable[[Session], object],
             report: Callable[[object, list[list[StepStats]]], None] | None = None) -> int:
    """The skeleton of every command, called on every rank. Workers run forwards until the
    root stops them; the root runs body(session). Then every rank's step statistics are
    gathered and, on the root, report(body's value, steps per rank) prints the outcome.
    A DllamaError from body is one `error:` line on the root (exit 1); SIGINT/SIGTERM on any
    rank (runtime/interrupt.py) one `error: interrupted by ...` line (exit 128 + signal).
    Every rank returns the root's exit code."""
    engine, comm = session.engine, session.comm
    if not comm.is_root:
        try:
            code = engine.run_worker_loop()
            engine.gather_step_stats()
            comm.settle_notices()
        finally:
            session.close()
        return code
    error = value = None
    code = 0
    try:
        value = body(session)
    except DllamaError as e:
        error, code = e, 1
    except interrupt.Interrupted as e:
        error, code = e, e.exit_code
    finally:
        engine.stop(code)
        session.close()
    steps = engine.gather_step_stats()
    comm.settle_notices()
    if error is not None:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return code
    if report is not None:
        report(value, steps)
    return 0


def scheduler_for(session: Session, **options) -> Scheduler:
    """The root's scheduler over this session's engine: one sequence per KV slot
    (--parallel), the tokenizer's end ids and streaming decoder, and a grammar compiler for
    response_format (built lazily: nothing is compiled until a request asks)."""
    from ..grammar import GrammarCompiler
    tok = session.tokenizer
    options.setdefault("grammar", GrammarCompiler(tok, eos_ids=tok.eos_ids))
    return Scheduler(session.engine, n_slots=session.run.parallel,
                     max_seq_len=session.max_seq_len, eos_ids=tok.eos_ids,
                     decoder_factory=tok.decoder, **options)


def ignore_job_signals_on_workers(comm) -> None:
    """Nothing to do any more (kept for its callers): from start() on, every rank of a
    session only records SIGINT/SIGTERM, a worker passes its signal on to the root after its
    current step, and the root stops the job at a step boundary (runtime/interrupt.py). A
    worker that ignored them could not tell the root that it was asked to stop."""

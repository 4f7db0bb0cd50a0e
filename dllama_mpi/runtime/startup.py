"""Start-up shared by every command: open, validate, load, build the engine (start); and
the skeleton every command runs on it (run_root): workers follow the root's steps, the
root runs the command, then all ranks gather step statistics and leave together.

The root opens the model and tokenizer and validates the run before anything is
loaded; a problem there is reported once, by the root, and every rank exits.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

from .. import kernels, registry, shard
from ..comm import Comm, SerialComm
from ..config import ModelConfig, RunConfig
from ..embedding import Embedding
from ..errors import DllamaError
from ..formats import open_model
from ..kvcache import KVCache
from ..memory import RankMemory, mib
from ..memory import per_rank as memory_per_rank
from ..model import Transformer, pack_weights, trim_heap
from .engine import Engine, StepStats
from .scheduler import Scheduler
from .progress import Stages, cores, first_line, kernels_needed, load_with_progress, model_line, warm_kernels


class StartupFailed(SystemExit):
    """Raised on every rank when the root reported a start-up error (already printed on
    stderr by the root). `message` is that error's text, the same on every rank."""

    def __init__(self, code: int = 1, message: str = ""):
        super().__init__(code)
        self.message = message


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

    def close(self) -> None:
        """Release what outlives the process otherwise (the KV cache's files)."""
        self.engine.model.kv.close()

    def print_memory(self) -> None:
        """One line per rank on stderr: what it holds."""
        for m in self.memory:
            print(f"rank {m.rank}: weights {mib(m.weights)}, KV cache {mib(m.kv_cache)} "
                  f"({self.max_seq_len} positions x {self.run.parallel} slots), "
                  f"{self.nthreads} threads", file=sys.stderr)


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
    return model, tokenizer, run


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
    progress: the root prints a line per stage on stderr (progress.py)."""
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
                      list(getattr(model, "parts", [model.path])))
            stages.line(model_line(model, run))
        except DllamaError as e:
            status = ("error", str(e))
    status = comm.bcast_obj(status)
    if status[0] == "error":
        if comm.is_root:
            print(f"error: {status[1]}", file=sys.stderr)
        raise StartupFailed(1, status[1])
    config, run, path, files = ModelConfig.from_dict(status[1]), status[2], status[3], status[4]
    direct = _direct_load(comm, run.load, files)
    if direct and not comm.is_root:
        model = open_model(path)

    kernels.choose_threading_layer(run.weights_float_type)
    kernels.set_num_threads(nthreads)
    me = shard.plan(config, comm.rank, comm.size)
    warm_kernels(comm, kernels_needed(config, me, run, nthreads), stages,
                 f"{run.weights_float_type} weights, {run.output_float_type} output")
    weights = load_with_progress(comm, model, config, run, direct, stages)
    pack_weights(weights)
    if direct and not comm.is_root:
        model.close()
    trim_heap()      # the heap that loading freed (read and conversion buffers)
    max_seq_len = run.resolved_max_seq_len(config)
    kv = KVCache(config.n_layers, max_seq_len, me.kv_heads.size, config.head_dim,
                 directory=kv_dir, tag=f"rank{comm.rank}", n_slots=run.parallel)
    transformer = Transformer(config, me, weights, kv, comm, wire=run.buffer_float_type)
    embedding = Embedding.of(model.tensor("embedding")) if comm.is_root else None
    codec = comm.bcast_obj(embedding.codec if comm.is_root else None)
    embedding = embedding or Embedding(codec)
    engine = Engine(comm, transformer, embedding)
    memory = comm.allgather_obj(RankMemory(comm.rank, weights.nbytes(), kv.nbytes,
                                           memory_per_rank(config, run, comm.size)[comm.rank].buffers))
    comm.stats.reset()
    return Session(comm, config, run, engine, tokenizer, max_seq_len, nthreads, memory)


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
        message = f"--load direct, but ranks {missing} cannot read {what}"
        if comm.is_root:
            print(f"error: {message}", file=sys.stderr)
        raise StartupFailed(1, message)
    return False


def run_root(session: Session, body: Callable[[Session], object],
             report: Callable[[object, list[list[StepStats]]], None] | None = None) -> int:
    """The skeleton of every command, called on every rank. Workers run forwards until the
    root stops them; the root runs body(session). Then every rank's step statistics are
    gathered and, on the root, report(body's value, steps per rank) prints the outcome.
    A DllamaError from body is one `error:` line on the root. Returns the exit code."""
    engine = session.engine
    if not session.comm.is_root:
        try:
            engine.run_worker_loop()
            engine.gather_step_stats()
        finally:
            session.close()
        return 0
    error = value = None
    try:
        value = body(session)
    except DllamaError as e:
        error = e
    finally:
        engine.stop()
        session.close()
    steps = engine.gather_step_stats()
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
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
    """Launchers forward SIGINT/SIGTERM to every rank. A worker that died of one mid-collective
    would take the job down before the root could stop it cleanly: workers ignore them and
    leave when the root's stop step arrives."""
    if not comm.is_root:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

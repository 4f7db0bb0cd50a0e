"""What start-up tells the user on rank 0, on stderr: one line per stage (the model, compiling
kernels, loading), and a counter for the long ones — a bar on a terminal, plain lines
every few seconds otherwise (under mpiexec or SLURM stderr is a pipe or a file, where a bar
would show nothing until the end, or a mess)."""
from __future__ import annotations

import os
import sys
import time

from .. import kernels, shard
from ..config import ModelConfig, RunConfig
from ..loading import load_shard

PLAIN_EVERY = 10.0      # seconds between plain progress lines


class Stages:
    """Stage lines on `stream` (stderr), or nothing when disabled (workers, --quiet)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def counter(self, desc: str, total: int, unit: str, every: float = PLAIN_EVERY):
        """A progress count of `total` `unit`s: update(k) after each k done, close() at the
        end. A tqdm bar on a terminal; elsewhere a line every `every` seconds."""
        if not self.enabled or total <= 0:
            return _NoCounter()
        if _isatty(self.stream):
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False,
                        dynamic_ncols=True)
        return _PlainCounter(self.stream, desc, total, unit, every)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _NoCounter:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _PlainCounter:
    """`desc: done/total unit (p%, s)` every `every` seconds while it runs."""

    def __init__(self, stream, desc: str, total: int, unit: str, every: float):
        self.stream, self.desc, self.total, self.unit, self.every = stream, desc, total, unit, every
        self.done = 0
        self.postfix = ""
        self.t0 = self.last = time.monotonic()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            extra = f", {self.postfix}" if self.postfix else ""
            if not self.every:      # a line per step: say which one is done
                extra = f", {self.postfix} done" if self.postfix else ""
            self.stream.write(f"{self.desc}: {self.done}/{self.total} {self.unit} "
                              f"({100 * self.done // self.total}%, {now - self.t0:.0f} s{extra})\n")
            self.stream.flush()

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- start-up's stages

def first_line(ranks: int, local_ranks: int, nthreads: int, asked: int) -> str:
    """What this run is, before anything slow: ranks, threads and why."""
    n = cores()
    how = "--nthreads" if asked else f"{n} core{'s' * (n > 1)} / {local_ranks} rank{'s' * (local_ranks > 1)} here"
    line = (f"dllama_mpi: {ranks} rank{'s' * (ranks > 1)} x {nthreads} thread"
            f"{'s' * (nthreads > 1)} ({how}); progress on stderr, the text on stdout")
    if local_ranks * nthreads > n:
        line += (f"\nnote: {local_ranks} rank{'s' * (local_ranks > 1)} x {nthreads} thread"
                 f"{'s' * (nthreads > 1)} on {n} core{'s' * (n > 1)}: oversubscribed, every "
                 f"reduction waits for a descheduled rank (fewer ranks, e.g. -n 1, run faster)")
    return line


def model_line(model, run: RunConfig) -> str:
    c = model.config
    return (f"model: {model.path} ({model.format}, {c.arch}, {c.n_layers} layers, dim {c.dim}); "
            f"weights {run.weights_float_type}, output matrix {run.output_float_type}, "
            f"wire {run.buffer_float_type}, context {run.resolved_max_seq_len(c)}")


def kernels_needed(config: ModelConfig, p, run: RunConfig, nthreads: int) -> set[str]:
    w, o = run.weights_float_type, run.output_float_type
    layers = set(run.tensor_types.values()) if run.tensor_types else {w}
    matrices = [(t, cols) for t in layers for cols in (config.dim, p.q_cols, p.ffn_len)]
    matrices.append((o, config.dim))
    plain = not (config.qk_norm or config.attn_bias or config.n_experts)
    return kernels.needed(matrices, p.ffn_len, nthreads, config.qk_norm, config.n_experts > 0,
                          whole_layers=p.size == 1 and plain)


def warm_kernels(comm, needs: set[str], stages: Stages, what: str = "") -> None:
    """Compile (or load from numba's cache) on the root first — every rank's kernels —, so
    ranks never race to write the same cache files; then everyone else loads them. The
    root says so when the cache lacks them (a first run), with an estimate and a count.
    When the cache has them all, every rank loads its own at the same time."""
    every = set().union(*comm.allgather_obj(needs))
    cached, seconds = kernels.warmup_is_cached(every) if comm.is_root else (None, 0)
    if comm.bcast_obj(cached):      # all in the cache: every rank loads its own at once
        kernels.warmup(needs)
        return
    if comm.is_root:
        bar = None
        if stages.enabled:
            stages.line(f"compiling numba kernels{' for ' + what if what else ''}: first run only, "
                        f"about {_rough(seconds)}{_busy()}; cached afterwards in "
                        f"{_home(os.environ.get('NUMBA_CACHE_DIR', 'numba cache'))}")
            bar = stages.counter("compiling kernels", len(kernels._steps(every)), "steps", every=0)
        t0 = time.monotonic()
        previous = [""]

        def step(done, total, name):
            if bar is not None and done:
                bar.set_postfix_str(previous[0])
                bar.update(1)
            previous[0] = name
        kernels.warmup(every, progress=step)
        if bar is not None:
            bar.close()
            stages.line(f"kernels compiled in {time.monotonic() - t0:.0f} s")
    _quiet_barrier(comm)
    if not comm.is_root:
        kernels.warmup(needs)


def _busy() -> str:
    """The estimate is for a free core: say so when the machine is busy."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    n = cores()
    return f" on a free core (load here {load:.1f} on {n} cores: longer)" if load > n else ""


def _rough(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _home(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "/" and path.startswith(home + os.sep) else path


def _quiet_barrier(comm) -> None:
    """A barrier that sleeps while it waits (MPI's spins a core, which the root's compiler
    needs on a small machine)."""
    world = getattr(comm, "world", None)
    if world is None:
        comm.barrier()
        return
    request = world.Ibarrier()
    while not request.Test():
        time.sleep(0.01)


class _CountingModel:
    """The open model, counting the tensors the loader takes from it (loading's progress)."""

    def __init__(self, model, counter):
        self._model, self._counter = model, counter

    def tensor(self, name: str):
        self._counter.update(1)
        return self._model.tensor(name)

    def __getattr__(self, name):
        return getattr(self._model, name)


def load_with_progress(comm, model, config: ModelConfig, run: RunConfig, direct: bool, stages: Stages):
    """load_shard, with the root's progress: a bar on a terminal, plain lines otherwise."""
    if not comm.is_root or not stages.enabled:
        return load_shard(comm, model, config, run, progress=False, direct=direct)
    t0 = time.monotonic()
    total = len(shard.tensor_specs(config))
    how = "reading every rank's slice from the file" if direct else (
        "sending each rank its slice" if comm.size > 1 else "one rank")
    stages.line(f"loading {total} tensors ({how})")
    bar = stages.counter("loading", total, "tensors")
    try:
        weights = load_shard(comm, _CountingModel(model, bar), config, run, progress=False,
                             direct=direct)
    finally:
        bar.close()
    stages.line(f"loaded in {time.monotonic() - t0:.1f} s")
    return weights

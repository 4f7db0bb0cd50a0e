"""`batch`: a file of requests -> a file of results, on the scheduler, resumable.

    mpiexec -n 2 python -m dllama_mpi batch --model M --input requests.jsonl --output out.jsonl

Input: the OpenAI Batch API JSONL, the simple JSONL ({"prompt"} / {"messages"}), or plain text
(batch_io). Output: one OpenAI Batch output record per request, appended as requests finish,
the body being what the server answers (batch_requests). A request that cannot run gets an
error record and the rest goes on. Rerunning the same command skips the custom_ids already in
the output (a torn last line is dropped first) and runs only what is missing.

Exit codes: 0 every request has its record (some may be error records); 1 a fatal error
(model, unreadable input, an output that is not ours); 2 a bad command line; 75
(EXIT_RESUMABLE) stopped by SIGTERM/SIGUSR1/SIGINT before every request had its record:
rerun the same command to resume (jobs/batch.sbatch turns it into `scontrol requeue`).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

from ..comm import make_comm
from ..config import SamplingParams
from ..errors import DllamaError
from ..registry import served_name
from ..runtime.startup import run_root, scheduler_for, start
from . import batch_io, batch_records
from .batch_loop import BatchLoop, Stats
from .batch_signals import StopFlag

EXIT_RESUMABLE = 75          # sysexits EX_TEMPFAIL: "try again later"


class Progress:
    """Done/total on stderr (rank 0): a tqdm bar on a terminal, else one plain line every
    `every` seconds (under mpiexec and SLURM stderr is never a terminal)."""

    def __init__(self, total: int, every: float, quiet: bool, stream=sys.stderr):
        self.total, self.every, self.quiet, self.stream = total, every, quiet, stream
        self.done = self.failed = self.new = self.tokens = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if not quiet and hasattr(stream, "isatty") and stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="req", file=stream, dynamic_ncols=True,
                            desc="batch")

    def skip(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def record(self, ok: bool, tokens: int) -> None:
        self.done += 1
        self.new += 1
        self.failed += not ok
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.rate():.1f} tok/s, {self.failed} failed",
                                     refresh=False)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def tick(self) -> None:
        if self.bar is None and not self.quiet and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        eta = "?"
        if self.new and self.total >= self.done:
            eta = _clock((self.total - self.done) * elapsed / self.new)
        return (f"batch: {self.done}/{self.total} requests ({self.failed} failed), "
                f"{self.rate():.1f} tok/s, elapsed {_clock(elapsed)}, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Plan:
    """What the root learns before the model loads: the input's format and size, what the
    output already holds (a torn last line is cut off here)."""

    def __init__(self, args):
        self.args = args
        self.format = self.total = self.done = None
        self.output = self.errors = None          # RecordWriters (root), locked

    def close(self) -> None:
        for w in (self.output, self.errors):
            if w is not None:
                w.close()

    def check(self) -> None:
        a = self.args
        paths = [os.path.abspath(p) for p in (a.input, a.output, a.errors) if p]
        if len(set(paths)) != len(paths):
            raise DllamaError("--input, --output and --errors must be three different files")
        self.format = (batch_io.detect_format(a.input) if a.input_format == "auto"
                       else a.input_format)
        self.total = batch_io.count_requests(a.input)
        if self.total == 0:
            raise DllamaError(f"{a.input} holds no requests")
        batch_records.check_writable(a.output)
        if a.errors:
            batch_records.check_writable(a.errors)
        # the locks first (a second batch on these files stops here), then what they hold
        try:
            self.output = batch_records.RecordWriter(a.output, a.fsync_seconds)
            if a.errors:
                self.errors = batch_records.RecordWriter(a.errors, a.fsync_seconds)
            self.done = batch_records.scan_records(a.output)
            if a.errors:
                batch_records.scan_records(a.errors, self.done)
        except BaseException:
            self.close()
            raise
        print(f"batch: {self.total} requests in {a.input} ({self.format} format)",
              file=sys.stderr, flush=True)
        if self.done.dropped:
            print(f"batch: dropped a torn last line ({self.done.dropped} bytes) from the output",
                  file=sys.stderr)
        if self.done.records:
            print(f"batch: resuming: {self.done.records} of {self.total} requests already have "
                  "a record", file=sys.stderr)


def run_batch(args, run, stop: StopFlag) -> int:
    """Every rank. `stop`: the flag the stop signals set on the root (installed by the caller,
    workers ignore them). Returns the exit code, the same on every rank."""
    comm = make_comm()
    plan = _Plan(args)
    run = replace(run, parallel=args.max_batch)
    try:
        session = start(comm, args.model, run, kv_dir=args.kv_cache_dir,
                        tokenizer_path=args.tokenizer, root_check=plan.check)
    except BaseException:
        plan.close()                   # a file created for nothing is removed
        raise
    result: list[Stats] = []
    code = run_root(session, lambda s: _body(s, args, plan, stop, result), _report(args))
    if code == 0 and result and not result[0].complete:
        code = EXIT_RESUMABLE
    return comm.bcast_obj(code if comm.is_root else None)


def _body(session, args, plan: _Plan, stop: StopFlag, result: list) -> Stats:
    run = session.run
    defaults = SamplingParams(temperature=run.temperature, top_p=run.topp, top_k=run.topk,
                              max_tokens=args.steps, ignore_eos=args.ignore_eos)
    output, errors = plan.output, plan.errors
    progress = Progress(plan.total, args.progress_seconds, args.quiet)
    try:
        tok = session.tokenizer
        scheduler = scheduler_for(session)
        loop = BatchLoop(scheduler, tok, session.max_seq_len,
                         batch_io.read_items(args.input, plan.format, args.chat),
                         plan.done, output, errors, defaults, run.seed, args.max_batch,
                         args.model_name or served_name(args.model), stop, progress,
                         stop_timeout=args.stop_timeout)
        stats = loop.run()
        stats.total = plan.total
        result.append(stats)
        if stats.complete and args.output_order == "input":     # still holding the locks
            keys = list(_input_keys(args, plan.format))
            for w in (output, errors):
                if w is not None:
                    w.sync()
                    batch_records.reorder(w.path, keys)
    finally:
        progress.close()
        plan.close()
    return stats


def _input_keys(args, fmt: str):
    """(custom_id, occurrence) of every input line, in input order."""
    seen: dict[str, int] = {}
    for item in batch_io.read_items(args.input, fmt, args.chat):
        k = seen.get(item.custom_id, 0)
        seen[item.custom_id] = k + 1
        yield item.custom_id, k


def _report(args):
    def report(stats: Stats, steps) -> None:
        s = stats
        print(f"batch: {s.ok} ok, {s.failed} failed, {s.skipped} already done"
              + (f", {s.abandoned} abandoned" if s.abandoned else "")
              + f"; prompts {s.prompt_tokens} tokens, generated {s.generated_tokens} tokens in "
              f"{s.seconds:.2f} s: {s.tokens_per_s:.1f} tok/s aggregate -> {args.output}",
              file=sys.stderr, flush=True)
        if not s.complete:
            why = f"stopped by {s.stopped_by}" if s.stopped_by else "stopped"
            print(f"batch: {why}: {s.ok + s.failed + s.skipped} of {s.total} requests have a "
                  f"record; rerun the same command to resume (exit code {EXIT_RESUMABLE})",
                  file=sys.stderr, flush=True)
    return report

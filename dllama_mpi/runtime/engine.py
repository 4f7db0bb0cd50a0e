"""The root/worker step loop: the root decides each forward, every rank runs it.

The root broadcasts a step packet (n_tokens, first position, flags, KV slot) and the
tokens' embedding rows as the file stores them; all ranks run the same forward on their shard; n_tokens == 0 means stop.
A step is either one sequence's tokens at consecutive positions in one KV slot, or (flag
ROWS) rows of several sequences, each with its own position and slot (sent as int32
[2 * n_tokens] after the packet): the decode step of sequences generated together, or a
scheduler step mixing decode rows with a prompt chunk. With FLAG_LOGIT_ROWS the packet's
position word holds a count n and the int32 array carries n row indices after the
positions and slots: logits are computed for those rows only.
The engine knows token ids only: text lives with the tokenizer on the root.

Signals (runtime/interrupt.py): ranks of a session only record them. The root checks,
before it broadcasts a step, for a signal of its own or a worker's notice, and raises
Interrupted there (nothing of the step has been sent); stop(code) then sends the workers
the exit code in the stop packet. A worker passes its signal on after its current step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DllamaError
from . import interrupt
from .interrupt import Interrupted

if TYPE_CHECKING:
    from ..comm import Comm, SerialComm
    from ..embedding import Embedding
    from ..model import Transformer

FLAG_ALL_LOGITS = 1
FLAG_ROWS = 2        # rows carry their own positions and KV slots
FLAG_LOGIT_ROWS = 4  # with FLAG_ROWS: logits of chosen rows only (header[1] = their count)
FLAG_COPY_KV = 8     # no forward: copy positions 0..n_tokens-1 of KV slot header[1] to header[3]


def _check_finite(logits: np.ndarray, position: int) -> None:
    """Root, after a step (every rank has finished it): NaN or inf logits come from corrupt
    weights (or values beyond f32); sampling them would be garbage or a numpy error."""
    if logits is not None and not np.isfinite(logits).all():
        raise DllamaError(f"the model produced NaN or infinite logits (step at position "
                          f"{position}): its weights are corrupt, or its values overflow")


@dataclass
class StepStats:
    n_tokens: int
    seconds: float
    sync_seconds: float
    bytes_sent: int
    bytes_recv: int

    @property
    def compute_seconds(self) -> float:
        return self.seconds - self.sync_seconds


@dataclass
class Engine:
    comm: Comm | SerialComm
    model: Transformer       # this rank's shard
    embedding: Embedding     # stored rows (read on the root) -> f32 on every rank
    steps: list[StepStats] = field(default_factory=list)

    # -- root --------------------------------------------------------------------------
    def forward(self, tokens, pos: int, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Root: run one sequence's tokens at positions pos.. (KV slot `slot`) on every rank;
        logits [T or 1, vocab]."""
        t = len(tokens)
        header = np.array([t, pos, FLAG_ALL_LOGITS if all_logits else 0, slot], np.int32)
        self._check_signals()
        start, s0 = time.perf_counter(), self._snapshot()
        self.comm.bcast_step(header)
        x = self.embedding.decode(self.comm.bcast_array(self.embedding.rows(tokens)))
        logits = self.model.forward(x, np.arange(pos, pos + t, dtype=np.int32), all_logits,
                                    np.full(t, slot, np.int32) if slot else None)
        self._record(t, start, s0)
        _check_finite(logits, pos)
        return logits

    def _check_signals(self) -> None:
        """Root, before a step is broadcast: raise Interrupted for a signal received here or
        by a worker (its notice)."""
        interrupt.check()
        notice = self.comm.poll_notice()
        if notice is not None:
            raise Interrupted(notice[1], rank=notice[0])

    def forward_rows(self, tokens, positions, slots, logit_rows=None) -> np.ndarray:
        """Root: one step of rows of several sequences (token i at positions[i] of the
        sequence in KV slot slots[i]; rows of one sequence in position order, all written to
        the KV cache before any attends). Logits [T, vocab], one row per token, or with
        logit_rows (row indices) [len(logit_rows), vocab] for those rows only."""
        t = len(tokens)
        if logit_rows is None:
            header = [t, 0, FLAG_ALL_LOGITS | FLAG_ROWS, 0]
            packet = np.concatenate([positions, slots])
        else:
            header = [t, len(logit_rows), FLAG_ROWS | FLAG_LOGIT_ROWS, 0]
            packet = np.concatenate([positions, slots, logit_rows])
        self._check_signals()
        start, s0 = time.perf_counter(), self._snapshot()
        self.comm.bcast_step(np.array(header, np.int32))
        rows = self.comm.bcast_array(packet.astype(np.int32))
        x = self.embedding.decode(self.comm.bcast_array(self.embedding.rows(tokens)))
        logits = self._forward_rows(x, t, header[2], rows)
        self._record(t, start, s0)
        _check_finite(logits, int(np.min(positions)) if t else 0)
        return logits

    def _forward_rows(self, x, t: int, flags: int, rows: np.ndarray):
        positions, slots = rows[:t], rows[t:2 * t]
        if flags & FLAG_LOGIT_ROWS:
            return self.model.forward(x, positions, False, slots, logit_rows=rows[2 * t:])
        return self.model.forward(x, positions, True, slots)

    def copy_kv(self, src: int, dst: int, n_positions: int) -> None:
        """Root: on every rank, positions 0..n_positions-1 of KV slot src are copied to slot
        dst (a prompt prefix another sequence already computed)."""
        self._check_signals()
        self.comm.bcast_step(np.array([n_positions, src, FLAG_COPY_KV, dst], np.int32))
        self.model.kv.copy_prefix(src, dst, n_positions)

    def stop(self, exit_code: int = 0) -> None:
        """Root: tell the workers to leave their loop (and the code to exit with)."""
        with interrupt.deferred():
            self.comm.bcast_step(np.array([0, exit_code, 0, 0], np.int32))

    # -- workers -----------------------------------------------------------------------
    def run_worker_loop(self) -> int:
        """Worker: run forwards until the root sends n_tokens == 0; the exit code it sent.
        A signal received here is passed on to the root after the step (the root decides)."""
        while True:
            signum = interrupt.pending()
            if signum is not None:
                self.comm.notify_root(signum)
            start, s0 = time.perf_counter(), self._snapshot()
            header = self.comm.bcast_step(None)
            t, pos, flags, slot = (int(v) for v in header[:4])
            if t == 0:
                return pos
            if flags & FLAG_COPY_KV:
                self.model.kv.copy_prefix(pos, slot, t)
                continue
            if flags & FLAG_ROWS:
                n = pos if flags & FLAG_LOGIT_ROWS else 0
                rows = self.comm.bcast_array(np.empty(2 * t + n, np.int32))
                x = self.embedding.decode(self.comm.bcast_array(self.embedding.empty(t)))
                self._forward_rows(x, t, flags, rows)
            else:
                positions = np.arange(pos, pos + t, dtype=np.int32)
                slots = np.full(t, slot, np.int32) if slot else None
                x = self.embedding.decode(self.comm.bcast_array(self.embedding.empty(t)))
                self.model.forward(x, positions, bool(flags & FLAG_ALL_LOGITS), slots)
            self._record(t, start, s0)

    # -- statistics --------------------------------------------------------------------
    def _snapshot(self):
        s = self.comm.stats
        return s.sync_seconds, s.bytes_sent, s.bytes_recv

    def _record(self, t: int, start: float, s0) -> None:
        s = self.comm.stats
        self.steps.append(StepStats(t, time.perf_counter() - start, s.sync_seconds - s0[0],
                                    s.bytes_sent - s0[1], s.bytes_recv - s0[2]))

    def gather_step_stats(self) -> list[list[StepStats]] | None:
        """Every rank's step statistics, on the root (call on all ranks after stop)."""
        rows = [(s.n_tokens, s.seconds, s.sync_seconds, s.bytes_sent, s.bytes_recv)
                for s in self.steps]
        with interrupt.deferred():
            everyone = self.comm.allgather_obj(rows)
        return [[StepStats(*r) for r in rank_rows] for rank_rows in everyone]

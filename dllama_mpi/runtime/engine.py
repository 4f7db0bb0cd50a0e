"""The root/worker step loop: the root decides each forward, every rank runs it.

The root broadcasts a step packet (n_tokens, first position, flags, KV slot) and the
tokens' embedding rows as the file stores them; all ranks run the same forward on their shard; n_tokens == 0 means stop.
A step is either one sequence's tokens at consecutive positions in one KV slot, or (flag
ROWS) rows of several sequences, each with its own position and slot (sent as int32
[2, n_tokens] after the packet): the decode step of sequences generated together.
The engine knows token ids only: text lives with the tokenizer on the root.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..comm import STEP_HEADER

if TYPE_CHECKING:
    from ..comm import Comm, SerialComm
    from ..embedding import Embedding
    from ..model import Transformer

FLAG_ALL_LOGITS = 1
FLAG_ROWS = 2        # rows carry their own positions and KV slots


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
        start, s0 = time.perf_counter(), self._snapshot()
        self.comm.bcast_step(header)
        x = self.embedding.decode(self.comm.bcast_array(self.embedding.rows(tokens)))
        logits = self.model.forward(x, np.arange(pos, pos + t, dtype=np.int32), all_logits,
                                    np.full(t, slot, np.int32) if slot else None)
        self._record(t, start, s0)
        return logits

    def forward_rows(self, tokens, positions, slots) -> np.ndarray:
        """Root: one token of each of several sequences (token i at positions[i] of the
        sequence in KV slot slots[i]); logits [T, vocab], one row per token."""
        t = len(tokens)
        start, s0 = time.perf_counter(), self._snapshot()
        self.comm.bcast_step(np.array([t, 0, FLAG_ALL_LOGITS | FLAG_ROWS, 0], np.int32))
        rows = self.comm.bcast_array(np.array([positions, slots], np.int32).reshape(2, t))
        x = self.embedding.decode(self.comm.bcast_array(self.embedding.rows(tokens)))
        logits = self.model.forward(x, rows[0], True, rows[1])
        self._record(t, start, s0)
        return logits

    def stop(self) -> None:
        """Root: tell the workers to leave their loop."""
        self.comm.bcast_step(np.zeros(STEP_HEADER, np.int32))

    # -- workers -----------------------------------------------------------------------
    def run_worker_loop(self) -> None:
        """Worker: run forwards until the root sends n_tokens == 0."""
        while True:
            start, s0 = time.perf_counter(), self._snapshot()
            header = self.comm.bcast_step(None)
            t, pos, flags, slot = (int(v) for v in header[:4])
            if t == 0:
                return
            if flags & FLAG_ROWS:
                rows = self.comm.bcast_array(np.empty((2, t), np.int32))
                positions, slots = rows[0], rows[1]
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
        everyone = self.comm.allgather_obj(rows)
        return [[StepStats(*r) for r in rank_rows] for rank_rows in everyone]

"""Every MPI call of the program lives here.

`Comm` wraps an mpi4py communicator; `SerialComm` has the same methods for one process,
so the model and most tests never need MPI. Hot-path methods use mpi4py's uppercase
buffer calls on preallocated numpy arrays; lowercase (pickle) calls only carry small
control objects.

Reductions are an Allgather of every rank's partial sum followed by a sum in rank
order, so every rank gets bit-identical results (an MPI_SUM tree does not promise that),
on an F32 wire or a Q80 wire (GGML Q8_0 blocks: 34 bytes per 32 values).

Byte counters are logical payload: what this rank hands to / receives from others.
"""
from __future__ import annotations

import time

import numpy as np

from .quant import QK

STEP_HEADER = 4  # int32 words: n_tokens, first position, flags, KV slot (engine.py)
NOTICE_TAG = 29  # a worker's "I got SIGINT/SIGTERM" to the root (runtime/interrupt.py)


class CommStats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.sync_seconds = 0.0
        self.bytes_sent = 0
        self.bytes_recv = 0


class _Base:
    """Methods shared by both communicators."""

    rank: int
    size: int
    sums_identity = False   # allreduce_sum returns its input unchanged (one process, no wire)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _reduce_buffers(self, shape, wire):
        """(send, recv, out) for a reduction of `shape` [T, n]: views of the first T rows of
        arenas kept per (n, wire) and sized for the most rows so far, so the memory is one
        set of the largest T whatever mix of row counts runs (memory.py counts that)."""
        key = (shape, wire)
        buf = self._buffers.get(key)
        if buf is not None:
            return buf
        t, n = shape
        if wire == "q80" and n % QK:
            raise ValueError(f"Q80 wire needs dim % {QK} == 0, got {n}")
        per_row = n + (n // QK) * 2 if wire == "q80" else n * 4  # int8 values, f16 scales
        arena = self._arenas.get((n, wire))
        if arena is None or arena[0] < t:
            arena = self._arenas[(n, wire)] = (
                t, np.empty(t * per_row, np.uint8), np.empty(self.size * t * per_row, np.uint8),
                np.empty((t, n), np.float32))
            self._buffers = {k: v for k, v in self._buffers.items() if k[0][1] != n or k[1] != wire}
        per_rank = t * per_row
        buf = (arena[1][:per_rank], arena[2][:self.size * per_rank].reshape(self.size, per_rank),
               arena[3][:t])
        self._buffers[key] = buf
        return buf


class SerialComm(_Base):
    """One process: collectives are identities."""

    sums_identity = True

    def __init__(self):
        self.rank, self.size = 0, 1
        self.stats = CommStats()
        self._buffers = {}
        self._arenas = {}

    def bcast_obj(self, obj):
        return obj

    def bcast_array(self, arr: np.ndarray) -> np.ndarray:
        return arr

    def bcast_step(self, header: np.ndarray | None) -> np.ndarray:
        return header

    def allreduce_sum(self, partial: np.ndarray, wire: str = "f32") -> np.ndarray:
        return partial

    def gather_rows(self, local: np.ndarray, counts: list[int]) -> np.ndarray | None:
        return local.copy()      # a new array, as from the ranks (local is a reused buffer)

    def send_array(self, arr: np.ndarray, dest: int) -> None:
        raise RuntimeError("SerialComm has no other rank")

    def recv_array(self, out: np.ndarray, source: int = 0) -> np.ndarray:
        raise RuntimeError("SerialComm has no other rank")

    def allgather_obj(self, obj):
        return [obj]

    def node_local_size(self) -> int:
        return 1

    def barrier(self):
        pass

    def abort(self, code: int = 1):
        raise SystemExit(code)

    def notify_root(self, signum: int) -> None:
        pass

    def poll_notice(self):
        return None

    def settle_notices(self) -> None:
        pass


class Comm(_Base):
    def __init__(self, mpi_comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.world = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.stats = CommStats()
        self._buffers = {}
        self._arenas = {}
        self._notice = None            # this worker's notice send (a request), once sent
        self._notices_received = 0     # root: notices received by poll_notice

    # -- control ----------------------------------------------------------------------
    def bcast_obj(self, obj):
        return self.world.bcast(obj, root=0)

    def allgather_obj(self, obj):
        return self.world.allgather(obj)

    def node_local_size(self) -> int:
        """Ranks sharing this rank's node (its memory and cores)."""
        local = self.world.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_size()
        finally:
            local.Free()

    def barrier(self):
        self.world.Barrier()

    def abort(self, code: int = 1):
        self.world.Abort(code)

    # -- signals (runtime/interrupt.py) -------------------------------------------------
    def notify_root(self, signum: int) -> None:
        """Worker: tell the root this rank got `signum` (once; completed by settle_notices)."""
        if self._notice is None:
            self._notice_buf = np.array([signum], np.int32)
            self._notice = self.world.Isend(self._notice_buf, dest=0, tag=NOTICE_TAG)

    def poll_notice(self) -> tuple[int, int] | None:
        """Root: (rank, signal) of a worker's notice waiting, else None (no wait)."""
        status = self.MPI.Status()
        if not self.world.Iprobe(source=self.MPI.ANY_SOURCE, tag=NOTICE_TAG, status=status):
            return None
        buf = np.empty(1, np.int32)
        self.world.Recv(buf, source=status.Get_source(), tag=NOTICE_TAG)
        self._notices_received += 1
        return status.Get_source(), int(buf[0])

    def settle_notices(self) -> None:
        """Every rank, at the end: the root receives the notices it has not polled yet, the
        workers complete their sends, so nothing is left in flight at MPI_Finalize."""
        sent = self.world.allgather(self._notice is not None)
        if self.is_root:
            for _ in range(sum(sent) - self._notices_received):
                self.world.Recv(np.empty(1, np.int32), source=self.MPI.ANY_SOURCE,
                                tag=NOTICE_TAG)
            self._notices_received = 0
        elif self._notice is not None:
            self._notice.Wait()
            self._notice = None

    def _count_bcast(self, nbytes: int):
        if self.is_root:
            self.stats.bytes_sent += nbytes * (self.size - 1)
        else:
            self.stats.bytes_recv += nbytes

    def bcast_step(self, header: np.ndarray | None) -> np.ndarray:
        """Root's step packet (int32[STEP_HEADER]) to every rank."""
        t0 = time.perf_counter()
        buf = header if self.is_root else np.empty(STEP_HEADER, np.int32)
        self.world.Bcast(buf, root=0)
        self._count_bcast(buf.nbytes)
        self.stats.sync_seconds += time.perf_counter() - t0
        return buf

    def bcast_array(self, arr: np.ndarray) -> np.ndarray:
        """Root's arr (workers pass a preallocated array of the same shape) to every rank."""
        t0 = time.perf_counter()
        self.world.Bcast(arr, root=0)
        self._count_bcast(arr.nbytes)
        self.stats.sync_seconds += time.perf_counter() - t0
        return arr

    # -- the two reductions per layer ------------------------------------------------
    def allreduce_sum(self, partial: np.ndarray, wire: str = "f32") -> np.ndarray:
        """Sum of every rank's partial [T, dim] in rank order; identical bits everywhere."""
        t, n = partial.shape
        send, recv, out = self._reduce_buffers((t, n), wire)
        if wire == "q80":
            _pack_q80(send, partial)
        else:
            send.view(np.float32)[:] = partial.reshape(-1)
        t0 = time.perf_counter()
        self.world.Allgather(send, recv)
        self.stats.sync_seconds += time.perf_counter() - t0
        self.stats.bytes_sent += send.nbytes * (self.size - 1)
        self.stats.bytes_recv += send.nbytes * (self.size - 1)
        if wire == "q80":
            _sum_q80(out, recv, t, n)
        else:
            vals = recv.view(np.float32).reshape(self.size, t, n)
            out[:] = vals[0]
            for r in range(1, self.size):
                out += vals[r]
        return out

    def gather_rows(self, local: np.ndarray, counts: list[int]) -> np.ndarray | None:
        """Concatenate every rank's column band of [T, cols_r] on root (logits slices)."""
        t = local.shape[0]
        t0 = time.perf_counter()
        send = np.ascontiguousarray(local.T)  # [cols_r, T]: each rank's band is contiguous
        if self.is_root:
            full = np.empty((sum(counts), t), np.float32)
            self.world.Gatherv(send, [full, [c * t for c in counts], self.MPI.FLOAT], root=0)
            self.stats.bytes_recv += (full.nbytes - send.nbytes)
            result = np.ascontiguousarray(full.T)
        else:
            self.world.Gatherv(send, None, root=0)
            self.stats.bytes_sent += send.nbytes
            result = None
        self.stats.sync_seconds += time.perf_counter() - t0
        return result

    # -- weights ----------------------------------------------------------------------
    def send_array(self, arr: np.ndarray, dest: int) -> None:
        arr = np.ascontiguousarray(arr)
        self.world.Send(arr, dest=dest, tag=7)
        self.stats.bytes_sent += arr.nbytes

    def recv_array(self, out: np.ndarray, source: int = 0) -> np.ndarray:
        self.world.Recv(out, source=source, tag=7)
        self.stats.bytes_recv += out.nbytes
        return out


def _pack_q80(send: np.ndarray, partial: np.ndarray) -> None:
    """partial [T, n] f32 -> int8 values then f16 scales, in one byte buffer."""
    from .kernels import quantize_q80_act
    t, n = partial.shape
    qs = send[: t * n].view(np.int8).reshape(t, n)
    d = np.empty((t, n // QK), np.float32)
    quantize_q80_act(qs, d, np.ascontiguousarray(partial, dtype=np.float32))
    send[t * n:].view(np.float16)[:] = d.reshape(-1)


def _sum_q80(out: np.ndarray, recv: np.ndarray, t: int, n: int) -> None:
    size = recv.shape[0]
    qs = recv[:, : t * n].view(np.int8).reshape(size, t, n // QK, QK)
    d = recv[:, t * n:].copy().view(np.float16).astype(np.float32).reshape(size, t, n // QK, 1)
    out[:] = (qs[0] * d[0]).reshape(t, n)
    for r in range(1, size):
        out += (qs[r] * d[r]).reshape(t, n)


def abort_world(code: int) -> None:
    """End every rank of the job (a rank left waiting in a collective would hang it)."""
    from mpi4py import MPI
    MPI.COMM_WORLD.Abort(code)


def make_comm(use_mpi: bool | None = None):
    """Comm over MPI.COMM_WORLD when there is more than one rank or MPI is asked for."""
    if use_mpi is False:
        return SerialComm()
    from mpi4py import MPI
    if use_mpi or MPI.COMM_WORLD.Get_size() > 1:
        return Comm(MPI.COMM_WORLD)
    return SerialComm()

"""A barrier for the threads of one parallel region, so that a region can hold steps that
each need the whole of the step before (a matmul split by rows reads every row of its input).

numba's ``prange`` has no barrier: a region ends where its threads join, and starting one
costs ~10-20 µs. With one chunk per thread (``prange(nch)``, nch = the thread count: OpenMP's
static schedule gives each thread one chunk) the chunks run at once, and they can meet at a
counter: each adds one to it; the last resets it and advances a generation number that the
others wait on (spinning with ``pause``, then giving the core away with ``sched_yield`` when a
thread is slow to come: an oversubscribed node). A region counts the yields that gave the core
away (timed: one that finds no other thread returns at once): on a busy node a thread that waits
may hand its core to another process for a whole time slice, and the caller then runs its steps
another way for a while (``fused_layer``).

That the chunks run at once is not a given (a threading layer may run two chunks on one
thread, one after the other, and the first would wait for ever), so a region first meets at
``_rendezvous``, which waits a bounded time: if not every chunk arrives, every chunk returns
False and the caller runs its steps another way.

The state is an int64 array of ``STATE_LEN`` (``barrier_state``): the counter, the generation,
and the rendezvous' arrival count, each on a cache line of its own.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import _inline

_COUNT, _GEN, _ARRIVED = 0, 8, 16
STATE_LEN = 24
_FAILED_MARK = np.int64(1 << 40)   # added to the arrival count by a rendezvous that gave up
_SPINS = 4000                   # pause instructions before each sched_yield while waiting
_RENDEZVOUS_YIELDS = 2000       # sched_yield calls before the rendezvous gives up (~0.1-0.2 s)
# a sched_yield that returns this many time-stamp cycles later (~0.1-0.3 ms) ran another process:
# one that finds no other thread to run returns in ~1 µs
_LONG_YIELD = 300_000

_i64 = ir.IntType(64)


def _slot(context, builder, aty, arr, idx):
    data = context.make_array(aty)(context, builder, value=arr).data
    return builder.gep(data, [idx])


@intrinsic
def _fetch_add(typingctx, arr, idx, val):
    """arr[idx] += val atomically (sequentially consistent); the value before."""
    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _slot(context, builder, sig.args[0], args[0], args[1]), args[2], "seq_cst")
    return types.int64(arr, idx, val), codegen


@intrinsic
def _cas(typingctx, arr, idx, expected, val):
    """arr[idx] = val if it holds expected (atomically); whether it did."""
    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1])
        return builder.extract_value(builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst"), 1)
    return types.boolean(arr, idx, expected, val), codegen


@intrinsic
def _load_acquire(typingctx, arr, idx):
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)
    return types.int64(arr, idx), codegen


@intrinsic
def _store_release(typingctx, arr, idx, val):
    def codegen(context, builder, sig, args):
        builder.store_atomic(args[2], _slot(context, builder, sig.args[0], args[0], args[1]), "release", 8)
        return context.get_dummy_value()
    return types.void(arr, idx, val), codegen


@intrinsic
def _pause(typingctx):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _cycles(typingctx):
    """The CPU's time-stamp counter (llvm.readcyclecounter: rdtsc; a constant rate)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_i64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@intrinsic
def _sched_yield(typingctx):
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@_inline
def _wait_while(state, idx, value):
    """Spin until state[idx] != value, yielding the core now and then; the yields that gave
    the core away (to another process: the call returned _LONG_YIELD cycles or more later)."""
    spins = 0
    long_yields = 0
    while _load_acquire(state, idx) == value:
        _pause()
        spins += 1
        if spins >= _SPINS:
            t = _cycles()
            _sched_yield()
            if _cycles() - t >= _LONG_YIELD:
                long_yields += 1
            spins = 0
    return long_yields


@_inline
def _barrier(state, n):
    """Every one of the n chunks of the region waits here until all have come; what each wrote
    before is then seen by all. The times this chunk gave its core away to another process
    while it waited (_wait_while: a busy node)."""
    gen = _load_acquire(state, _GEN)
    if _fetch_add(state, _COUNT, np.int64(1)) == n - 1:
        _store_release(state, _COUNT, np.int64(0))
        _fetch_add(state, _GEN, np.int64(1))
        return 0
    return _wait_while(state, _GEN, gen)


@_inline
def _rendezvous(state, n):
    """True in every chunk when all n chunks are running at once (then they may meet at
    _barrier); False in every chunk otherwise, after a bounded wait: a chunk that waited too
    long marks the count as failed (_FAILED_MARK, only while it is below n: once all have
    come it cannot fail), and chunks that come later see the mark. The state must be fresh."""
    if _fetch_add(state, _ARRIVED, np.int64(1)) + 1 >= _FAILED_MARK:
        return False
    spins = 0
    yields = 0
    while True:
        v = _load_acquire(state, _ARRIVED)
        if v >= _FAILED_MARK:
            return False
        if v >= n:
            return True
        _pause()
        spins += 1
        if spins >= _SPINS:
            _sched_yield()
            spins = 0
            yields += 1
            if yields >= _RENDEZVOUS_YIELDS and _cas(state, _ARRIVED, v, _FAILED_MARK):
                return False


def barrier_state() -> np.ndarray:
    """A fresh state for one region (zeros; reuse one with reset_state)."""
    return np.zeros(STATE_LEN, np.int64)


def reset_state(state: np.ndarray) -> None:
    state[:] = 0

"""SIGINT and SIGTERM: every rank leaves, none in the middle of a collective; the root decides.

From the start of a session (start()) every rank only records a signal: raising in the
middle of an engine step or a start-up collective would leave the other ranks waiting in a
collective this rank never joins. The root raises `Interrupted` at the next step boundary
(Engine checks before it broadcasts a step) or at the end of start-up (every rank
together); run_root then stops the workers with the step packet, and every rank cleans up
and exits 128 + the signal. A worker that got the signal alone (`kill -TERM` of one rank) tells the root
with a small message after its current step (comm.notify_root); the root polls for it at
every step (comm.poll_notice).

A second signal more than a second after the first (a second Ctrl-C, not the one copy the
launcher forwards to every rank) gives up waiting: the process exits at once (mpiexec
then ends the job).

Outside the engine's commands (convert, info) the handler raises `Interrupted` at once, as
Python does for SIGINT, so `try/finally` blocks remove temporary files for SIGTERM too.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_REPEAT_SECONDS = 1.0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received (here, or on the rank named by `rank`)."""

    def __init__(self, signum: int, rank: int | None = None):
        super().__init__(signum)
        self.signum, self.rank = signum, rank

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        where = f" on rank {self.rank}" if self.rank else ""
        return f"interrupted by {signal.Signals(self.signum).name}{where}"


_received: int | None = None      # the first signal's number
_first_time = 0.0
_defer = 0                         # > 0: record signals, do not raise (sessions, blocks)
_interruptible = False             # inside interruptible(): raise even so


def install() -> None:
    """The handlers of the whole program (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)


def _handler(signum, frame) -> None:
    global _received, _first_time
    now = time.monotonic()
    if _received is not None:
        if now - _first_time > _REPEAT_SECONDS:     # asked again: stop waiting
            print(f"{signal.Signals(signum).name} again: exiting at once", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        return                                      # the same signal, delivered twice
    _received, _first_time = signum, now
    if _defer == 0 or _interruptible:
        raise Interrupted(signum)


def pending() -> int | None:
    """The signal received, if any."""
    return _received


def reset() -> None:
    """Forget a handled signal (tests; a front end that handled it)."""
    global _received
    _received = None


def enter_session() -> None:
    """From here to the end of the process this rank only records signals: it is one of
    the ranks of an engine, whose steps and collectives must not be left half done. The
    root acts on them at step boundaries (check), the workers pass them to the root."""
    global _defer
    _defer += 1


def finish() -> None:
    """The program's work is done (its exit code decided): a signal from now on is only
    recorded, never raised in the middle of the interpreter's shutdown."""
    global _defer
    _defer += 1


@contextlib.contextmanager
def deferred():
    """Record signals inside this block instead of raising (collectives, teardown)."""
    global _defer
    _defer += 1
    try:
        yield
    finally:
        _defer -= 1


@contextlib.contextmanager
def interruptible():
    """The root waiting on something of its own (a terminal, a queue) inside a session: a
    signal raises Interrupted at once, as outside sessions; one already received raises on
    entry. Never around engine calls."""
    global _interruptible
    check()
    _interruptible = True
    try:
        yield
    finally:
        _interruptible = False


def check() -> None:
    """Raise Interrupted now if a signal was received (the root, at a step boundary)."""
    if _received is not None:
        raise Interrupted(_received)

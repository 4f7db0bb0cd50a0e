"""Stop signals of `batch`, installed before the heavy imports and the model load: on the root
they only set a flag that the loop reads between engine steps; workers ignore them."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """A signal handler that only counts: the loop looks at it between engine steps."""

    def __init__(self):
        self.count = 0
        self.name: str | None = None

    def __call__(self, signum, frame=None) -> None:
        self.count += 1
        self.name = self.name or signal.Signals(signum).name

    def install(self, is_root: bool) -> dict:
        """Root: the stop signals set this flag; workers ignore them (launchers forward them to
        every rank, and a worker must leave only when the root's stop step arrives). Returns
        the previous handlers."""
        handler = self if is_root else signal.SIG_IGN
        return {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)

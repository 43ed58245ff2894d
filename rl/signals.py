"""Graceful shutdown: turn SIGTERM/SIGINT into a flag the training loop checks at step boundaries.

Clusters send SIGTERM before killing a preempted job; dying mid-step loses everything since the last
checkpoint. Inside ``GracefulExit`` the first signal only sets ``should_stop``; the loop saves a checkpoint at
the end of the current step and returns (exit status 0). The first signal also puts the previous handlers back,
so a second signal behaves as it would have without us (Ctrl-C twice raises ``KeyboardInterrupt``).

    with GracefulExit() as stop:
        for step in range(start, cfg.num_steps):
            ...one step...
            if stop.should_stop:
                save_checkpoint(...)
                break

With several processes each one receives the signal from the launcher; agreeing on the stopping step (an
all-reduce of the flag) is the training loop's job.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["GracefulExit"]


class GracefulExit:
    """Context manager that records SIGTERM/SIGINT instead of dying.

    Attributes:
        should_stop: True once a handled signal arrived.
        received: the name of that signal (``"SIGTERM"``), or None.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.should_stop = False
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> GracefulExit:
        # signal.signal raises ValueError outside the main thread, which is the right loud failure here
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.should_stop = True
        self.received = signal.Signals(signum).name
        self._restore()
        print(
            f"received {self.received}: finishing this step, checkpointing and exiting "
            f"(send it again to stop immediately)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            # None means the previous handler was not installed from Python; the default is the best we can do
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

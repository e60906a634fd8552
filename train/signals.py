"""SIGTERM/SIGINT: finish the current step, checkpoint, stop (exit status 3 in the CLI).

:class:`StopOnSignal` replaces the two handlers while the loop runs: the first signal
only sets :attr:`StopOnSignal.requested`; the loop checks it after each step, saves a
checkpoint and returns. A second signal while it is saving gets the default behaviour
back (SIGINT raises ``KeyboardInterrupt``, SIGTERM terminates): orbax writes into a
temporary directory and renames it when complete, so a forced stop never leaves a
half-written checkpoint behind as the latest one.

In a multi-process job the handlers are left alone: ``jax.distributed`` installs JAX's
preemption notifier on SIGTERM, and the loop asks orbax (``reached_preemption``) for the
step at which every process stops and saves together.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: turns SIGTERM/SIGINT into a stop request for the loop."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        # Python only lets the main thread install handlers (e.g. a notebook's worker
        # thread cannot): there the default behaviour stays.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = signal.Signals(signum).name
        # A second signal: the default behaviour (the user insists).
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

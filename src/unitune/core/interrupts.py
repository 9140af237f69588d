"""SIGTERM and SIGINT during a run: finish the step, checkpoint, exit.

The first signal only sets a flag. The training loop reads it after every optimizer step, and the
long passes (reference log-probs, evaluation) poll it between batches (`check()` raises
`Interrupted`), so a preemption is answered within one step or one batch, never lost in a loop
that does not look. A second SIGINT raises `KeyboardInterrupt` at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class Interrupted(Exception):
    """The run stopped on a signal; `signum` is the signal, `checkpoint` the one written."""

    def __init__(self, signum: int, message: str = "", checkpoint: Any = None):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.checkpoint = signum, checkpoint


class Interrupts:
    """Context manager: SIGTERM / SIGINT handlers for the duration of a run (main thread only;
    elsewhere it installs nothing and never reports a signal)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = signum

    def check(self) -> None:
        """Raise `Interrupted` if a signal arrived (for passes that poll between batches)."""
        if self.requested is not None:
            raise Interrupted(self.requested)

"""Where a training step's time goes (`train.profile`): wall-clock seconds per phase.

One process-wide `PHASES` (as a logger is): the training loop marks its phases (collation, the
forward pass, backward, clipping, the optimizer step, logging), the chunked LM head marks its own
forward, its recompute inside backward and its backward (`models/logprobs.py`). Phases nest and
each keeps only its own time (exclusive): a head chunk inside the forward pass is counted as
`head`, not as `forward`; the recompute inside backward as `head_recompute`, not as `backward`.
Off unless enabled: then `phase()` costs one attribute test. Counters (`count`) record the work
a step did (tokens through the decoder, rows through the head) for FLOP rates; `peak` the largest
value of a quantity (bytes of activations saved for backward).

On a GPU every phase boundary synchronizes the device (`sync`), so that the seconds are the
device's: a profiled step is slower than an unprofiled one there; on a CPU it costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["PHASES", "Phases"]


class Phases:
    """Exclusive seconds per named phase, counters and peaks, since the last `take()`."""

    def __init__(self) -> None:
        self.enabled = False
        self.sync: Callable[[], None] | None = None
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, seconds of nested phases]

    def enable(self, sync: Callable[[], None] | None = None) -> None:
        self.enabled, self.sync = True, sync
        self.take()

    def disable(self) -> None:
        self.enabled, self.sync = False, None
        self.take()

    def enter(self, name: str) -> None:
        """Start phase `name` (inside the current one, if any)."""
        if not self.enabled:
            return
        if self.sync is not None:
            self.sync()
        self._stack.append([name, time.perf_counter(), 0.0])

    def exit(self, name: str) -> None:
        """End phase `name`: its time less its nested phases' goes to `name`, the whole to the
        enclosing phase's nested time. An `exit` that does not match the innermost phase (a
        backward pass cut short by an error) is ignored."""
        if not self.enabled or not self._stack or self._stack[-1][0] != name:
            return
        if self.sync is not None:
            self.sync()
        _, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.enter(name)
        try:
            yield
        finally:
            self.exit(name)

    def count(self, name: str, value: float) -> None:
        if self.enabled:
            self.counts[name] = self.counts.get(name, 0.0) + value

    def peak(self, name: str, value: float) -> None:
        if self.enabled:
            self.peaks[name] = max(self.peaks.get(name, 0.0), value)

    def take(self) -> dict[str, dict[str, float]]:
        """What was recorded since the last call (`seconds`, `counts`, `peaks`); then reset."""
        out = {"seconds": self.seconds, "counts": self.counts, "peaks": self.peaks}
        self.seconds, self.counts, self.peaks, self._stack = {}, {}, {}, []
        return out


PHASES = Phases()

"""Where the model thread's time goes: seconds per stage of its loop (stdlib only).

Why: at a GPU's pace the forward pass is a small share of a step, and what else the
thread does (sampling's launches, detokenising, stop strings, the hand-back to the
event loop) decides the rate (issue 13). The server exports these totals in /metrics,
so a run under load says which stage dominates without a profiler.

Every moment since the clock started belongs to exactly one stage: the innermost one
open, else "other". A stage opened inside another pauses it.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

OUTSIDE = "other"


class StageClock:
    """Written by one thread (the model thread), read by any (a /metrics scrape).
    A stage costs ~1 us to enter and leave (a step opens about nine)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {OUTSIDE: 0.0}
        self._open: list[str] = [OUTSIDE]
        self._since = now()
        self._stages: dict[str, _Stage] = {}

    def stage(self, name: str) -> "_Stage":
        """A context manager: time inside it is `name`'s."""
        stage = self._stages.get(name)
        if stage is None:
            stage = self._stages[name] = _Stage(self, name)
        return stage

    def _close_interval(self) -> None:  # under the lock
        now = self._now()
        current = self._open[-1]
        self._seconds[current] = self._seconds.get(current, 0.0) + now - self._since
        self._since = now

    def totals(self) -> dict[str, float]:
        """Seconds per stage so far, the open stage's running time included."""
        with self._lock:
            totals = dict(self._seconds)
            current = self._open[-1]
            totals[current] = totals.get(current, 0.0) + self._now() - self._since
        return totals


class _Stage:
    __slots__ = ("clock", "name")

    def __init__(self, clock: StageClock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        clock = self.clock
        with clock._lock:
            clock._close_interval()
            clock._open.append(self.name)

    def __exit__(self, *exc) -> None:
        clock = self.clock
        with clock._lock:
            clock._close_interval()
            clock._open.pop()

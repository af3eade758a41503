"""Counters, gauges and histograms, rendered in the Prometheus text format (stdlib only)."""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """A small registry, behind one lock. Only the event loop writes to it today; what
    other threads count (the request log's errors, the model thread's stages) is read
    from them when /metrics is scraped (counter_read)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[tuple, float]] = {}
        self._histograms: dict[str, dict[tuple, list]] = {}
        self._gauges_fn: dict[str, Callable[[], float]] = {}
        self._counters_fn: dict[str, tuple[str, Callable]] = {}

    def counter(self, name: str, help_text: str) -> None:
        self._help[name] = ("counter", help_text)
        self._values.setdefault(name, {})

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A gauge read when /metrics is scraped."""
        self._help[name] = ("gauge", help_text)
        self._gauges_fn[name] = read

    def counter_read(self, name: str, help_text: str, read: Callable[[], float | dict[str, float]],
                     label: str = "") -> None:
        """A counter kept elsewhere, read when /metrics is scraped: a number, or numbers
        by the value of `label`."""
        self._help[name] = ("counter", help_text)
        self._counters_fn[name] = (label, read)

    def histogram(self, name: str, help_text: str) -> None:
        self._help[name] = ("histogram", help_text)
        self._histograms.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms[name]
            state = series.get(key)
            if state is None:
                state = series[key] = [[0] * len(LATENCY_BUCKETS), 0.0, 0]
            i = bisect.bisect_left(LATENCY_BUCKETS, value)
            if i < len(LATENCY_BUCKETS):
                state[0][i] += 1
            state[1] += value
            state[2] += 1

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in self._help.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                if name in self._counters_fn:
                    label, read = self._counters_fn[name]
                    values = read()
                    if isinstance(values, dict):
                        for key, v in sorted(values.items()):
                            lines.append(f"{name}{_labels({label: key})} {_number(v)}")
                    else:
                        lines.append(f"{name} {_number(values)}")
                elif kind == "counter":
                    series = self._values[name] or {(): 0.0}
                    for key, v in series.items():
                        lines.append(f"{name}{_labels(dict(key))} {_number(v)}")
                elif kind == "gauge":
                    lines.append(f"{name} {_number(self._gauges_fn[name]())}")
                else:
                    for key, (buckets, total, count) in self._histograms[name].items():
                        labels = dict(key)
                        running = 0
                        for bound, n in zip(LATENCY_BUCKETS, buckets):
                            running += n
                            lines.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {running}")
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {count}")
                        lines.append(f"{name}_sum{_labels(labels)} {_number(total)}")
                        lines.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(lines) + "\n"

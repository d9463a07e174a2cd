"""What attribution learns: quantiles, established values and error rates per operation.

:class:`Baselines` holds, per (service, operation), DDSketch streaming quantiles of the
catalog's ``above_baseline`` signals, the established values of its ``changed`` signals,
and the usual error rate with a window of recent calls (:class:`Calls`); and, per client
operation, the traced service that answers it (:meth:`Baselines.callee`)::

    baselines = Baselines(min_samples=30)
    baselines.learn(("api", "GET /users/{}", "duration"), 0.012)
    p99 = baselines.quantile(("api", "GET /users/{}", "duration"))   # None until learned

Memory is bounded: at most 20,000 keys per table, 1,024 values per ``changed`` key.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ddsketch import DDSketch

from otel_dl import semconv

from .decode import SpanRecord

BASELINE_QUANTILE = 0.99
MAX_KEYS = 20_000
_MAX_VALUES_PER_KEY = 1024
_REFRESH_SAMPLES = 32
#: Calls of an operation in its recent window, against which error bursts are judged.
_RECENT_CALLS = 20
#: An operation's own floor (see :meth:`Baselines.floor`): this share of its median, or
#: this many robust standard deviations when wider.
_FLOOR_SHARE = 0.5
_FLOOR_SPREADS = 3.0


class Baselines:
    """Learned quantiles and established values, per service and span name."""

    def __init__(self, min_samples: int) -> None:
        self.min_samples = min_samples
        self.sketches: dict[tuple[str, str, str], DDSketch] = {}
        self._quantiles: dict[tuple[tuple[str, str, str], float], tuple[float, float]] = {}
        self.values: dict[tuple[str, ...], tuple[dict[Any, int], set[Any]]] = {}
        #: Calls and errors per (service, operation): see :class:`Calls`.
        self.calls: dict[tuple[str, str], Calls] = {}
        #: The service whose span answered each client (service, operation) last.
        self.callees: dict[tuple[str, str], str] = {}

    def learn_callee(self, key: tuple[str, str], service: str) -> None:
        """Record that a span of ``service`` answered the client operation ``key``."""
        if key in self.callees or len(self.callees) < MAX_KEYS:
            self.callees[key] = service

    def callee(self, key: tuple[str, str]) -> str | None:
        """The traced service that answers the client operation ``key``, if one was seen."""
        return self.callees.get(key)

    def count_call(self, key: tuple[str, str], error: bool, budget: float) -> None:
        entry = self.calls.get(key)
        if entry is None:
            if len(self.calls) >= MAX_KEYS:
                return
            entry = self.calls[key] = Calls()
        entry.add(error, self.min_samples, budget)

    def error_rate(self, key: tuple[str, str]) -> float | None:
        """The operation's usual error rate, or None before ``min_samples`` calls."""
        entry = self.calls.get(key)
        if entry is None or entry.calls < self.min_samples:
            return None
        return entry.errors / entry.calls

    def burst(self, key: tuple[str, str]) -> bool:
        """Whether the operation's recent calls fail far more than usual."""
        entry = self.calls.get(key)
        return entry is not None and entry.burst(self.min_samples)

    def quantile(self, key: tuple[str, str, str], q: float = BASELINE_QUANTILE) -> float | None:
        sketch = self.sketches.get(key)
        if sketch is None or sketch.count < self.min_samples:
            return None
        # A quantile query walks the sketch's bins; refresh it only as samples accumulate.
        cached = self._quantiles.get((key, q))
        if cached is None or sketch.count - cached[0] >= _REFRESH_SAMPLES:
            value = sketch.get_quantile_value(q)
            if value is None:
                return None
            cached = self._quantiles[(key, q)] = (sketch.count, float(value))
        return cached[1]

    def floor(self, key: tuple[str, str, str]) -> float | None:
        """The smallest excess over the usual that the operation's own baseline makes
        meaningful: half its median, or :data:`_FLOOR_SPREADS` robust standard deviations
        (the interquartile range / 1.349) when it varies more. None before it is learned."""
        median = self.quantile(key, 0.5)
        q1, q3 = self.quantile(key, 0.25), self.quantile(key, 0.75)
        if median is None or q1 is None or q3 is None:
            return None
        return max(_FLOOR_SHARE * median, _FLOOR_SPREADS * (q3 - q1) / 1.349)

    def learn(self, key: tuple[str, str, str], value: float) -> None:
        sketch = self.sketches.get(key)
        if sketch is None:
            if len(self.sketches) >= MAX_KEYS:
                return
            sketch = self.sketches[key] = DDSketch()
        sketch.add(value)

    def is_new(self, key: tuple[str, ...], value: Any) -> bool:
        entry = self.values.get(key)
        return entry is not None and value not in entry[1]

    def observe(self, key: tuple[str, ...], value: Any) -> None:
        entry = self.values.get(key)
        if entry is None:
            if len(self.values) >= MAX_KEYS:
                return
            # The first value seen for a key is the established one.
            self.values[key] = ({value: 1}, {value})
            return
        counts, established = entry
        if value not in counts and len(counts) >= _MAX_VALUES_PER_KEY:
            # Bound memory under a stream of one-off values: forget the unsettled ones.
            for stale in [v for v in counts if v not in established]:
                del counts[stale]
        counts[value] = counts.get(value, 0) + 1
        if counts[value] >= self.min_samples:
            established.add(value)


class Calls:
    """An operation's usual error rate and its last :data:`_RECENT_CALLS` calls.

    A call joins the usual rate unless the window is a burst, so an outage, once seen,
    does not teach its own errors as usual (the few calls before it is seen do). A burst is
    a window with more errors than the usual rate gives with probability ``budget``
    (binomial tail): one retried error is not one, an operation failing on every call
    is, and HotROD's redis failing every 5th call is neither.
    """

    __slots__ = ("_limit", "_limit_at", "calls", "errors", "recent", "recent_errors")

    def __init__(self) -> None:
        self.recent: deque[bool] = deque()
        self.recent_errors = 0
        self.calls = 0
        self.errors = 0
        self._limit = _RECENT_CALLS + 1
        self._limit_at = -1

    def burst(self, min_samples: int) -> bool:
        return self.calls >= min_samples and self.recent_errors >= self._limit

    def _refresh(self, budget: float, min_samples: int) -> None:
        # The binomial tail is recomputed only as the usual rate's sample grows, and once
        # the rate is learned (the limit from the first calls is only a placeholder).
        learned = self._limit_at < min_samples <= self.calls
        if self._limit_at >= 0 and self.calls - self._limit_at < _REFRESH_SAMPLES and not learned:
            return
        p = (self.errors + 1) / (self.calls + 2)  # Laplace: no 0 % rate from few calls
        n, tail = _RECENT_CALLS, 0.0
        limit = n + 1
        for k in range(n, 0, -1):
            tail += math.comb(n, k) * p**k * (1 - p) ** (n - k)
            if tail >= budget:
                break
            limit = k
        self._limit, self._limit_at = limit, self.calls

    def add(self, error: bool, min_samples: int, budget: float) -> None:
        if len(self.recent) == _RECENT_CALLS:
            self.recent_errors -= self.recent.popleft()
        self.recent.append(error)
        self.recent_errors += error
        if not self.burst(min_samples):
            self.calls += 1
            self.errors += error
            self._refresh(budget, min_samples)


def changed_key(span: SpanRecord, signal: str) -> tuple[str, ...]:
    if signal == semconv.DL_MODEL_FINGERPRINT:
        model = span.attrs.get(semconv.DL_MODEL_NAME)
        if model:
            return ("model", str(model))
    return (span.service, span.name, signal)

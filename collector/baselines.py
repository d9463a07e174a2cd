"""What attribution learns: quantiles, established values and error rates per operation.

:class:`Baselines` holds, per (service, operation), DDSketch streaming quantiles of the
catalog's ``above_baseline`` signals, the established values of its ``changed`` signals,
the usual error rate with a window of recent calls (:class:`Calls`), the same for the
modes whose single firings can be an operation's background (low confidence, see
detect_signals.py); and, per client
operation, the traced service that answers it (:meth:`Baselines.callee`)::

    baselines = Baselines(min_samples=30)
    baselines.learn(("api", "GET /users/{}", "duration"), 0.012)
    p99 = baselines.quantile(("api", "GET /users/{}", "duration"))   # None until learned

:meth:`Baselines.learn_later` keeps a value aside until a quantile read would see it, and
then adds the values kept aside a bin at a time; a read sees the same quantiles as if
each had been learned at once (routine.py learns so).

Memory is bounded: at most 20,000 keys per table, 1,024 values per ``changed`` key, and
about 32 values kept aside per sketch of an operation still being read (a read takes
them in once its cached quantile is 32 values old).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any

from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping

from otel_dl import semconv

from .decode import SpanRecord

BASELINE_QUANTILE = 0.99
#: The sketches' relative accuracy (DDSketch's default): quantiles within 1 %.
RELATIVE_ACCURACY = 0.01
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
        #: Calls and firings of a per-call mode kind per (service, operation, kind):
        #: see :meth:`count_signal`.
        self.signal_calls: dict[tuple[str, str, str], Calls] = {}
        #: The service whose span answered each client (service, operation) last.
        self.callees: dict[tuple[str, str], str] = {}
        # Values of learn_later() not yet in their sketch, and the sketches' own mapping
        # of values to bins, which adds them a bin at a time.
        self._pending: dict[tuple[str, str, str], list[float]] = {}
        self._mapping = LogarithmicMapping(RELATIVE_ACCURACY)

    def learn_callee(self, key: tuple[str, str], service: str) -> None:
        """Record that a span of ``service`` answered the client operation ``key``."""
        if key in self.callees or len(self.callees) < MAX_KEYS:
            self.callees[key] = service

    def callee(self, key: tuple[str, str]) -> str | None:
        """The traced service that answers the client operation ``key``, if one was seen."""
        return self.callees.get(key)

    def _calls_of(self, key: tuple[str, str]) -> Calls | None:
        entry = self.calls.get(key)
        if entry is None and len(self.calls) < MAX_KEYS:
            entry = self.calls[key] = Calls()
        return entry

    def count_call(self, key: tuple[str, str], error: bool, budget: float) -> None:
        entry = self._calls_of(key)
        if entry is not None:
            entry.add(error, self.min_samples, budget)

    def count_signal(self, key: tuple[str, str, str], fired: bool, budget: float) -> bool:
        """Count a call of (service, operation) that could fire a mode of a kind (the
        key's last part), and whether it did, as :meth:`count_call` counts errors;
        whether the recent calls are now a burst (:meth:`signal_burst`)."""
        entry = self.signal_calls.get(key)
        if entry is None:
            if len(self.signal_calls) >= MAX_KEYS:
                return False
            entry = self.signal_calls[key] = Calls()
        entry.add(fired, self.min_samples, budget)
        return entry.burst(self.min_samples)

    def signal_burst(self, key: tuple[str, str, str]) -> bool:
        """Whether the recent calls :meth:`count_signal` counted fire far more than usual."""
        entry = self.signal_calls.get(key)
        return entry is not None and entry.burst(self.min_samples)

    def count_successes(self, key: tuple[str, str], n: int, budget: float) -> None:
        """:meth:`count_call` ``n`` calls without error, at once (see :meth:`Calls.add_ok`)."""
        entry = self._calls_of(key)
        if entry is not None:
            entry.add_ok(n, self.min_samples, budget)

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
        if sketch is None:
            return None
        cached = self._quantiles.get((key, q))
        count = sketch.count
        pending = self._pending.get(key)
        if pending is not None and (
            cached is None or count + len(pending) - cached[0] >= _REFRESH_SAMPLES
        ):
            # This read refreshes, or may: it must see the values kept aside. Otherwise it
            # returns the cached value, with or without them.
            self._add_pending(key, sketch)
            count = sketch.count
        if count < self.min_samples:
            return None
        # A quantile query walks the sketch's bins; refresh it only as samples accumulate.
        if cached is None or count - cached[0] >= _REFRESH_SAMPLES:
            value = sketch.get_quantile_value(q)
            if value is None:
                return None
            cached = self._quantiles[(key, q)] = (count, float(value))
        return cached[1]

    def floor(self, key: tuple[str, str, str]) -> float | None:
        """The smallest excess over the usual that the operation's own baseline makes
        meaningful: half its median, or :data:`_FLOOR_SPREADS` robust standard deviations
        (the interquartile range / 1.349) when it varies more. None before it is learned."""
        centre = self.centre(key)
        if centre is None:
            return None
        median, spread = centre
        return max(_FLOOR_SHARE * median, _FLOOR_SPREADS * spread)

    def centre(self, key: tuple[str, str, str]) -> tuple[float, float] | None:
        """The median of the values learned for ``key`` and their robust standard
        deviation (the interquartile range / 1.349), or None before they are learned."""
        median = self.quantile(key, 0.5)
        q1, q3 = self.quantile(key, 0.25), self.quantile(key, 0.75)
        if median is None or q1 is None or q3 is None:
            return None
        return median, (q3 - q1) / 1.349

    def _sketch(self, key: tuple[str, str, str]) -> DDSketch | None:
        sketch = self.sketches.get(key)
        if sketch is None and len(self.sketches) < MAX_KEYS:
            sketch = self.sketches[key] = DDSketch(RELATIVE_ACCURACY)
        return sketch

    def learn(self, key: tuple[str, str, str], value: float) -> None:
        sketch = self._sketch(key)
        if sketch is not None:
            sketch.add(value)

    def learn_later(self, key: tuple[str, str, str], value: float) -> None:
        """:meth:`learn` ``value`` (non-negative), kept aside until a quantile read of
        ``key`` would see it, then added with the values kept with it, one sketch update
        per bin (see :meth:`quantile`)."""
        if key not in self.sketches and self._sketch(key) is None:
            return
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = [value]
        else:
            pending.append(value)

    def _add_pending(self, key: tuple[str, str, str], sketch: DDSketch) -> None:
        """Add the values kept aside for ``key``: the sketch's bins and count end as one
        ``add`` per value leaves them (its sum, min and max, which no quantile reads, do
        not)."""
        values = self._pending.pop(key)
        if len(values) < 4:
            for value in values:
                sketch.add(value)
            return
        mapping = self._mapping
        smallest = mapping.min_possible
        # A value at or under min_possible goes to the sketch's zero count: key None.
        bins = [mapping.key(v) if v > smallest else None for v in values]
        one_of = dict(zip(bins, values, strict=True))  # a value of each bin, mapping to it
        for b, n in Counter(bins).items():
            sketch.add(one_of[b], float(n))

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

    def add_ok(self, n: int, min_samples: int, budget: float) -> None:
        """``n`` calls without error, leaving the state ``n`` :meth:`add` calls would."""
        while n > 0 and self.recent_errors:
            # Errors still in the window may make a burst, which stops the counting.
            self.add(False, min_samples, budget)
            n -= 1
        if n <= 0:
            return
        # No error in the window, so no burst: every call counts.
        recent = self.recent
        keep = min(len(recent), _RECENT_CALLS - min(n, _RECENT_CALLS))
        while len(recent) > keep:
            recent.popleft()
        recent.extend([False] * min(n, _RECENT_CALLS))
        end = self.calls + n
        # add() refreshes the limit at its first call, at the call that reaches
        # min_samples, and every _REFRESH_SAMPLES calls after the last refresh; with no
        # new error, the last of those refreshes sets the limit.
        while True:
            if self._limit_at < 0:
                due = self.calls + 1
            else:
                due = self._limit_at + _REFRESH_SAMPLES
                if self._limit_at < min_samples:
                    due = min(due, max(self.calls + 1, min_samples))
            if due > end:
                break
            self.calls = due
            self._refresh(budget, min_samples)
        self.calls = end


def changed_key(span: SpanRecord, signal: str) -> tuple[str, ...]:
    if signal == semconv.DL_MODEL_FINGERPRINT:
        model = span.attrs.get(semconv.DL_MODEL_NAME)
        if model:
            return ("model", str(model))
    return (span.service, span.name, signal)

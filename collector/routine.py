"""Routine traces, decided together: the common healthy trace at a fraction of the cost.

Most traces a collector sees are routine: one entry span within its SLO, and every span
plain (no error, no exception event, none of the attributes a catalog condition reads)
with a duration within its operation's learned p99 times the catalog's smallest
``duration`` factor. Such a trace fires no rule, so its decision is "healthy", and all
it changes is what attribution learns: each operation's duration sketch, call count and
error window, the entry's SLO sketch, the callee of each client call answered by
another service, and the memory of the operations that fired or were past their floor
in their last trace. :meth:`.attribute.Attributor.decide` does that a span at a time,
through the general walk, at about 85 Python calls a span.

:meth:`.attribute.Attributor.decide_many` hands each trace of a decision round to a
:class:`RoutineRun`, which takes it if it is routine and otherwise leaves it to
``decide``, after ending the run (:meth:`RoutineRun.close`). The decisions and
everything learned are the same as deciding the round one trace at a time, in order,
because each thing learned is written before anything can read it:

- durations are kept aside (:meth:`~.baselines.Baselines.learn_later`) until a quantile
  read of their operation would see them: a cached quantile is recomputed only every
  32 values, so most reads do not, and those that do add what is kept aside first, one
  sketch update per bin of values instead of one per value;
- call counts (:meth:`~.baselines.Baselines.count_successes`, one update per operation
  for the whole run), callees and the memory of the last trace are read only by a trace
  that is not routine, so the run writes them when it ends, before that trace;
- a trace is judged routine first on what its spans say of themselves, and only then on
  the baselines, read as deciding it alone reads them: a trace that turns out not to be
  routine has read nothing the general walk would not.

A trace whose shape the walk reads in an order of its own is left to the walk: several
root spans, a span id twice, one client operation answered by two services. So is a
trace with an operation that has not yet learned its p99 or SLO, or its call count.
``tests/collector/test_routine.py`` checks every decision field and every learned value
against deciding one trace at a time, on 3,000 HotROD-shaped traces with faults, in
rounds of 1 to 3,000 traces.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .baselines import Baselines
from .decision import Decision
from .decode import SpanRecord
from .detect_latency import ENTRY_DURATION, LatencyRules
from .detect_signals import SignalRules
from .spans import CLIENT, operation_key


class RoutineRun:
    """Consecutive routine traces of a round: :meth:`take` each, then :meth:`close`."""

    def __init__(
        self,
        baselines: Baselines,
        latency: LatencyRules,
        signals: SignalRules,
        detect_attributes: frozenset[str],
        factor: float,
        fp_budget: float,
    ) -> None:
        """``detect_attributes``: the span attributes some catalog condition reads;
        ``factor``: the smallest factor of the catalog's ``duration above_baseline``
        conditions, the only conditions a plain span can fire."""
        self._baselines = baselines
        self._latency = latency
        self._signals = signals
        self._detect = detect_attributes
        self._factor = factor
        self._fp_budget = fp_budget
        self._calls: dict[tuple[str, str], int] = {}
        self._callees: list[tuple[tuple[str, str], str]] = []
        self._taken: list[tuple[int, bytes, SpanRecord]] = []

    def take(self, index: int, trace_id: bytes, spans: Sequence[SpanRecord]) -> bool:
        """Add the trace at ``index`` of the round to the run if it is routine (see the
        module docstring); False if it is not, having read no more than deciding it
        alone reads."""
        baselines, detect = self._baselines, self._detect
        calls = baselines.calls
        entry: SpanRecord | None = None
        entry_key: tuple[str, str] = ("", "")
        keys: list[tuple[str, str]] = []
        clients = False
        # First what a span says of itself; a trace that is not plain reads nothing here.
        for span in spans:
            if span.status_error or span.exception:
                return False
            attrs = span.attrs
            if attrs and ("error.type" in attrs or not detect.isdisjoint(attrs)):
                return False
            key = span.op_key or operation_key(span)
            if key not in calls:
                return False  # not counted yet: counting it first is the walk's to do
            if not span.parent_id:
                if entry is not None:
                    return False  # several roots: which one is the entry takes the walk
                entry, entry_key = span, key
            keys.append(key)
            clients = clients or span.kind == CLIENT
        if entry is None:
            return False
        if len(spans) > 1 and len({s.span_id for s in spans}) < len(spans):
            return False  # a span id twice: the walk counts it once
        callees = _callees(spans) if clients else ()
        if callees is None:
            return False
        # Then the baselines, read as deciding the trace alone reads them: each span's
        # p99, then the entry's SLO.
        quantile, factor = baselines.quantile, self._factor
        for span, key in zip(spans, keys, strict=True):
            p99 = quantile((*key, "duration"))
            if p99 is None or span.duration > p99 * factor:
                return False
        slo = self._latency.slo(entry_key)
        if slo is None or entry.duration > slo:
            return False
        # Routine: what it teaches is learned as the trace alone would teach it.
        counts = self._calls
        for span, key in zip(spans, keys, strict=True):
            counts[key] = counts.get(key, 0) + 1
            baselines.learn_later((*key, "duration"), span.duration)
        baselines.learn_later((*entry_key, ENTRY_DURATION), entry.duration)
        self._callees.extend(callees)
        self._taken.append((index, trace_id, entry))
        return True

    def close(self, out: list[Decision | None]) -> None:
        """Count the run's calls, learn their callees, and put the run's decisions at
        their indexes in ``out``; the run is then empty. Only the decision of a trace
        that is not routine reads what this writes, so it is written once, before one."""
        if not self._taken:
            return
        baselines, budget = self._baselines, self._fp_budget
        for key, n in self._calls.items():
            baselines.count_successes(key, n, budget)
        for client, service in self._callees:
            baselines.learn_callee(client, service)
        self._signals.forget(self._calls)
        self._latency.forget(self._calls)
        now = time.time()
        for index, trace_id, entry in self._taken:
            out[index] = Decision(trace_id, fault=False, decided_at=now, trace_root=entry)
        self._calls.clear()
        self._callees.clear()
        self._taken.clear()


def _callees(spans: Sequence[SpanRecord]) -> list[tuple[tuple[str, str], str]] | None:
    """(client operation, service) of each client span answered by a span of another
    service: its first such child, as :meth:`.detect_latency.LatencyRules.remember`
    reads it. None when two client spans of one operation name different services: the
    walk's order then decides which is remembered."""
    clients = {s.span_id: s for s in spans if s.kind == CLIENT}
    found: dict[bytes, tuple[tuple[str, str], str]] = {}
    for span in spans:
        client = clients.get(span.parent_id)
        if (
            client is not None
            and client is not span
            and span.service != client.service
            and client.span_id not in found
        ):
            found[client.span_id] = (operation_key(client), span.service)
    if len(found) > 1 and len({*found.values()}) > len(dict(found.values())):
        return None
    return list(found.values())

"""Trace assembly: group spans from every service by trace id and decide when a trace is whole.

Spans arrive decoded, as :class:`~.decode.SpanRecord` objects (see :mod:`.decode`).
:class:`TraceBuffer` holds the traces being assembled::

    buffer = TraceBuffer(decision_wait=5.0, early_grace=1.0, max_spans=200_000, max_traces=50_000)
    late, evicted = buffer.add(records, now=time.monotonic())
    for trace in buffer.pop_complete(now=time.monotonic()):
        ...

Completion rule: a trace is complete ``decision_wait`` seconds after its last span
arrived. It completes sooner, ``early_grace`` seconds after its last span, when its
root span (no parent) has arrived, every span it holds has its parent in the trace, and
no client span still waits for its callee's spans: OTLP carries only ended spans, so a
span whose parent is missing, or a call into a traced service with no span of that
service under it, is the only sign that work is still open somewhere. Whether a call
has a traced callee is learned per call key (see :class:`Callees`): a callee whose spans
arrive a second or more after its caller's (a busy exporter, a stalled process) must
not be judged missing, or its caller's client span looks like an untraced dependency
and the fault goes to the wrong service. Memory is bounded by ``max_spans`` and ``max_traces``:
beyond either, the traces quiet the longest are evicted (decided at once and forwarded).
Spans of an already decided trace are returned as *late* by :meth:`TraceBuffer.add`, to
be given the recorded decision from the :class:`DecisionCache`.

The buffer keeps traces in the order of their last span's arrival, so a decision round
looks only at the traces quiet for ``early_grace`` or more, never at the whole buffer.
A trace found still open there waits aside until ``decision_wait``; it is looked at
again only when a span of it arrives or when :class:`Callees` learns that a call no
longer needs to wait.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .decode import SpanRecord

_CLIENT = Span.SPAN_KIND_CLIENT
#: Calls of a key seen before a childless call of it no longer holds its trace open.
_CALLS_TO_LEARN = 3
_MAX_CALL_KEYS = 20_000


class Trace:
    """Spans of one trace gathered so far."""

    __slots__ = ("evicted", "has_root", "last_seen", "spans", "trace_id")

    def __init__(self, trace_id: bytes, last_seen: float) -> None:
        self.trace_id = trace_id
        self.last_seen = last_seen
        self.spans: list[SpanRecord] = []
        self.has_root = False
        self.evicted = False

    def parent_ids(self) -> set[bytes]:
        """The (non-empty) parent ids its spans name. Made when asked, not kept: the
        completion rule and :class:`Callees` ask once a trace is quiet, and a set per
        buffered trace would cost memory while it waits."""
        return {p for s in self.spans if (p := s.parent_id)}

    def connected(self, parents: set[bytes]) -> bool:
        """Whether every span's parent is in the trace (nothing known to be still open);
        ``parents``: :meth:`parent_ids`. The span ids are gathered when asked too: a set
        kept per buffered trace cost about 150 bytes a span of a 5-span trace."""
        return parents <= {s.span_id for s in self.spans}


class DecisionCache:
    """Bounded memory of decided traces, so late spans get the same decision."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[bytes, Any] = OrderedDict()

    def put(self, trace_id: bytes, decision: Any) -> None:
        items = self._items
        if trace_id in items:
            items.move_to_end(trace_id)
        items[trace_id] = decision
        while len(items) > self._size:
            items.popitem(last=False)

    def get(self, trace_id: bytes) -> Any:
        return self._items.get(trace_id)

    def __contains__(self, trace_id: bytes) -> bool:
        return trace_id in self._items

    def __len__(self) -> int:
        return len(self._items)


def _span_key(span: SpanRecord) -> Hashable:
    return (span.service, span.name)


class Callees:
    """Which client calls lead into a traced service, learned from completed traces.

    A call key (by default the caller's service and span name; the collector uses the
    attribution's operation: name, route and peer) is *traced* once one of its calls had
    a child span. A childless call of a traced key, or of a key seen fewer than
    :data:`_CALLS_TO_LEARN` times, holds its trace until ``decision_wait``: its callee's
    spans may still come. A call into an untraced dependency (a database, an external
    API) holds its trace only while its key is being learned.
    """

    def __init__(self, key: Callable[[SpanRecord], Hashable] = _span_key) -> None:
        self.key = key
        self._calls: dict[Hashable, list[int]] = {}  # key -> [calls, calls with a child]
        #: Grows each time a key stops holding traces open (learned to be untraced).
        self.generation = 0

    def awaits_callee(self, span: SpanRecord) -> bool:
        seen = self._calls.get(self.key(span))
        return seen is None or seen[0] < _CALLS_TO_LEARN or seen[1] > 0

    def learn(self, trace: Trace, parents: set[bytes] | None = None) -> None:
        """Count the trace's client calls, and those with a child span; ``parents``: the
        trace's :meth:`Trace.parent_ids`, if already made."""
        if parents is None:
            parents = trace.parent_ids()
        for span in trace.spans:
            if span.kind != _CLIENT:
                continue
            key = self.key(span)
            seen = self._calls.get(key)
            if seen is None:
                if len(self._calls) >= _MAX_CALL_KEYS:
                    continue
                seen = self._calls[key] = [0, 0]
            seen[0] += 1
            seen[1] += span.span_id in parents
            if seen[0] == _CALLS_TO_LEARN and not seen[1]:
                self.generation += 1

    def open_calls(self, trace: Trace, parents: set[bytes]) -> bool:
        """Whether a client span of ``trace`` has no child yet, and its callee may send one;
        ``parents``: the trace's :meth:`Trace.parent_ids`."""
        return any(
            s.kind == _CLIENT and s.span_id not in parents and self.awaits_callee(s)
            for s in trace.spans
        )


class TraceBuffer:
    """Traces being assembled, bounded in spans and traces. Not thread-safe: lock around it."""

    def __init__(
        self,
        decision_wait: float,
        early_grace: float,
        max_spans: int,
        max_traces: int,
        decided: DecisionCache,
        callees: Callees | None = None,
    ) -> None:
        self.decision_wait = decision_wait
        self.early_grace = min(early_grace, decision_wait)
        self.max_spans = max_spans
        self.max_traces = max_traces
        self.decided = decided
        self.callees = callees or Callees()
        # Both ordered by the last span's arrival: traces that may complete early, and
        # traces found still open, which wait for decision_wait.
        self._traces: OrderedDict[bytes, Trace] = OrderedDict()
        self._open: OrderedDict[bytes, Trace] = OrderedDict()
        self._generation = self.callees.generation
        self.span_count = 0

    def __len__(self) -> int:
        return len(self._traces) + len(self._open)

    def add(self, records: list[SpanRecord], now: float) -> tuple[list[SpanRecord], list[Trace]]:
        """Add records; return ``(late spans of decided traces, evicted traces)``."""
        late: list[SpanRecord] = []
        traces, open_ = self._traces, self._open
        for rec in records:
            tid = rec.trace_id
            trace = traces.get(tid)
            if trace is None:
                trace = open_.pop(tid, None)
                if trace is None:
                    if tid in self.decided:
                        late.append(rec)
                        continue
                    trace = Trace(tid, now)
                traces[tid] = trace
            elif trace.last_seen != now:
                traces.move_to_end(tid)
            rec.trace_id = trace.trace_id  # the trace's spans share one id object (49 bytes)
            trace.spans.append(rec)
            trace.last_seen = now
            if not rec.parent_id:
                trace.has_root = True
            self.span_count += 1
        evicted: list[Trace] = []
        while self.span_count > self.max_spans or len(self) > self.max_traces:
            trace = self._pop_quietest()
            if trace is None:
                break
            trace.evicted = True
            self.span_count -= len(trace.spans)
            evicted.append(trace)
        return late, evicted

    def _pop_quietest(self) -> Trace | None:
        fronts = [d for d in (self._open, self._traces) if d]
        if not fronts:
            return None
        oldest = min(fronts, key=lambda d: next(iter(d.values())).last_seen)
        return oldest.popitem(last=False)[1]

    def pop_complete(self, now: float) -> list[Trace]:
        """Remove and return every trace the completion rule says is whole."""
        done: list[Trace] = []
        made: dict[int, set[bytes]] = {}  # parent ids made while judging, by id(trace)
        traces, open_ = self._traces, self._open
        if self._generation != self.callees.generation:
            # A call key was learned to be untraced: open traces may be whole now.
            self._generation = self.callees.generation
            traces.update(open_)
            open_.clear()
            traces = self._traces = OrderedDict(
                sorted(traces.items(), key=lambda item: item[1].last_seen)
            )
        grace, wait = self.early_grace, self.decision_wait
        while open_:
            trace = next(iter(open_.values()))
            if now - trace.last_seen < wait:
                break
            done.append(open_.popitem(last=False)[1])
        while traces:
            trace = next(iter(traces.values()))
            quiet = now - trace.last_seen
            if quiet < grace:
                break
            del traces[trace.trace_id]
            if quiet >= wait:
                done.append(trace)
                continue
            if trace.has_root:
                parents = trace.parent_ids()
                if trace.connected(parents) and not self.callees.open_calls(trace, parents):
                    done.append(trace)
                    made[id(trace)] = parents
                    continue
            open_[trace.trace_id] = trace
        for trace in done:
            self.span_count -= len(trace.spans)
            self.callees.learn(trace, made.get(id(trace)))
        return done

    def pop_all(self) -> list[Trace]:
        """Remove and return every trace (used at shutdown)."""
        done = [*self._open.values(), *self._traces.values()]
        self._traces.clear()
        self._open.clear()
        self.span_count = 0
        return done

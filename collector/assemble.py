"""Trace assembly: group spans from every service by trace id and decide when a trace is whole.

:func:`flatten` turns an OTLP ``ExportTraceServiceRequest`` into :class:`SpanRecord`
objects that keep their resource and scope, so the spans can be regrouped for export.
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
beyond either, the oldest traces are evicted (decided at once and forwarded). Spans of
an already decided trace are returned as *late* by :meth:`TraceBuffer.add`, to be given
the recorded decision from the :class:`DecisionCache`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_dl import semconv

_SERVICE_NAME = "service.name"
_UNKNOWN_SERVICE = "unknown_service"
_STATUS_ERROR = Status.STATUS_CODE_ERROR
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_CLIENT = Span.SPAN_KIND_CLIENT
#: Calls of a key seen before a childless call of it no longer holds its trace open.
_CALLS_TO_LEARN = 3
_MAX_CALL_KEYS = 20_000
# Python types of the AnyValue each semantic-convention type may arrive as.
_SEMCONV_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "double": (float, int),
    "boolean": (bool,),
    "string[]": (tuple,),
}
_SCALARS = (str, bool, int, float)
# Standard OpenTelemetry attributes attribution reads, with the type their semantic
# conventions give. Without this, ``error.type=false`` (or ``0``) was a usable scalar and
# "error.type is set" made every such span an error. The peer names are read only as
# strings, so another type names no peer.
STANDARD_TYPES: dict[str, str] = {
    "error.type": "string",
    "server.address": "string",
    "peer.service": "string",
    "net.peer.name": "string",
    "http.host": "string",
    "rpc.service": "string",
    "url.full": "string",
    "http.url": "string",
}
# The OTLP AnyValue field of each value, named as docs/semantic-conventions.md names types.
_VALUE_TYPES = {
    "string_value": "string",
    "bool_value": "boolean",
    "int_value": "int",
    "double_value": "double",
    "array_value": "array",
    "kvlist_value": "kvlist",
    "bytes_value": "bytes",
}


class PayloadError(ValueError):
    """An OTLP payload that cannot be accepted; the message names the cause."""


@dataclass(frozen=True, eq=False)
class ResourceRef:
    """A resource shared by the spans of one ``ResourceSpans``."""

    resource: Resource
    schema_url: str
    service: str
    key: bytes


@dataclass(frozen=True, eq=False)
class ScopeRef:
    """An instrumentation scope shared by the spans of one ``ScopeSpans``."""

    scope: InstrumentationScope
    schema_url: str
    key: bytes


class SpanRecord:
    """One received span, with what assembly and attribution read from it."""

    __slots__ = (
        "attrs",
        "end",
        "exception",
        "journal_segment",
        "kind",
        "mistyped",
        "name",
        "parent_id",
        "resource",
        "scope",
        "span",
        "span_id",
        "start",
        "status_error",
        "trace_id",
    )

    def __init__(self, span: Span, resource: ResourceRef, scope: ScopeRef, wanted: frozenset[str]):
        self.span = span
        self.resource = resource
        self.scope = scope
        self.trace_id: bytes = span.trace_id
        self.span_id: bytes = span.span_id
        self.parent_id: bytes = span.parent_span_id
        self.name: str = span.name
        self.kind: int = span.kind
        self.start: int = span.start_time_unix_nano
        self.end: int = span.end_time_unix_nano
        self.status_error: bool = span.status.code == _STATUS_ERROR
        self.exception: bool = any(e.name == "exception" for e in span.events)
        self.attrs: dict[str, Any] = {}
        # (attribute, value type) a sender typed wrongly: ignored for attribution, not refused.
        self.mistyped: list[tuple[str, str]] = []
        for kv in span.attributes:
            if kv.key in wanted:
                value = any_value(kv.value)
                if _usable(kv.key, value):
                    self.attrs[kv.key] = value
                else:
                    which = kv.value.WhichOneof("value")
                    self.mistyped.append((kv.key, _VALUE_TYPES.get(which or "", "empty")))
        self.journal_segment: int = -1

    @property
    def service(self) -> str:
        return self.resource.service

    @property
    def duration(self) -> float:
        """Duration in seconds (0 when the end precedes the start)."""
        return max(0, self.end - self.start) / 1e9


def _usable(key: str, value: Any) -> bool:
    """Whether ``value`` has the contract's type for ``key`` (``dl.*`` from semconv, the
    standard ones from :data:`STANDARD_TYPES`; any other key: a scalar or a flat array),
    so catalog operators can compare and hash it."""
    spec = semconv.ATTRIBUTES.get(key)
    expected = spec.type if spec is not None else STANDARD_TYPES.get(key)
    if expected is not None:
        types = _SEMCONV_TYPES.get(expected, _SCALARS)
        if isinstance(value, bool) and bool not in types:
            return False
        if not isinstance(value, types):
            return False
        return not isinstance(value, tuple) or all(isinstance(v, str) for v in value)
    if isinstance(value, tuple):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def expected_type(key: str) -> str:
    """The value type attribution reads ``key`` as, for messages naming the fix."""
    spec = semconv.ATTRIBUTES.get(key)
    if spec is not None:
        return spec.type
    return STANDARD_TYPES.get(key, "a scalar or an array of scalars")


def _id_problem(span: Span) -> str | None:
    if len(span.trace_id) != 16 or span.trace_id == _ZERO_TRACE_ID:
        return "trace_id must be 16 bytes, not all zero"
    if len(span.span_id) != 8 or span.span_id == _ZERO_SPAN_ID:
        return "span_id must be 8 bytes, not all zero"
    parent = span.parent_span_id
    if parent and (len(parent) != 8 or parent == _ZERO_SPAN_ID):
        return "parent_span_id must be empty or 8 bytes, not all zero"
    return None


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (arrays as tuples, kvlists as dicts)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def flatten(
    request: ExportTraceServiceRequest,
    wanted: frozenset[str],
    ignored: Counter[tuple[str, str]] | None = None,
) -> tuple[list[SpanRecord], int, str]:
    """Turn a request into records; return ``(records, rejected, error_message)``.

    Spans with an invalid id (a trace id other than 16 bytes, a span id other than 8,
    a parent id neither empty nor 8 bytes, or any all-zero id) are rejected (OTLP
    partial success) rather than failing the whole request. Spans whose known ``dl.*``
    attributes (or the standard ones in :data:`STANDARD_TYPES`) have the wrong value type
    are kept and forwarded unchanged, but those attributes are ignored for attribution;
    the message then carries a warning (OTLP partial success with 0 rejected spans), and
    ``ignored``, when given, counts them by ``(attribute, value type)``. Messages name
    fields and types, never values.
    """
    records: list[SpanRecord] = []
    problems: dict[str, int] = {}
    # (attribute, value type) causes in this request, for its own warning.
    found: set[tuple[str, str]] = set()
    for rs in request.resource_spans:
        service = _UNKNOWN_SERVICE
        for kv in rs.resource.attributes:
            if kv.key == _SERVICE_NAME:
                service = kv.value.string_value or _UNKNOWN_SERVICE
                break
        rkey = rs.resource.SerializeToString(deterministic=True) + rs.schema_url.encode()
        rref = ResourceRef(rs.resource, rs.schema_url, service, rkey)
        for ss in rs.scope_spans:
            skey = ss.scope.SerializeToString(deterministic=True) + ss.schema_url.encode()
            sref = ScopeRef(ss.scope, ss.schema_url, skey)
            for span in ss.spans:
                problem = _id_problem(span)
                if problem is not None:
                    problems[problem] = problems.get(problem, 0) + 1
                    continue
                rec = SpanRecord(span, rref, sref, wanted)
                if rec.mistyped:
                    found.update(rec.mistyped)
                    if ignored is not None:
                        ignored.update(rec.mistyped)
                records.append(rec)
    rejected = sum(problems.values())
    parts = [f"{n} span(s) rejected: {problem}" for problem, n in problems.items()]
    if found:
        names = ", ".join(
            f"{key} ({received}, not {expected_type(key)})" for key, received in sorted(found)
        )
        parts.append(
            "attributes with the wrong value type, ignored for fault attribution (see "
            f"docs/semantic-conventions.md): {names}"
        )
    return records, rejected, "; ".join(parts)


@dataclass
class Trace:
    """Spans of one trace gathered so far."""

    trace_id: bytes
    first_seen: float
    last_seen: float
    spans: list[SpanRecord] = field(default_factory=list)
    span_ids: set[bytes] = field(default_factory=set)
    has_root: bool = False
    evicted: bool = False

    def connected(self) -> bool:
        """Whether every span's parent is in the trace (nothing known to be still open)."""
        ids = self.span_ids
        return all(not s.parent_id or s.parent_id in ids for s in self.spans)


class DecisionCache:
    """Bounded memory of decided traces, so late spans get the same decision."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[bytes, Any] = OrderedDict()

    def put(self, trace_id: bytes, decision: Any) -> None:
        self._items[trace_id] = decision
        self._items.move_to_end(trace_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

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

    def awaits_callee(self, span: SpanRecord) -> bool:
        seen = self._calls.get(self.key(span))
        return seen is None or seen[0] < _CALLS_TO_LEARN or seen[1] > 0

    def learn(self, trace: Trace) -> None:
        parents = {s.parent_id for s in trace.spans}
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

    def open_calls(self, trace: Trace) -> bool:
        """Whether a client span of ``trace`` has no child yet, and its callee may send one."""
        parents = {s.parent_id for s in trace.spans}
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
        # Ordered by first arrival, so eviction takes the oldest trace.
        self._traces: OrderedDict[bytes, Trace] = OrderedDict()
        self.span_count = 0

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, records: list[SpanRecord], now: float) -> tuple[list[SpanRecord], list[Trace]]:
        """Add records; return ``(late spans of decided traces, evicted traces)``."""
        late: list[SpanRecord] = []
        traces = self._traces
        for rec in records:
            trace = traces.get(rec.trace_id)
            if trace is None:
                if rec.trace_id in self.decided:
                    late.append(rec)
                    continue
                trace = traces[rec.trace_id] = Trace(rec.trace_id, now, now)
            trace.spans.append(rec)
            trace.span_ids.add(rec.span_id)
            trace.last_seen = now
            if not rec.parent_id:
                trace.has_root = True
            self.span_count += 1
        evicted: list[Trace] = []
        while traces and (self.span_count > self.max_spans or len(traces) > self.max_traces):
            _, trace = traces.popitem(last=False)
            trace.evicted = True
            self.span_count -= len(trace.spans)
            evicted.append(trace)
        return late, evicted

    def pop_complete(self, now: float) -> list[Trace]:
        """Remove and return every trace the completion rule says is whole."""
        done: list[Trace] = []
        for trace in self._traces.values():
            quiet = now - trace.last_seen
            if quiet >= self.decision_wait or (
                quiet >= self.early_grace
                and trace.has_root
                and trace.connected()
                and not self.callees.open_calls(trace)
            ):
                done.append(trace)
        for trace in done:
            del self._traces[trace.trace_id]
            self.span_count -= len(trace.spans)
            self.callees.learn(trace)
        return done

    def pop_all(self) -> list[Trace]:
        """Remove and return every trace (used at shutdown)."""
        done = list(self._traces.values())
        self._traces.clear()
        self.span_count = 0
        return done

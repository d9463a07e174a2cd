"""OTLP decoding: turn an ``ExportTraceServiceRequest`` into the span records the collector reads.

:func:`flatten` validates each span's ids and makes one :class:`SpanRecord` per valid
span, reading only the attributes attribution asks for (``wanted``)::

    records, rejected, message = flatten(request, wanted=frozenset({"dl.drift.status"}))

Every record of a request points at one shared :class:`Received`: the request's
encoding as it arrived, forwarded whole once every span in it has been decided, so
spans are never copied or regrouped on their way out. The decoded message is not kept:
a record keeps what it read and its place in the request (``ordinal``), and attributes
written onto a span (:meth:`SpanRecord.set_attribute`) are kept as edits of the
request, applied when it is forwarded (:func:`~.enrich.forwarded`). A request none of
whose spans is enriched is forwarded as the bytes it arrived as.

A span with an invalid id is rejected (OTLP partial success) and removed from the
request; an attribute whose value has the wrong type for the semantic conventions is
kept on the forwarded span but ignored for attribution, with a warning. A payload that
cannot be accepted at all raises :class:`PayloadError`.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_dl import semconv

_SERVICE_NAME = "service.name"
_UNKNOWN_SERVICE = "unknown_service"
_STATUS_ERROR = Status.STATUS_CODE_ERROR
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
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
    "service.peer.name": "string",
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


#: Attributes read from another when a span lacks them (when both are wanted): a span
#: with ``dl.quality.nan_fraction`` but no ``dl.quality.nan_excess_fraction`` (a producer
#: that does not set it, or a source without a reference) is judged by its whole NaN
#: share, and likewise for the out-of-range share.
FALLBACKS: Mapping[str, str] = MappingProxyType(semconv.EXCESS_OF)
#: Attributes derived from others when a span lacks them (when it is wanted): a span
#: with a finite ``dl.drift.score`` but no ``dl.drift.status`` of ok, warn or alert (a
#: producer that sets none, or another value) has the status the default thresholds give
#: its score under its ``dl.drift.method``, psi when it names none
#: (``semconv.drift_status``). otel-dl's own spans carry the status, which counts only
#: scores beyond chance, and are judged by it.
DERIVED_FROM: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {semconv.DL_DRIFT_STATUS: (semconv.DL_DRIFT_SCORE, semconv.DL_DRIFT_METHOD)}
)

#: The ``mistyped`` list of the spans that have none (shared, never appended to).
_NONE_MISTYPED: list[tuple[str, str]] = []
#: The ``attrs`` of the spans that have none of the wanted attributes (shared, read-only).
_NO_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})


class PayloadError(ValueError):
    """An OTLP payload that cannot be accepted; the message names the cause."""


class Received:
    """One accepted request: its encoding (``payload``), forwarded as a whole once none
    of its spans is still undecided, the attributes to write onto its spans before then
    (``edits``: span ordinal -> attribute -> value), and the journal segment that holds
    it until then."""

    __slots__ = ("edits", "payload", "segment", "spans", "undecided")

    def __init__(self) -> None:
        self.payload = b""
        self.spans = self.undecided = 0
        self.segment = -1
        self.edits: dict[int, dict[str, Any]] | None = None

    def edit(self, ordinal: int, key: str, value: Any) -> None:
        """Write ``key`` onto span ``ordinal`` (its place among the request's spans, in
        order) when the request is forwarded, replacing an earlier value."""
        if self.edits is None:
            self.edits = {}
        self.edits.setdefault(ordinal, {})[key] = value


class SpanRecord:
    """One received span, with what assembly and attribution read from it."""

    __slots__ = (
        "attrs",
        "duration",
        "end",
        "exception",
        "kind",
        "mistyped",
        "name",
        "op_key",
        "ordinal",
        "parent_id",
        "received",
        "service",
        "span_id",
        "start",
        "status_error",
        "trace_id",
    )

    def __init__(
        self,
        span: Span,
        service: str,
        received: Received,
        wanted: frozenset[str],
        ids: tuple[bytes, bytes, bytes],
        ordinal: int,
    ):
        self.service = service
        self.received = received
        #: The span's place among its request's spans, in order (see :class:`Received`).
        self.ordinal = ordinal
        self.trace_id, self.span_id, self.parent_id = ids
        # Interned: spans of an operation share one name object (about 60 bytes a span).
        self.name: str = sys.intern(span.name)
        self.kind: int = span.kind
        self.start: int = span.start_time_unix_nano
        self.end: int = span.end_time_unix_nano
        #: Duration in seconds (0 when the end precedes the start).
        self.duration: float = max(0, self.end - self.start) / 1e9
        self.status_error: bool = span.status.code == _STATUS_ERROR
        events = span.events
        self.exception: bool = bool(events) and any(e.name == "exception" for e in events)
        #: The attributes attribution reads (``wanted``), read-only; most spans share one
        #: empty mapping.
        self.attrs: Mapping[str, Any] = _NO_ATTRIBUTES
        #: ``(service, operation)``, set by :meth:`.spans.TraceView.key` when first asked.
        self.op_key: tuple[str, str] | None = None
        # (attribute, value type) a sender typed wrongly: ignored for attribution, not refused.
        self.mistyped: list[tuple[str, str]] = _NONE_MISTYPED
        attrs: dict[str, Any] | None = None
        for kv in span.attributes:
            key = kv.key
            if key in wanted:
                value = any_value(kv.value)
                if _usable(key, value):
                    if attrs is None:
                        attrs = self.attrs = {}
                    attrs[sys.intern(key)] = value  # one key object for all spans
                else:
                    which = kv.value.WhichOneof("value")
                    if not self.mistyped:
                        self.mistyped = []
                    self.mistyped.append((key, _VALUE_TYPES.get(which or "", "empty")))
        if attrs is not None:
            for key, source in FALLBACKS.items():
                if source in attrs and key not in attrs and key in wanted:
                    attrs[key] = attrs[source]
            score = attrs.get(semconv.DL_DRIFT_SCORE)
            status = semconv.DL_DRIFT_STATUS
            if (
                score is not None
                and attrs.get(status) not in semconv.DRIFT_STATUSES
                and status in wanted
                and math.isfinite(score)
            ):
                attrs[status] = _status_of(score, attrs)

    def set_attribute(self, key: str, value: Any) -> None:
        """Write ``key`` onto this span as it is forwarded, replacing an earlier value."""
        self.received.edit(self.ordinal, key, value)


def _status_of(score: Any, attrs: Mapping[str, Any]) -> str:
    method = attrs.get(semconv.DL_DRIFT_METHOD)
    if method not in semconv.DRIFT_THRESHOLDS:
        method = "psi"
    return semconv.drift_status(float(score), method)


def _usable(key: str, value: Any) -> bool:
    """Whether ``value`` has the contract's type for ``key`` (``dl.*`` from semconv, the
    standard ones from :data:`STANDARD_TYPES`; any other key: a scalar or a flat array),
    so catalog operators can compare and hash it. A scalar's answer depends only on the
    key and the value's type, and is remembered per pair (the keys are the few that
    attribution reads)."""
    kind = type(value)
    if kind is not tuple:
        pair = (key, kind)
        known = _USABLE.get(pair)
        if known is None:
            known = _USABLE[pair] = _usable_value(key, value)
        return known
    return _usable_value(key, value)


_USABLE: dict[tuple[str, type], bool] = {}


def _usable_value(key: str, value: Any) -> bool:
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


def _id_problem(trace_id: bytes, span_id: bytes, parent: bytes) -> str | None:
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        return "trace_id must be 16 bytes, not all zero"
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        return "span_id must be 8 bytes, not all zero"
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
    raw: bytes | None = None,
) -> tuple[list[SpanRecord], int, str]:
    """Turn a request into records; return ``(records, rejected, error_message)``.

    The records' :class:`Received` holds the request's encoding: ``raw`` (the bytes
    ``request`` was decoded from), or the request encoded again when ``raw`` is not
    given or spans were rejected.

    Spans with an invalid id (a trace id other than 16 bytes, a span id other than 8,
    a parent id neither empty nor 8 bytes, or any all-zero id) are rejected (OTLP
    partial success) and removed from ``request``, rather than failing the whole
    request. Spans whose known ``dl.*``
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
    received = Received()
    for rs in request.resource_spans:
        service = _UNKNOWN_SERVICE
        for kv in rs.resource.attributes:
            if kv.key == _SERVICE_NAME:
                service = kv.value.string_value or _UNKNOWN_SERVICE
                break
        for ss in rs.scope_spans:
            invalid: list[int] = []
            for i, span in enumerate(ss.spans):
                # Each id is read once: every read makes a new bytes object.
                ids = (span.trace_id, span.span_id, span.parent_span_id)
                problem = _id_problem(*ids)
                if problem is not None:
                    problems[problem] = problems.get(problem, 0) + 1
                    invalid.append(i)
                    continue
                rec = SpanRecord(span, service, received, wanted, ids, len(records))
                if rec.mistyped:
                    found.update(rec.mistyped)
                    if ignored is not None:
                        ignored.update(rec.mistyped)
                records.append(rec)
            # Rejected spans are not forwarded: the request goes on without them.
            for i in reversed(invalid):
                del ss.spans[i]
    received.spans = received.undecided = len(records)
    rejected = sum(problems.values())
    if records:
        received.payload = raw if raw is not None and not rejected else request.SerializeToString()
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

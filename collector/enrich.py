"""Enrichment: write a trace's attribution onto its spans as ``dl.fault.*`` attributes.

:func:`enrich` writes a :class:`~.attribute.Decision` onto the records of its spans
(as edits of their requests, :meth:`~.decode.SpanRecord.set_attribute`), following
DESIGN.md's contract: the root-cause span gets ``dl.fault.root_cause`` and the mode's
kind, origin, id, score, severity, owner and runbook, and what it stands for
(``dl.fault.blame``: its own work, the link into it, or an untraced dependency); symptom
spans get ``dl.fault.symptom`` and where the cause is; the trace's root span gets where
the cause is and the ranked candidate services. A healthy trace gets nothing.
:func:`enrich_late` gives a span that arrived after its trace was decided the recorded
location of the cause. :func:`forwarded` is a request's encoding with those attributes
written onto its spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from otel_dl import semconv

from .decision import Decision
from .decode import Received, SpanRecord

AttrValue = str | bool | float | int | Sequence[str]


def set_attribute(span: Span, key: str, value: AttrValue) -> None:
    """Set ``key`` on an OTLP span, replacing an earlier value of the same key."""
    for i, kv in enumerate(span.attributes):
        if kv.key == key:
            del span.attributes[i]
            break
    kv = span.attributes.add()
    _fill(kv, key, value)


def forwarded(received: Received) -> bytes:
    """``received``'s request as it is forwarded: the bytes it arrived as, or, when
    attributes were written onto its spans, decoded, edited and encoded again."""
    if not received.edits:
        return received.payload
    request = ExportTraceServiceRequest.FromString(received.payload)
    edits = received.edits
    ordinal = 0
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                for key, value in edits.get(ordinal, {}).items():
                    set_attribute(span, key, value)
                ordinal += 1
    return request.SerializeToString()


def _fill(kv: KeyValue, key: str, value: AttrValue) -> None:
    kv.key = key
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    elif isinstance(value, str):
        kv.value.string_value = value
    else:
        kv.value.array_value.values.extend(_string_value(v) for v in value)


def _string_value(text: str):
    kv = KeyValue()
    kv.value.string_value = text
    return kv.value


def enrich(decision: Decision, spans: Sequence[SpanRecord] = ()) -> None:
    """Write ``decision`` onto its spans; do nothing for a healthy trace. A span that
    arrived more than once (``spans``, the trace's: the same span id twice, an exporter's
    retry) gets the same attributes on every copy, whichever one a backend keeps."""
    if not decision.fault or decision.root is None or decision.mode is None:
        return
    copies = _copies(spans)
    root, mode = decision.root, decision.mode
    span_id = root.span_id.hex()
    for key, value in (
        (semconv.DL_FAULT_ROOT_CAUSE, True),
        (semconv.DL_FAULT_KIND, mode.kind),
        (semconv.DL_FAULT_ORIGIN, mode.origin),
        (semconv.DL_FAULT_MODE, mode.id),
        (semconv.DL_FAULT_SCORE, float(decision.score)),
        (semconv.DL_FAULT_SEVERITY, mode.severity),
        (semconv.DL_FAULT_OWNER, mode.owner),
        (semconv.DL_FAULT_RUNBOOK, mode.runbook),
        (semconv.DL_FAULT_BLAME, decision.blame),
    ):
        for record in copies(root):
            record.set_attribute(key, value)
    for symptom in decision.symptoms:
        for record in copies(symptom):
            record.set_attribute(semconv.DL_FAULT_SYMPTOM, True)
            _point_at_cause(record, root.service, span_id)
    trace_root = decision.trace_root
    if trace_root is not None:
        for record in copies(trace_root):
            _point_at_cause(record, root.service, span_id)
            record.set_attribute(semconv.DL_FAULT_CANDIDATES, list(decision.candidates))


def _copies(spans: Sequence[SpanRecord]) -> Callable[[SpanRecord], Sequence[SpanRecord]]:
    """``record`` and the other records of ``spans`` with its span id."""
    if len({s.span_id for s in spans}) == len(spans):  # no span twice: the usual case
        return lambda record: (record,)
    by_id: dict[bytes, list[SpanRecord]] = {}
    for s in spans:
        by_id.setdefault(s.span_id, []).append(s)

    def copies(record: SpanRecord) -> Sequence[SpanRecord]:
        found = by_id.get(record.span_id)
        return found if found and record in found else (record, *(found or ()))

    return copies


def enrich_late(span: SpanRecord, cause: tuple[str, str]) -> None:
    """Give a late span of a decided faulty trace the recorded ``(service, span id hex)``."""
    _point_at_cause(span, cause[0], cause[1])


def _point_at_cause(span: SpanRecord, service: str, span_id: str) -> None:
    span.set_attribute(semconv.DL_FAULT_ROOT_CAUSE_SERVICE, service)
    span.set_attribute(semconv.DL_FAULT_ROOT_CAUSE_SPAN_ID, span_id)

"""A cheaper OTLP span export path, and a batch processor whose drops are visible.

``encode_spans(spans)`` turns SDK spans into the standard OTLP
``ExportTraceServiceRequest``, the same message the official encoder
(``opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans``) builds, at a
fraction of its CPU. ``FastOTLPSpanExporter`` (gRPC) and ``FastOTLPHTTPSpanExporter``
(HTTP/protobuf) are the official exporters with only that translation step replaced:
endpoint, headers, TLS, timeout, compression, retry and every ``OTEL_EXPORTER_OTLP_*``
variable behave exactly as in the official ones, and the bytes on the wire are plain
OTLP that any collector parses.

Why it is cheaper: the official encoder builds every ``KeyValue``, ``Span`` and
``ScopeSpans`` as a free-standing protobuf object and passes lists of them to the
parent's constructor, which copies each one; a span is copied three times on its way
into the request, and every attribute goes through several Python calls. Here the
request is built top-down in place with the upb-backed classes (``repeated.add()``), so
nothing is copied, the resource and scope messages are encoded once per batch, and the
common attribute types (str, float, int, bool) are set with one type check.

``DropCountingSpanProcessor`` is a ``BatchSpanProcessor`` that counts the spans it drops
because its queue is full, on the ``otel_dl.export.dropped_spans`` counter, and logs a
warning with the count at most once every ``warn_interval`` seconds.

``otel_dl.instrument()`` always uses the processor, and the fast exporters with
``exporter_encoder="fast"`` (``OTEL_DL_EXPORT_ENCODER=fast``). To use them in your own
setup::

    provider.add_span_processor(DropCountingSpanProcessor(FastOTLPSpanExporter()))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as _GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as _HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import SpanKind

from otel_dl import semconv
from otel_dl._guard import report_internal_error

__all__ = [
    "DropCountingSpanProcessor",
    "FastOTLPHTTPSpanExporter",
    "FastOTLPSpanExporter",
    "encode_spans",
]

logger = logging.getLogger("otel_dl")
# Failures of the HTTP transport are logged where the official exporter logs them.
_http_logger = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")

try:  # The HTTP exporter's request-size limit, from opentelemetry-exporter-otlp 1.45.
    from opentelemetry.exporter.otlp.proto.http._common import (
        RequestPayloadTooLargeError,
        _is_request_too_large,
    )

    _HAS_SIZE_LIMIT = True
except ImportError:
    _HAS_SIZE_LIMIT = False

_KIND = {
    SpanKind.INTERNAL: Span.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: Span.SPAN_KIND_SERVER,
    SpanKind.CLIENT: Span.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: Span.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: Span.SPAN_KIND_CONSUMER,
}
# SpanFlags: the exporter always knows whether the parent was remote, so it says so.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200


def _set_value(target: AnyValue, value: Any) -> None:
    """Fill ``target`` from ``value`` with the official encoder's type rules and order."""
    if value is None:
        target.SetInParent()
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, Sequence):
        # An empty sequence is still an (empty) array, not an unset value.
        target.array_value.SetInParent()
        values = target.array_value.values
        for item in value:
            _set_value(values.add(), item)
    elif isinstance(value, Mapping):
        target.kvlist_value.SetInParent()
        pairs = target.kvlist_value.values
        for key, item in value.items():
            pair = pairs.add()
            pair.key = str(key)
            _set_value(pair.value, item)
    else:
        raise TypeError(f"Invalid type {type(value)} of value {value}")


def _add_attributes(target: Any, attributes: Mapping[str, Any] | None) -> None:
    """Append ``attributes`` to the repeated KeyValue field ``target``.

    An attribute that cannot be encoded is logged and left out, as the official encoder
    does, so one bad value never costs the span.
    """
    if not attributes:
        return
    # The SDK's BoundedAttributes iterates through the Mapping ABC (a Python call per
    # key and per value); its plain dict holds the same items and iterates in C.
    for key, value in getattr(attributes, "_dict", attributes).items():
        pair: KeyValue = target.add(key=key)
        try:
            # Exact types first: these are nearly all DL attributes, one check each.
            kind = type(value)
            if kind is str:
                pair.value.string_value = value
            elif kind is float:
                pair.value.double_value = value
            elif kind is int:
                pair.value.int_value = value
            elif kind is bool:
                pair.value.bool_value = value
            else:
                _set_value(pair.value, value)
        except Exception as error:
            del target[-1]
            logger.exception("Failed to encode key %s: %s", key, error)


def _fill_span(out: Span, span: ReadableSpan) -> None:
    context = span.context
    out.trace_id = context.trace_id.to_bytes(16, "big")
    out.span_id = context.span_id.to_bytes(8, "big")
    trace_state = context.trace_state
    if trace_state:
        out.trace_state = ",".join(f"{key}={value}" for key, value in trace_state.items())
    parent = span.parent
    if parent is not None:
        out.parent_span_id = parent.span_id.to_bytes(8, "big")
        out.flags = _HAS_IS_REMOTE | _IS_REMOTE if parent.is_remote else _HAS_IS_REMOTE
    else:
        out.flags = _HAS_IS_REMOTE
    out.name = span.name
    out.kind = _KIND[span.kind]
    if span.start_time is not None:
        out.start_time_unix_nano = span.start_time
    if span.end_time is not None:
        out.end_time_unix_nano = span.end_time
    # ReadableSpan.attributes wraps the same mapping in a new read-only proxy per call.
    _add_attributes(out.attributes, getattr(span, "_attributes", None) or span.attributes)
    if span.dropped_attributes:
        out.dropped_attributes_count = span.dropped_attributes
    for event in span.events:
        out_event = out.events.add(name=event.name, time_unix_nano=event.timestamp)
        _add_attributes(out_event.attributes, event.attributes)
        if event.dropped_attributes:
            out_event.dropped_attributes_count = event.dropped_attributes
    if span.dropped_events:
        out.dropped_events_count = span.dropped_events
    for link in span.links:
        link_context = link.context
        out_link = out.links.add(
            trace_id=link_context.trace_id.to_bytes(16, "big"),
            span_id=link_context.span_id.to_bytes(8, "big"),
            flags=_HAS_IS_REMOTE | _IS_REMOTE if link_context.is_remote else _HAS_IS_REMOTE,
        )
        _add_attributes(out_link.attributes, link.attributes)
        if link.dropped_attributes:
            out_link.dropped_attributes_count = link.dropped_attributes
    if span.dropped_links:
        out.dropped_links_count = span.dropped_links
    # The official encoder always sends a Status message, unset included; so do we.
    status = span.status
    out.status.code = status.status_code.value  # type: ignore[assignment]
    if status.description:
        out.status.message = status.description


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """Encode SDK spans as one OTLP ``ExportTraceServiceRequest``.

    Spans are grouped by resource and instrumentation scope (by equality, as the official
    encoder groups them); each resource and scope is encoded once per call.
    """
    request = ExportTraceServiceRequest()
    # Spans of one provider share their Resource and scope objects, so a lookup by id
    # avoids hashing the Resource (a JSON dump of its attributes) for every span.
    by_id: dict[tuple[int, int], Any] = {}
    by_value: dict[Any, Any] = {}
    resources: dict[Any, ResourceSpans] = {}
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope or None
        ids = (id(resource), id(scope))
        target = by_id.get(ids)
        if target is None:
            target = by_value.get((resource, scope))
            if target is None:
                target = by_value[(resource, scope)] = _scope_spans(
                    request, resources, resource, scope
                ).spans
            by_id[ids] = target
        _fill_span(target.add(), span)
    return request


def _scope_spans(
    request: ExportTraceServiceRequest,
    resources: dict[Any, ResourceSpans],
    resource: Any,
    scope: Any,
) -> ScopeSpans:
    resource_spans = resources.get(resource)
    if resource_spans is None:
        resource_spans = resources[resource] = request.resource_spans.add()
        resource_spans.resource.SetInParent()
        _add_attributes(resource_spans.resource.attributes, resource.attributes)
        if resource.schema_url:
            resource_spans.schema_url = resource.schema_url
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.SetInParent()
    if scope is not None:
        scope_spans.scope.name = scope.name
        if scope.version:
            scope_spans.scope.version = scope.version
        _add_attributes(scope_spans.scope.attributes, scope.attributes)
        if scope.schema_url:
            scope_spans.schema_url = scope.schema_url
    return scope_spans


class FastOTLPSpanExporter(_GrpcSpanExporter):
    """The official OTLP/gRPC span exporter with :func:`encode_spans` as its encoder.

    Takes the same arguments and environment variables as
    ``opentelemetry.exporter.otlp.proto.grpc.trace_exporter.OTLPSpanExporter``.
    """

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return encode_spans(data)


class FastOTLPHTTPSpanExporter(_HttpSpanExporter):
    """The official OTLP/HTTP span exporter with :func:`encode_spans` as its encoder.

    Takes the same arguments and environment variables as
    ``opentelemetry.exporter.otlp.proto.http.trace_exporter.OTLPSpanExporter``; sending,
    retry, compression and the request-size limit are the official exporter's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # export() below is the official one of opentelemetry-exporter-otlp 1.45 and later
        # with the encoder swapped; earlier versions encode through _serialize_spans
        # (before 1.36), overridden below, or inline (1.36 to 1.44), where this exporter
        # sends what the official one does, encoded the official way.
        self._fast_export = _HAS_SIZE_LIMIT and all(
            hasattr(self, name) for name in ("_shutdown", "_metrics", "_client")
        )

    def _serialize_spans(self, spans: Sequence[ReadableSpan]) -> bytes:
        return encode_spans(spans).SerializePartialToString()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self._fast_export:
            return super().export(spans)
        # The official export() with encode_spans swapped: the same shutdown check,
        # exporter self-metrics, request-size limit and client (retry, compression).
        if self._shutdown:
            _http_logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                data = encode_spans(spans).SerializePartialToString()
            except Exception as error:
                _http_logger.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            if _is_request_too_large(data, self._max_request_size):
                _http_logger.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size"
                    " %d bytes.",
                    len(data),
                    self._max_request_size,
                )
                result.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(data)} bytes exceeds "
                    f"max_request_size {self._max_request_size} bytes."
                )
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


class DropCountingSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` that counts and reports the spans its full queue drops.

    Each drop adds 1 to the ``otel_dl.export.dropped_spans`` counter; a warning with the
    number dropped since the last one is logged at most once every ``warn_interval``
    seconds, so a saturated exporter is visible without flooding the log. The count
    uses the SDK's own queue-full test, so it matches the SDK's "Queue full" log (it may
    count a span the export thread made room for in between). Takes the
    ``BatchSpanProcessor`` arguments (and ``OTEL_BSP_*`` variables).
    """

    def __init__(
        self, span_exporter: SpanExporter, *args: Any, warn_interval: float = 10.0, **kwargs: Any
    ) -> None:
        super().__init__(span_exporter, *args, **kwargs)
        self._warn_interval = warn_interval
        # Where the SDK keeps its queue: in a BatchProcessor from SDK 1.36, on the
        # processor itself before.
        self._inner = getattr(self, "_batch_processor", None)
        self._drop_lock = threading.Lock()
        self._dropped_total = 0
        self._dropped_unreported = 0
        self._last_warning = float("-inf")
        spec = semconv.METRICS[semconv.METRIC_EXPORT_DROPPED_SPANS]
        self._drop_counter = metrics.get_meter("otel_dl").create_counter(
            spec.name, unit=spec.unit, description=spec.brief
        )

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because the queue was full, since this processor was made."""
        return self._dropped_total

    def on_end(self, span: ReadableSpan) -> None:
        try:
            if self._queue_full() and span.context is not None and span.context.trace_flags.sampled:
                self._record_drop()
        except Exception:
            report_internal_error("export.drop_count")
        super().on_end(span)

    def _queue_full(self) -> bool:
        """The SDK's own queue-full test, made just before it: a full queue now means the
        SDK drops a queued span to make room for this one."""
        inner = self._inner
        if inner is not None:
            return len(inner._queue) >= inner._max_queue_size and not inner._shutdown
        return len(self.queue) >= self.max_queue_size and not self.done  # type: ignore[attr-defined]

    def _record_drop(self) -> None:
        now = time.monotonic()
        with self._drop_lock:
            self._dropped_total += 1
            self._dropped_unreported += 1
            report = now - self._last_warning >= self._warn_interval
            if report:
                count, total = self._dropped_unreported, self._dropped_total
                self._dropped_unreported = 0
                self._last_warning = now
        self._drop_counter.add(1)
        if report:
            logger.warning(
                "otel-dl: the span export queue is full; %d span(s) dropped since the last"
                " warning (%d in all). The exporter cannot keep up: raise"
                " OTEL_BSP_MAX_QUEUE_SIZE, sample (OTEL_DL_SAMPLE_EVERY) or use the fast"
                " encoder (OTEL_DL_EXPORT_ENCODER=fast).",
                count,
                total,
            )

    def shutdown(self) -> None:
        super().shutdown()
        with self._drop_lock:
            count, self._dropped_unreported = self._dropped_unreported, 0
        if count:
            logger.warning(
                "otel-dl: %d more span(s) were dropped by the full export queue (%d in all)",
                count,
                self._dropped_total,
            )

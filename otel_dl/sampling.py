"""Signal-aware sampling: keep every abnormal otel-dl span, and 1 in N of the normal ones.

Head sampling drops anomalies as readily as normal spans, and tail sampling in a
collector pays for every span first. otel-dl knows a span's signals when it ends, so it
decides there:

- **abnormal** otel-dl spans are always kept: drift ``warn``/``alert``, any NaN/Inf
  value, more than 5% of values outside the reference range, a schema mismatch, stale
  features, mean confidence under ``confidence_threshold``, an error status, or a
  duration above ``sample_latency`` (when set);
- **normal** otel-dl spans are kept 1 in ``sample_every``, chosen by span id, so the
  choice is uniform and needs no shared state;
- every kept otel-dl span carries ``dl.sampling.rate``: 1 for an abnormal span, N for a
  normal one, so counts can be re-weighted (sum the rates);
- spans that are not otel-dl's (the application's own, HTTP and gRPC spans) are never
  dropped.

Parent/child integrity: a span whose child was kept is kept too (the child's end marks
its parent, and parents end after their children), and CLIENT/SERVER/PRODUCER/CONSUMER
spans, which another service continues or which continue another service, are never
dropped. So no kept span loses its parent, with one limit: a child that ends after its
parent cannot keep that parent alive.

Metrics are recorded for every span before this decision, so dashboards stay complete.
``instrument(sample_every=10)`` installs it in the provider otel-dl creates; an
application with its own TracerProvider wraps its export processor::

    provider.add_span_processor(SignalAwareSpanProcessor(BatchSpanProcessor(exporter), 10))
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from otel_dl import semconv
from otel_dl._config import Config, get_config

# A few values past the reference's min/max are normal for any sample (about 2/n of
# them for a reference of n rows); the collector's catalog flags data quality at 5%.
OUT_OF_RANGE_ABNORMAL = 0.05
_REMOTE_KINDS = (SpanKind.CLIENT, SpanKind.SERVER, SpanKind.PRODUCER, SpanKind.CONSUMER)
_MAX_MARKED_PARENTS = 100_000


def is_abnormal(
    attrs: Mapping[str, AttributeValue],
    error: bool,
    duration_s: float,
    config: Config | None = None,
) -> bool:
    """Whether a span with these signals must be kept whatever the sampling rate."""
    config = config or get_config()
    if error:
        return True
    if attrs.get(semconv.DL_DRIFT_STATUS) in (
        semconv.DRIFT_STATUS_WARN,
        semconv.DRIFT_STATUS_ALERT,
    ):
        return True
    nan_share = attrs.get(semconv.DL_QUALITY_NAN_FRACTION)
    if isinstance(nan_share, float) and nan_share > 0.0:
        return True
    outside = attrs.get(semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION)
    if isinstance(outside, float) and outside > OUT_OF_RANGE_ABNORMAL:
        return True
    if attrs.get(semconv.DL_QUALITY_SCHEMA_MISMATCH) is True:
        return True
    if attrs.get(semconv.DL_FEATURE_STALE) is True:
        return True
    confidence = attrs.get(semconv.DL_CONFIDENCE_MEAN)
    if isinstance(confidence, float) and confidence < config.confidence_threshold:
        return True
    return config.sample_latency is not None and duration_s > config.sample_latency


def sampling_rate(
    attrs: Mapping[str, AttributeValue], error: bool, duration_s: float, config: Config
) -> int:
    """The ``dl.sampling.rate`` of an otel-dl span: 1 when abnormal, else ``sample_every``."""
    return 1 if is_abnormal(attrs, error, duration_s, config) else config.sample_every


class SignalAwareSpanProcessor(SpanProcessor):
    """Forwards every span to ``inner`` except the normal otel-dl spans not sampled.

    See the module docstring for the rules.
    """

    def __init__(self, inner: SpanProcessor, sample_every: int) -> None:
        if sample_every < 1:
            raise ValueError(f"sample_every must be at least 1, got {sample_every}")
        self.inner = inner
        self.sample_every = sample_every
        self._lock = threading.Lock()
        self._kept_children: OrderedDict[int, None] = OrderedDict()
        self.kept = 0
        self.dropped = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self._keep(span):
            parent = span.parent
            if parent is not None and not parent.is_remote:
                with self._lock:
                    self._kept_children[parent.span_id] = None
                    if len(self._kept_children) > _MAX_MARKED_PARENTS:
                        self._kept_children.popitem(last=False)
            self.inner.on_end(span)

    def _keep(self, span: ReadableSpan) -> bool:
        attrs = span.attributes or {}
        context = span.get_span_context()
        with self._lock:
            has_kept_child = context.span_id in self._kept_children
            if has_kept_child:
                del self._kept_children[context.span_id]
        rate = attrs.get(semconv.DL_SAMPLING_RATE)
        if (
            semconv.DL_STAGE not in attrs
            or rate == 1
            or has_kept_child
            or span.kind in _REMOTE_KINDS
            or span.status.status_code is StatusCode.ERROR
            or context.span_id % self.sample_every == 0
        ):
            self.kept += 1
            return True
        self.dropped += 1
        return False

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)

"""The collector's own metrics, served in Prometheus format at ``/metrics`` on the API port.

One :class:`CollectorMetrics` per collector, on its own registry (so several collectors
in one process, as in tests, do not clash)::

    metrics = CollectorMetrics(max_services=100)
    metrics.spans_received.inc(120)
    metrics.observe_signals(spans)            # durations, drift and confidence, per service
    metrics.count_fault("feature-service", "stale_features", "stale-features")
    text = metrics.render()

Besides the pipeline's own counters, it turns what the spans carry into per-service
series: attributed faults by root-cause service and kind, the duration of every otel-dl
span (``dl.operation.duration``, which the instrumented processes do not record by
default: see ``duration_metric``), the drift score and drift status, and the mean
prediction confidence of every span that carries them. Those are
summed across collector instances by Prometheus, so a dashboard sees every service
whichever instance decided its traces. The label is ``service_name`` (the span's
``service.name``), not ``service``, which the Prometheus Operator sets on its targets.
Label values are bounded: at most ``max_services`` service names per process (later
ones are counted as ``(other)``), as many ``dl.stage``/``dl.model.name`` pairs, drift
methods and statuses from the semantic conventions only.
:meth:`CollectorMetrics.count_fault` and :meth:`CollectorMetrics.observe_signals` belong
to the one decision thread.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from otel_dl import semconv

from .decode import SpanRecord

_log = logging.getLogger(__name__)

OTHER_SERVICES = "(other)"
"""The service label of every service past ``max_services``."""
UNKNOWN_METHOD = "unknown"
"""The method label of a drift score sent without a known ``dl.drift.method``."""
SIGNAL_ATTRIBUTES = frozenset(
    {
        semconv.DL_DRIFT_SCORE,
        semconv.DL_DRIFT_METHOD,
        semconv.DL_DRIFT_STATUS,
        semconv.DL_CONFIDENCE_MEAN,
        semconv.DL_STAGE,
        semconv.DL_MODEL_NAME,
        semconv.DL_SAMPLING_RATE,
    }
)
"""Span attributes the per-service series read, whatever the catalog reads."""
# Around the default warn / alert thresholds of every method (0.1 / 0.2 or 0.25).
_DRIFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0, 5.0)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Seconds, from a one-row model call (about 100 us) to a long file read or training step.
_DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class BatchHistogram(Collector):
    """A labelled histogram observed in batches by one thread, served by the registry.

    prometheus_client's ``Histogram`` takes a lock for its sum and another for a bucket
    on every observation; at one observation per span that made the per-service series
    cost a quarter of attribution's CPU (benchmarks/collector.py), and at one per trace
    the attribution time cost 3 % of the decision thread. This one takes its lock once
    per batch::

        with histogram.lock:
            histogram.observe(("inference",), 0.91)
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self._bounds = (*buckets, math.inf)
        # Per label values: a count per bucket (not cumulative), then the sum.
        self._rows: dict[tuple[str, ...], list[float]] = {}
        if not self.labelnames:  # served at once, as an unlabelled series should be
            self._rows[()] = [0.0] * (len(self._bounds) + 1)
        self.lock = threading.Lock()
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float, weight: int = 1) -> None:
        """Count ``value`` (finite) ``weight`` times under ``labels``; the caller holds
        :attr:`lock`."""
        row = self._rows.get(labels)
        if row is None:
            row = self._rows[labels] = [0.0] * (len(self._bounds) + 1)
        row[bisect_left(self._bounds, value)] += weight
        row[-1] += value * weight

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self.lock:
            rows = [(labels, list(row)) for labels, row in self._rows.items()]
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, row in rows:
            cumulative, buckets = 0.0, []
            for bound, count in zip(self._bounds, row, strict=False):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(labels), buckets, sum_value=row[-1])
        yield family


class CollectorMetrics:
    """Counters, gauges and histograms of one collector."""

    def __init__(self, max_services: int = 100) -> None:
        self.max_services = max_services
        self._services: set[str] = set()
        self._operations: set[tuple[str, str]] = set()
        self.registry = CollectorRegistry()
        r = self.registry
        self.spans_received = Counter(
            "otel_dl_collector_spans_received", "Spans accepted from senders", registry=r
        )
        self.spans_rejected = Counter(
            "otel_dl_collector_spans_rejected",
            "Spans refused as malformed (OTLP partial success)",
            registry=r,
        )
        self.spans_forwarded = Counter(
            "otel_dl_collector_spans_forwarded", "Spans accepted by the export backend", registry=r
        )
        self.spans_dropped = Counter(
            "otel_dl_collector_spans_dropped",
            "Spans the backend refused permanently",
            registry=r,
        )
        self.spans_late = Counter(
            "otel_dl_collector_spans_late",
            "Spans that arrived after their trace was decided",
            registry=r,
        )
        self.requests_throttled = Counter(
            "otel_dl_collector_requests_throttled",
            "Requests answered with back-pressure, by reason: disk (queue_max_bytes spent), "
            "memory (RSS over the soft limit) or overload (waited over max_request_wait)",
            ["reason"],
            registry=r,
        )
        self.attributes_ignored = Counter(
            "otel_dl_collector_attributes_ignored",
            "Span attributes ignored for fault attribution because their value type is not "
            "the semantic conventions' (the span is kept and forwarded unchanged), by "
            "attribute and the value type received",
            ["attribute", "value_type"],
            registry=r,
        )
        self.export_retries = Counter(
            "otel_dl_collector_export_retries", "Export attempts that will be retried", registry=r
        )
        self.traces_assembled = Counter(
            "otel_dl_collector_traces_assembled", "Traces decided", registry=r
        )
        self.traces_evicted = Counter(
            "otel_dl_collector_traces_evicted",
            "Traces decided early because the buffer was full",
            registry=r,
        )
        self.decision_errors = Counter(
            "otel_dl_collector_decision_errors",
            "Traces (or decision rounds) that attribution failed on; forwarded unattributed",
            registry=r,
        )
        self.faults = Counter(
            "otel_dl_collector_faults",
            "Traces attributed a fault, by root-cause service and dl.fault.kind",
            ["service_name", "kind"],
            registry=r,
        )
        self.fault_modes = Counter(
            "otel_dl_collector_fault_modes",
            "Traces attributed a fault, by root-cause service and dl.fault.mode (the "
            "catalog's mode id): what the alerting rules of alerts.py select on",
            ["service_name", "mode"],
            registry=r,
        )
        self.notifications = Counter(
            "otel_dl_collector_notifications",
            "Fault notifications by outcome: sent (the webhook took it), duplicate (its "
            "incident was already notified), rate_limited, queue_full and failed (the "
            "receiver refused it, stayed unreachable through every retry, or the collector "
            "stopped first); the last two are lost",
            ["outcome"],
            registry=r,
        )
        self.drift_score = BatchHistogram(
            "otel_dl_collector_drift_score",
            "dl.drift.score of each span that carries one, by service and dl.drift.method",
            ["service_name", "method"],
            _DRIFT_BUCKETS,
            r,
        )
        self.drift_status = Counter(
            "otel_dl_collector_drift_status",
            "Spans carrying dl.drift.status, by service and status (ok, warn, alert)",
            ["service_name", "status"],
            registry=r,
        )
        self.confidence_mean = BatchHistogram(
            "otel_dl_collector_confidence_mean",
            "dl.confidence.mean (mean max-class probability of a call) of each span that "
            "carries one, by service",
            ["service_name"],
            _CONFIDENCE_BUCKETS,
            r,
        )
        self.operation_duration = BatchHistogram(
            "otel_dl_collector_operation_duration_seconds",
            "Duration of each otel-dl span (dl.operation.duration, derived from the spans), "
            "by service, dl.stage and dl.model.name; a span kept by signal-aware sampling "
            "counts dl.sampling.rate times",
            ["service_name", "stage", "model"],
            _DURATION_BUCKETS,
            r,
        )
        self.spans_buffered = Gauge(
            "otel_dl_collector_spans_buffered", "Spans held in memory for assembly", registry=r
        )
        self.spans_queued = Gauge(
            "otel_dl_collector_spans_queued",
            "Spans waiting in the on-disk export queue for the backend",
            registry=r,
        )
        self.queue_bytes = Gauge(
            "otel_dl_collector_queue_bytes",
            "Bytes in the persistent journal and export queue",
            registry=r,
        )
        self.rss_bytes = Gauge(
            "otel_dl_collector_rss_bytes",
            "Resident memory, sampled when memory_limit_mib is set",
            registry=r,
        )
        self.memory_in_use_bytes = Gauge(
            "otel_dl_collector_memory_in_use_bytes",
            "Resident memory less what Python's allocator holds free for reuse: what "
            "memory_limit_mib is judged on; sampled when it is set",
            registry=r,
        )
        self.attribution_seconds = BatchHistogram(
            "otel_dl_collector_attribution_seconds",
            "Time to attribute and enrich one trace",
            (),
            (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5),
            r,
        )

    def observe_memory(self, rss: int, in_use: int) -> None:
        """One sample of the memory guard (see admission.py)."""
        self.rss_bytes.set(rss)
        self.memory_in_use_bytes.set(in_use)

    def _bounded(self, seen: set[Any], value: Any, other: Any, what: str) -> Any:
        """``value``, or ``other`` once ``max_services`` other values are in ``seen``
        (with one warning naming the first value counted as ``other``)."""
        if value in seen:
            return value
        if len(seen) < self.max_services:
            seen.add(value)
            return value
        if other not in seen:
            seen.add(other)
            _log.warning(
                "more than %d %s (max_metric_services): the metrics count %r and later ones as %r",
                self.max_services,
                what,
                value,
                other,
            )
        return other

    def _service_label(self, service: str) -> str:
        """``service``, or :data:`OTHER_SERVICES` once ``max_services`` others are labelled."""
        label: str = self._bounded(self._services, service, OTHER_SERVICES, "services")
        return label

    def count_fault(self, service: str, kind: str, mode: str | None = None) -> None:
        """Count one trace attributed to ``service`` (its root cause) with ``kind``, and
        with the failure ``mode`` id when given."""
        label = self._service_label(service)
        self.faults.labels(label, kind).inc()
        if mode is not None:
            self.fault_modes.labels(label, mode).inc()

    def _operation_labels(self, stage: str, model: str) -> tuple[str, str]:
        """``(stage, model)``, or both :data:`OTHER_SERVICES` once ``max_services`` other
        pairs are labelled."""
        labels: tuple[str, str] = self._bounded(
            self._operations,
            (stage, model),
            (OTHER_SERVICES, OTHER_SERVICES),
            "dl.stage/dl.model.name pairs",
        )
        return labels

    def observe_signals(self, spans: Iterable[SpanRecord]) -> None:
        """Observe the duration of each otel-dl span (one with ``dl.stage``), and the drift
        score, drift status and mean confidence each span carries.

        A span kept 1 in N by signal-aware sampling (``dl.sampling.rate`` N) counts N times
        in the duration, as the N calls it stands for. Values arrive type-checked (see
        decode.py); non-finite ones are skipped, as a histogram cannot place them.
        """
        statuses: Tally[tuple[str, str]] = Tally()
        durations = self.operation_duration
        with self.drift_score.lock, self.confidence_mean.lock, durations.lock:
            for span in spans:
                attrs = span.attrs
                if not attrs:
                    continue
                stage = attrs.get(semconv.DL_STAGE)
                score = attrs.get(semconv.DL_DRIFT_SCORE)
                status = attrs.get(semconv.DL_DRIFT_STATUS)
                confidence = attrs.get(semconv.DL_CONFIDENCE_MEAN)
                if stage is None and score is None and status is None and confidence is None:
                    continue
                service = self._service_label(span.service)
                if stage is not None:
                    model = attrs.get(semconv.DL_MODEL_NAME) or ""
                    rate = attrs.get(semconv.DL_SAMPLING_RATE)
                    weight = rate if isinstance(rate, int) and rate > 1 else 1
                    stage, model = self._operation_labels(stage, model)
                    durations.observe((service, stage, model), span.duration, weight)
                if score is not None and math.isfinite(score):
                    method = attrs.get(semconv.DL_DRIFT_METHOD)
                    if method not in semconv.DRIFT_METHODS:
                        method = UNKNOWN_METHOD
                    self.drift_score.observe((service, method), score)
                if status in semconv.DRIFT_STATUSES:
                    statuses[service, status] += 1
                if confidence is not None and math.isfinite(confidence):
                    self.confidence_mean.observe((service,), confidence)
        for labels, count in statuses.items():
            self.drift_status.labels(*labels).inc(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

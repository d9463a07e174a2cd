"""The collector's own metrics, served in Prometheus format at ``/metrics`` on the API port.

One :class:`CollectorMetrics` per collector, on its own registry (so several collectors
in one process, as in tests, do not clash)::

    metrics = CollectorMetrics()
    metrics.spans_received.inc(120)
    text = metrics.render()
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class CollectorMetrics:
    """Counters, gauges and histograms of one collector."""

    def __init__(self) -> None:
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
            "otel_dl_collector_faults", "Traces attributed a fault", ["kind"], registry=r
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
        self.attribution_seconds = Histogram(
            "otel_dl_collector_attribution_seconds",
            "Time to attribute and enrich one trace",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5),
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

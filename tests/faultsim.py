"""A simulated DL system with injected faults, shared by benchmarks and tests.

Six services (gateway, ingest, feature-store, preprocess, inference, external-api), each
with its own real SDK TracerProvider exporting over OTLP/gRPC, emit one trace per
request; ``System.request(kind, t0)`` injects the fault ``kind`` (a ``dl.fault.kind``,
or None for normal traffic) at a random magnitude. ``TRUTH`` names the service and span
where each kind is injected. The traces go to an OTLP backend such as
:class:`tests.otlp_sink.OtlpSink`; ``collector_ranking`` reads the collector's verdict off
one trace of its ``traces()``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_dl import semconv

SERVICES = ("gateway", "ingest", "feature-store", "preprocess", "inference", "external-api")
# Ground truth per kind: (service, span name) where the fault is injected.
TRUTH = {
    semconv.FAULT_KIND_DATA_DRIFT: ("ingest", "ingest.read"),
    semconv.FAULT_KIND_DATA_QUALITY: ("preprocess", "preprocess.transform"),
    semconv.FAULT_KIND_SCHEMA_MISMATCH: ("preprocess", "preprocess.transform"),
    semconv.FAULT_KIND_STALE_FEATURES: ("feature-store", "feature_store.get"),
    semconv.FAULT_KIND_MODEL_CHANGE: ("inference", "inference"),
    semconv.FAULT_KIND_LOW_CONFIDENCE: ("inference", "inference"),
    semconv.FAULT_KIND_LATENCY: ("preprocess", "preprocess.transform"),
    semconv.FAULT_KIND_ERROR: ("preprocess", "preprocess.transform"),
    semconv.FAULT_KIND_DEPENDENCY_OUTAGE: ("external-api", "external.call"),
}


class System:
    """The simulated pipeline: one SDK tracer provider per service."""

    def __init__(
        self,
        endpoint: str,
        rng: random.Random,
        wrap: Callable[[SpanProcessor], SpanProcessor] = lambda processor: processor,
    ) -> None:
        self.rng = rng
        self.providers = {}
        for service in SERVICES:
            provider = TracerProvider(resource=Resource.create({"service.name": service}))
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
            provider.add_span_processor(wrap(BatchSpanProcessor(exporter)))
            self.providers[service] = provider
        self.tracers = {s: p.get_tracer("bench") for s, p in self.providers.items()}
        self.model_versions = 0

    def _d(self, base_ms: float) -> int:
        return int(base_ms * 1e6 * self.rng.lognormvariate(0, 0.1))

    def request(self, kind: str | None, t0: int) -> tuple[str, dict[str, str]]:
        """Emit one trace; return its trace id hex and span ids by span name."""
        r = self.rng
        ids: dict[str, str] = {}
        mag = r.uniform(0, 1)

        def span(service, name, parent, start, dur, attrs, kind_=SpanKind.INTERNAL, error=False):
            ctx = trace.set_span_in_context(parent) if parent is not None else None
            s = self.tracers[service].start_span(
                name, context=ctx, kind=kind_, start_time=start, attributes=attrs
            )
            if error:
                s.set_status(Status(StatusCode.ERROR, "injected"))
                s.add_event("exception", {"exception.type": "RuntimeError"})
            ids[name] = format(s.get_span_context().span_id, "016x")
            return s, start + dur

        root = self.tracers["gateway"].start_span("predict", kind=SpanKind.SERVER, start_time=t0)
        ids["predict"] = format(root.get_span_context().span_id, "016x")
        t = t0 + 100_000
        drift = 0.3 + 0.6 * mag if kind == semconv.FAULT_KIND_DATA_DRIFT else r.uniform(0.01, 0.1)
        # The SDK's default psi thresholds: warn 0.1, alert 0.25.
        status = semconv.DRIFT_STATUS_OK
        if drift >= 0.25:
            status = semconv.DRIFT_STATUS_ALERT
        elif drift >= 0.1:
            status = semconv.DRIFT_STATUS_WARN
        s, t = span(
            "ingest",
            "ingest.read",
            root,
            t,
            self._d(5),
            {
                semconv.DL_STAGE: semconv.STAGE_INGEST,
                semconv.DL_DRIFT_SCORE: drift,
                semconv.DL_DRIFT_METHOD: "psi",
                semconv.DL_DRIFT_STATUS: status,
            },
        )
        s.end(end_time=t)
        fresh = r.uniform(30, 90) * (
            10 + 40 * mag if kind == semconv.FAULT_KIND_STALE_FEATURES else 1
        )
        s, t = span(
            "feature-store",
            "feature_store.get",
            root,
            t,
            self._d(3),
            {semconv.DL_STAGE: semconv.STAGE_FEATURE_STORE, semconv.DL_FEATURE_FRESHNESS: fresh},
        )
        s.end(end_time=t)
        attrs: dict[str, Any] = {
            semconv.DL_STAGE: semconv.STAGE_PREPROCESS,
            semconv.DL_QUALITY_NAN_FRACTION: 0.0,
        }
        if kind == semconv.FAULT_KIND_DATA_QUALITY:
            attrs[semconv.DL_QUALITY_NAN_FRACTION] = 0.02 + 0.5 * mag
        if kind == semconv.FAULT_KIND_SCHEMA_MISMATCH:
            attrs[semconv.DL_QUALITY_SCHEMA_MISMATCH] = True
        dur = self._d(8) * (4 + 11 * mag if kind == semconv.FAULT_KIND_LATENCY else 1)
        s, t = span(
            "preprocess",
            "preprocess.transform",
            root,
            t,
            int(dur),
            attrs,
            error=kind == semconv.FAULT_KIND_ERROR,
        )
        s.end(end_time=t)
        degraded = kind in (
            semconv.FAULT_KIND_DATA_DRIFT,
            semconv.FAULT_KIND_DATA_QUALITY,
            semconv.FAULT_KIND_MODEL_CHANGE,
            semconv.FAULT_KIND_LOW_CONFIDENCE,
            semconv.FAULT_KIND_SCHEMA_MISMATCH,
        )
        conf = r.uniform(0.1, 0.45) if degraded else r.uniform(0.8, 0.95)
        fingerprint = "model-v1"
        if kind == semconv.FAULT_KIND_MODEL_CHANGE:
            self.model_versions += 1
            fingerprint = f"model-x{self.model_versions}"
        outage = kind == semconv.FAULT_KIND_DEPENDENCY_OUTAGE
        timeout = outage and r.random() < 0.5
        inf, t_inf = span(
            "inference",
            "inference",
            root,
            t,
            self._d(20),
            {
                semconv.DL_STAGE: semconv.STAGE_INFERENCE,
                semconv.DL_CONFIDENCE_MEAN: conf,
                semconv.DL_MODEL_NAME: "ranker",
                semconv.DL_MODEL_FINGERPRINT: fingerprint,
            },
            error=outage and not timeout,
        )
        call_dur = self._d(6) * (5 + 15 * mag if timeout else 1)
        call, t_call = span(
            "external-api",
            "external.call",
            inf,
            t + 1_000_000,
            int(call_dur),
            {
                "server.address": "api.partner.example",
                semconv.DL_STAGE: semconv.STAGE_EXTERNAL,
            },
            kind_=SpanKind.CLIENT,
            error=outage and not timeout,
        )
        call.end(end_time=t_call)
        inf.end(end_time=max(t_inf, t_call + 1_000_000))
        if kind == semconv.FAULT_KIND_ERROR or (outage and not timeout):
            root.set_status(Status(StatusCode.ERROR))
        root.end(end_time=max(t_inf, t_call) + 2_000_000)
        return format(root.get_span_context().trace_id, "032x"), ids

    def flush(self) -> None:
        for provider in self.providers.values():
            provider.force_flush()

    def shutdown(self) -> None:
        for provider in self.providers.values():
            provider.shutdown()


def collector_ranking(spans: list[dict[str, Any]]) -> tuple[list[str], str | None]:
    """The collector's verdict on one trace (its spans as ``OtlpSink.traces()`` gives them):
    (candidate services ranked, root-cause span id)."""
    root = next((s for s in spans if not s["parent"]), None)
    if root is None or semconv.DL_FAULT_CANDIDATES not in root["attrs"]:
        return [], None
    return list(root["attrs"][semconv.DL_FAULT_CANDIDATES]), root["attrs"].get(
        semconv.DL_FAULT_ROOT_CAUSE_SPAN_ID
    )


def preserialised_requests(n_requests: int, traces_per_request: int, seed: int) -> list[bytes]:
    """Pre-serialised OTLP requests for throughput runs: each trace is 5 spans across 3
    services (gateway → preprocess, inference → tokenize, forward), one attribute each."""
    rng = random.Random(seed)
    out = []
    trace_no = 0
    for _ in range(n_requests):
        req = ExportTraceServiceRequest()
        by_service = {}
        for service in ("gateway", "preprocess", "inference"):
            rs = req.resource_spans.add()
            kv = rs.resource.attributes.add()
            kv.key, kv.value.string_value = "service.name", service
            by_service[service] = rs.scope_spans.add()
        for _ in range(traces_per_request):
            trace_no += 1
            tid = trace_no.to_bytes(16, "big")
            base = 1_700_000_000_000_000_000 + trace_no * 1000
            for i, (service, name, parent) in enumerate(
                (
                    ("gateway", "predict", None),
                    ("preprocess", "transform", 0),
                    ("inference", "inference", 0),
                    ("inference", "tokenize", 2),
                    ("inference", "forward", 2),
                )
            ):
                s = by_service[service].spans.add()
                s.trace_id, s.span_id = tid, (trace_no * 8 + i).to_bytes(8, "big")
                if parent is not None:
                    s.parent_span_id = (trace_no * 8 + parent).to_bytes(8, "big")
                s.name = name
                s.start_time_unix_nano = base
                s.end_time_unix_nano = base + int(rng.lognormvariate(15, 0.1))
                kv = s.attributes.add()
                kv.key, kv.value.double_value = semconv.DL_CONFIDENCE_MEAN, rng.uniform(0.8, 0.95)
        out.append(req.SerializeToString())
    return out

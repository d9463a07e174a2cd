"""Fixtures for the collector tests: a real OTLP sink, collectors on ephemeral ports and
real OpenTelemetry SDK tracer providers exporting to them over loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_dl.collector.assemble import any_value
from otel_dl.collector.config import load_config
from otel_dl.collector.pipeline import Collector


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An in-process OTLP/gRPC backend that records what it is sent."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.fail_with: grpc.StatusCode | None = None
        self.lock = threading.Lock()

    def Export(self, request, context):
        if self.fail_with is not None:
            context.abort(self.fail_with, "sink told to fail")
        with self.lock:
            self.requests.append(request)
        return ExportTraceServiceResponse()

    def spans(self) -> dict[str, dict[str, Any]]:
        """Received spans by name: attributes plus 'service' and ids."""
        out: dict[str, dict[str, Any]] = {}
        with self.lock:
            for req in self.requests:
                for rs in req.resource_spans:
                    service = next(
                        kv.value.string_value
                        for kv in rs.resource.attributes
                        if kv.key == "service.name"
                    )
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            attrs = {kv.key: any_value(kv.value) for kv in span.attributes}
                            attrs["service"] = service
                            attrs["span_id"] = span.span_id.hex()
                            out[span.name] = attrs
        return out

    def count(self) -> int:
        with self.lock:
            return sum(
                len(ss.spans)
                for r in self.requests
                for rs in r.resource_spans
                for ss in rs.scope_spans
            )


def _wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    return _wait_for


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    servicer = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None).wait()


@pytest.fixture
def make_collector(tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    started: list[Collector] = []

    def make(**flags: Any) -> Collector:
        values = {
            "grpc_port": 0,
            "http_port": 0,
            "api_port": 0,
            "decision_wait": 0.3,
            "early_grace": 0.05,
            "store": str(tmp_path / "faults.sqlite"),
            "queue_dir": str(tmp_path / "queue"),
            "min_baseline_samples": 5,
            **flags,
        }
        collector = Collector(load_config(flags=values))
        collector.start()
        started.append(collector)
        return collector

    yield make
    for collector in started:
        if collector._decider.is_alive():
            collector.stop()


@pytest.fixture
def make_provider() -> Iterator[Callable[..., TracerProvider]]:
    providers: list[TracerProvider] = []

    def make(service: str, endpoint: str, protocol: str = "grpc") -> TracerProvider:
        if protocol == "grpc":
            exporter: Any = GrpcExporter(endpoint=endpoint, insecure=True)
        else:
            exporter = HttpExporter(endpoint=endpoint)
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        provider.shutdown()

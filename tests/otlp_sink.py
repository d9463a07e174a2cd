"""A real OTLP/gRPC trace receiver on loopback, for tests that use the real exporter."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every ResourceSpans it is sent. Use as a context manager."""

    def __init__(self) -> None:
        self.resource_spans: list[ResourceSpans] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):
        with self._lock:
            self.resource_spans.extend(request.resource_spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def span_names(self) -> list[str]:
        with self._lock:
            return [
                span.name
                for rs in self.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.span_names()) < count:
            time.sleep(0.05)
        return self.span_names()

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)

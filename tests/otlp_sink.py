"""The one in-process OTLP trace backend of the tests and the benchmarks: :class:`OtlpSink`.

It listens on loopback for OTLP/gRPC, and for OTLP/HTTP (protobuf, optionally gzipped, on
``/v1/traces``) with ``http=True``, and records what it is sent, under ``lock``:

- always: ``spans`` (spans received, duplicates included) and ``arrivals`` (the
  ``time.monotonic()`` of each accepted request). Counting reads only the length of each
  scope's span list, so ``OtlpSink(keep=False)`` is the cheapest receiver per span: the
  throughput benchmarks measure through it;
- ``keep=True`` (the default): ``requests``, every ``ExportTraceServiceRequest``, and the
  views of them: ``resource_spans``, ``span_names()``, ``traces()``, ``by_name()``;
- ``track_ids=True``: ``ids``, how many times each ``trace_id + span_id`` arrived, for
  ``unique()`` and ``missing()`` (tests that send hundreds of thousands of spans keep
  these rather than the requests).

``fail_with`` (a ``grpc.StatusCode``) makes it refuse exports: over gRPC with that code,
over HTTP with the matching status (UNAVAILABLE 503, RESOURCE_EXHAUSTED 429,
INVALID_ARGUMENT 400, any other 500) and a ``google.rpc.Status`` body; every export while
``fail_times`` is None, else that many more. A refused export is not recorded. ``stop()``
and ``start()`` take the backend away and bring it back on the same ports, as an outage
would::

    with OtlpSink() as sink:                      # start() ... stop()
        exporter = OTLPSpanExporter(endpoint=sink.endpoint, insecure=True)
        ...
        assert sink.wait_for(3) == ["a", "b", "c"]

    sink = OtlpSink(keep=False).start()           # a benchmark's counting backend
    export_endpoint = f"127.0.0.1:{sink.port}"
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Status

from otel_dl.collector.decode import any_value

_REFUSAL = "sink told to fail"
_HTTP_STATUS = {
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
}


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace backend on loopback; see the module's documentation."""

    def __init__(
        self,
        *,
        keep: bool = True,
        track_ids: bool = False,
        http: bool = False,
        fail_with: grpc.StatusCode | None = None,
        fail_times: int | None = None,
    ) -> None:
        self.keep = keep
        self.track_ids = track_ids
        self.fail_with = fail_with
        self.fail_times = fail_times
        self.lock = threading.Lock()
        self.spans = 0
        self.arrivals: list[float] = []
        self.requests: list[ExportTraceServiceRequest] = []
        self.ids: Counter[bytes] = Counter()
        self.port = 0  # OTLP/gRPC, once started; kept across stop() and start()
        self.http_port = 0  # OTLP/HTTP, with http=True
        self._http = http
        self._grpc_server: grpc.Server | None = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> OtlpSink:
        """Listen (again, on the same ports once they are known)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{self.port} for the sink")
        self.port = port
        server.start()
        self._grpc_server = server
        if self._http:
            handler = type("Handler", (_HttpHandler,), {"sink": self})
            http_server = ThreadingHTTPServer(("127.0.0.1", self.http_port), handler)
            self.http_port = http_server.server_address[1]
            self._http_thread = threading.Thread(
                target=http_server.serve_forever, name="otlp-sink-http", daemon=True
            )
            self._http_thread.start()
            self._http_server = http_server
        return self

    def stop(self) -> None:
        """Stop listening at once; what was received stays."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join()
            self._http_thread = None

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The OTLP/gRPC endpoint as an SDK exporter takes it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def http_endpoint(self) -> str:
        """The OTLP/HTTP base URL (``OTEL_EXPORTER_OTLP_ENDPOINT``; add ``/v1/traces``
        for a traces exporter's own endpoint)."""
        return f"http://127.0.0.1:{self.http_port}"

    # --- receiving -------------------------------------------------------------------------
    def Export(self, request, context):
        if self.fail_with is not None:
            code = self._refusal()
            if code is not None:
                context.abort(code, _REFUSAL)
        self.receive(request)
        return ExportTraceServiceResponse()

    def _refusal(self) -> grpc.StatusCode | None:
        """The code to refuse this export with, or None to accept it."""
        with self.lock:
            code = self.fail_with
            if code is None or self.fail_times is None:
                return code
            if self.fail_times <= 0:
                return None
            self.fail_times -= 1
            return code

    def receive(self, request: ExportTraceServiceRequest) -> None:
        """Record one accepted request (what either protocol's handler calls)."""
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        keys = (
            [
                span.trace_id + span.span_id
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]
            if self.track_ids
            else None
        )
        with self.lock:
            self.spans += n
            self.arrivals.append(time.monotonic())
            if keys is not None:
                self.ids.update(keys)
            if self.keep:
                self.requests.append(request)

    # --- what arrived ----------------------------------------------------------------------
    def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        """Wait until ``count`` spans arrived (or ``timeout`` passed); their names."""
        deadline = time.monotonic() + timeout
        while self.spans < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.span_names()

    @property
    def resource_spans(self) -> list[ResourceSpans]:
        """Every ResourceSpans of the kept requests, in arrival order."""
        with self.lock:
            return [rs for req in self.requests for rs in req.resource_spans]

    def span_names(self) -> list[str]:
        """The names of the kept spans, in arrival order."""
        return [
            span.name for rs in self.resource_spans for ss in rs.scope_spans for span in ss.spans
        ]

    def traces(self) -> dict[str, list[dict[str, Any]]]:
        """The spans of the kept requests by trace id (hex), in arrival order, as plain
        dicts: ``service``, ``name``, ``span_id`` and ``parent`` (hex; ``""`` for a root),
        ``error`` (status ERROR), ``duration`` (seconds) and ``attrs``."""
        out: dict[str, list[dict[str, Any]]] = {}
        for rs in self.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                None,
            )
            for ss in rs.scope_spans:
                for span in ss.spans:
                    nanos = span.end_time_unix_nano - span.start_time_unix_nano
                    out.setdefault(span.trace_id.hex(), []).append(
                        {
                            "service": service,
                            "name": span.name,
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "error": span.status.code == Status.STATUS_CODE_ERROR,
                            "duration": nanos / 1e9,
                            "attrs": {kv.key: any_value(kv.value) for kv in span.attributes},
                        }
                    )
        return out

    def by_name(self) -> dict[str, dict[str, Any]]:
        """The spans of :meth:`traces` by name (the last of each name)."""
        return {s["name"]: s for spans in self.traces().values() for s in spans}

    def unique(self) -> int:
        """Distinct spans received (``track_ids=True``)."""
        self._need_ids()
        with self.lock:
            return len(self.ids)

    def missing(self, keys: Any) -> int:
        """How many of ``keys`` (``trace_id + span_id``) never arrived (``track_ids=True``)."""
        self._need_ids()
        with self.lock:
            return sum(1 for key in keys if key not in self.ids)

    def _need_ids(self) -> None:
        if not self.track_ids:
            raise RuntimeError("this sink does not track span ids: OtlpSink(track_ids=True)")


class _HttpHandler(BaseHTTPRequestHandler):
    """OTLP/HTTP protobuf for one :class:`OtlpSink` (set as ``sink`` on a subclass). One
    request per connection, so a stopped sink serves nothing more."""

    sink: OtlpSink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.partition("?")[0] != "/v1/traces":
            self._reply(404, b"")
            return
        if self.sink.fail_with is not None:
            code = self.sink._refusal()
            if code is not None:
                status = status_pb2.Status(code=code.value[0], message=_REFUSAL)
                self._reply(_HTTP_STATUS.get(code, 500), status.SerializeToString())
                return
        try:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError) as exc:
            status = status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0])
            status.message = f"not an OTLP protobuf request: {exc}"
            self._reply(400, status.SerializeToString())
            return
        self.sink.receive(request)
        self._reply(200, ExportTraceServiceResponse().SerializeToString())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass

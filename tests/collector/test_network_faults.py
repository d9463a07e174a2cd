"""Network faults on a traced link are blamed on the link or the callee, never the caller.

Real OTel SDK providers export to the real collector over OTLP/gRPC; a real OTLP sink
receives what it forwards. The frontend calls a real HTTP server on loopback with
urllib, propagating the trace context; the server answers with a span of its own, or,
for the fault, resets the connection (``SO_LINGER`` 0) before any span starts, the way a
proxy or firewall on the link does: the caller's client span fails with no callee span;
or answers with its span and then resets the connection instead of sending the answer
(an answer lost on the link).
"""

from __future__ import annotations

import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_dl import semconv

_PROPAGATOR = TraceContextTextMapPropagator()


class _Route(ThreadingHTTPServer):
    """The callee: a server span per answered request; ``reset`` resets connections
    before any span ("request"), or after the span instead of answering ("answer")."""

    daemon_threads = True

    def __init__(self, provider: TracerProvider) -> None:
        super().__init__(("127.0.0.1", 0), _RouteHandler)
        self.tracer = provider.get_tracer("test")
        self.reset = ""


class _RouteHandler(BaseHTTPRequestHandler):
    server: _Route

    def _reset(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # RST: the caller's read fails

    def do_GET(self) -> None:
        if self.server.reset == "request":
            self._reset()
            return
        parent = _PROPAGATOR.extract({k.lower(): v for k, v in self.headers.items()})
        # The span ends (and is exported) before the answer goes out, so that it reaches
        # the collector before the caller's spans.
        with self.server.tracer.start_as_current_span(
            "HTTP GET /route", context=parent, kind=SpanKind.SERVER
        ):
            body = b"{}"
        if self.server.reset == "answer":
            self._reset()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def route_server(make_provider) -> Iterator[Any]:
    servers: list[_Route] = []

    def start(endpoint: str) -> _Route:
        server = _Route(make_provider("route", endpoint))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _dispatch(frontend: TracerProvider, port: int) -> str:
    """frontend: GET /dispatch → client GET /route over real HTTP; a failed call fails
    the request."""
    tracer = frontend.get_tracer("test")
    url = f"http://127.0.0.1:{port}/route?pickup=1&dropoff=2"
    with (
        tracer.start_as_current_span("HTTP GET /dispatch", kind=SpanKind.SERVER) as entry,
        tracer.start_as_current_span(
            "HTTP GET", kind=SpanKind.CLIENT, attributes={"url.full": url}
        ) as call,
    ):
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
                r.read()
        except OSError as exc:
            call.record_exception(exc)
            call.set_status(Status(StatusCode.ERROR, str(exc)))
            entry.set_status(Status(StatusCode.ERROR))
    return format(entry.get_span_context().trace_id, "032x")


def _verdict(servicer, trace_id: str, wait_for) -> dict[str, dict[str, Any]]:
    """The attributes of the trace's spans the sink received, by span name."""
    spans = wait_for(lambda: servicer.traces().get(trace_id))
    return {s["name"]: s["attrs"] for s in spans}


def test_a_reset_link_into_a_traced_callee_blames_the_callee_not_the_caller(
    sink, make_collector, make_provider, route_server, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend, route = make_provider("frontend", endpoint), route_server(endpoint)
    port = route.server_address[1]
    # Healthy traffic: the client call is learned to be answered by route.
    warm = [_dispatch(frontend, port) for _ in range(8)]
    wait_for(lambda: all(len(servicer.traces().get(t, ())) == 3 for t in warm))

    route.reset = "request"
    spans = _verdict(servicer, _dispatch(frontend, port), wait_for)
    assert "HTTP GET /route" not in spans  # the request never reached route
    call, entry = spans["HTTP GET"], spans["HTTP GET /dispatch"]
    assert call.get(semconv.DL_FAULT_ROOT_CAUSE) is True, spans
    assert call[semconv.DL_FAULT_BLAME] == semconv.FAULT_BLAME_LINK
    assert entry[semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "route"
    assert entry[semconv.DL_FAULT_CANDIDATES][0] == "route"
    assert "frontend" not in entry[semconv.DL_FAULT_CANDIDATES][:1]

    # The link healed: the next request gets no error or outage (on a loaded machine its
    # latency may still breach the SLO learned from 8 traces).
    route.reset = ""
    healed = _verdict(servicer, _dispatch(frontend, port), wait_for)
    broken = (semconv.FAULT_KIND_ERROR, semconv.FAULT_KIND_DEPENDENCY_OUTAGE)
    assert all(s.get(semconv.DL_FAULT_KIND) not in broken for s in healed.values()), healed


def test_an_answer_lost_on_the_link_blames_the_link_into_the_callee(
    sink, make_collector, make_provider, route_server, wait_for
):
    """The callee answered without error, the caller's call failed: the callee's span,
    blamed as the link, not the caller's client span."""
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend, route = make_provider("frontend", endpoint), route_server(endpoint)
    port = route.server_address[1]
    warm = [_dispatch(frontend, port) for _ in range(8)]
    wait_for(lambda: all(len(servicer.traces().get(t, ())) == 3 for t in warm))

    route.reset = "answer"
    lost = _dispatch(frontend, port)
    spans = wait_for(lambda: len(servicer.traces().get(lost, ())) == 3 and servicer.traces()[lost])
    by_name = {s["name"]: s["attrs"] for s in spans}
    callee, call = by_name["HTTP GET /route"], by_name["HTTP GET"]
    assert callee.get(semconv.DL_FAULT_ROOT_CAUSE) is True, spans
    assert callee[semconv.DL_FAULT_BLAME] == semconv.FAULT_BLAME_LINK
    assert semconv.DL_FAULT_ROOT_CAUSE not in call
    assert call[semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "route"  # a symptom of the link
    assert by_name["HTTP GET /dispatch"][semconv.DL_FAULT_CANDIDATES][0] == "route"


def test_a_reset_call_never_seen_answered_is_an_untraced_dependency_of_the_caller(
    sink, make_collector, make_provider, route_server, wait_for
):
    """Without a traced answer to learn from, the peer may be a database or an external
    API: the failure stays a ``dependency`` of the caller's client span."""
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend, route = make_provider("frontend", endpoint), route_server(endpoint)
    route.reset = "request"
    spans = _verdict(servicer, _dispatch(frontend, route.server_address[1]), wait_for)
    call, entry = spans["HTTP GET"], spans["HTTP GET /dispatch"]
    assert call.get(semconv.DL_FAULT_ROOT_CAUSE) is True, spans
    assert call[semconv.DL_FAULT_BLAME] == semconv.FAULT_BLAME_DEPENDENCY
    assert entry[semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "frontend"

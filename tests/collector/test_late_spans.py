"""Spans that arrive late, but within ``decision_wait``, do not change the verdict.

Real OTel SDK providers export to the real collector over OTLP/gRPC; a real OTLP sink
receives what it forwards. The callee's spans are exported 1.3 s after its caller's,
past the collector's 1 s ``early_grace`` but inside its 4 s ``decision_wait``, the way a
busy exporter or a briefly stalled process delivers them.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_dl import semconv

_LATE = 1.3
_URL = "http://127.0.0.1:8083/route?pickup=1&dropoff=2"


def _dispatch(frontend, route, *, fail: bool, late: float) -> str:
    """frontend: GET /dispatch → client GET /route → route: GET /route (``late`` s later)."""
    ft, rt = frontend.get_tracer("test"), route.get_tracer("test")
    with ft.start_as_current_span("HTTP GET /dispatch", kind=SpanKind.SERVER) as entry:
        with ft.start_as_current_span(
            "HTTP GET", kind=SpanKind.CLIENT, attributes={"url.full": _URL}
        ) as call:
            begun = time.time_ns()
            time.sleep(0.02)
            ended = time.time_ns()
            if fail:
                call.set_status(Status(StatusCode.ERROR))
        if fail:
            entry.set_status(Status(StatusCode.ERROR))
    parent = trace.set_span_in_context(call)
    if late:
        time.sleep(late)
    # The callee's span lies inside its caller's call, but is exported only now.
    span = rt.start_span("HTTP GET /route", context=parent, kind=SpanKind.SERVER, start_time=begun)
    if fail:
        span.set_status(Status(StatusCode.ERROR))
        span.add_event("exception", {"exception.type": "RuntimeError"})
    span.end(end_time=ended - 1_000_000)
    return format(call.get_span_context().trace_id, "032x")


def test_a_callee_whose_spans_arrive_late_is_still_the_root_cause(
    sink, make_collector, make_provider, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(
        export_endpoint=f"127.0.0.1:{sink_port}", decision_wait=4.0, early_grace=1.0
    )
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend, route = make_provider("frontend", endpoint), make_provider("route", endpoint)
    # Healthy traffic, the callee's spans on time: its calls are learned as traced.
    warm = [_dispatch(frontend, route, fail=False, late=0.0) for _ in range(6)]
    wait_for(lambda: all(t in servicer.traces() for t in warm))

    sent = time.monotonic()
    faulty = _dispatch(frontend, route, fail=True, late=_LATE)
    spans = wait_for(
        lambda: len(servicer.traces().get(faulty, ())) == 3 and servicer.traces()[faulty]
    )
    # Nothing of the trace went out before its late callee span arrived.
    assert len({s["name"] for s in spans}) == 3
    assert time.monotonic() - sent >= _LATE
    by_name = {s["name"]: s for s in spans}
    cause = by_name["HTTP GET /route"]
    assert cause["attrs"].get(semconv.DL_FAULT_ROOT_CAUSE) is True, spans
    assert cause["service"] == "route"
    assert cause["attrs"][semconv.DL_FAULT_MODE] == "internal-error"
    entry = by_name["HTTP GET /dispatch"]["attrs"]
    assert entry[semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "route"
    assert semconv.DL_FAULT_ROOT_CAUSE not in by_name["HTTP GET"]["attrs"]


def test_a_call_into_an_untraced_dependency_does_not_hold_its_trace(
    sink, make_collector, make_provider, wait_for
):
    """Once its calls are learned to have no traced callee, a trace calling a database
    or an external API is decided ``early_grace`` after its last span, not after
    ``decision_wait``."""
    servicer, sink_port = sink
    collector = make_collector(
        export_endpoint=f"127.0.0.1:{sink_port}", decision_wait=2.5, early_grace=0.2
    )
    frontend = make_provider("frontend", f"127.0.0.1:{collector.grpc_port}")
    tracer = frontend.get_tracer("test")

    def request() -> str:
        db = {"server.address": "db.example"}
        with (
            tracer.start_as_current_span("HTTP GET /dispatch", kind=SpanKind.SERVER) as entry,
            tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT, attributes=db),
        ):
            pass
        return format(entry.get_span_context().trace_id, "032x")

    # While the call is being learned, its trace waits for a callee that may come.
    first = request()
    started = time.monotonic()
    wait_for(lambda: first in servicer.traces())
    assert time.monotonic() - started >= 2.0
    for _ in range(3):
        request()
    wait_for(lambda: len(servicer.traces()) == 4, timeout=15)
    last = request()
    started = time.monotonic()
    wait_for(lambda: last in servicer.traces())
    assert time.monotonic() - started < 1.2

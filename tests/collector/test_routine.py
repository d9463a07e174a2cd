"""Routine traces decided together (collector/routine.py) decide and learn as one at a time.

The traces are microservice traces shaped like HotROD's (a frontend calling customer,
which queries mysql, a driver over gRPC, and route several times), with lognormal
durations and, in about one trace in twenty, a fault: a slow span, an error, or both. Two
traces in five also go through a feature store and a ranker model whose spans carry
otel-dl's signals (freshness, confidence, drift, the model's fingerprint, which changes
half way), with their own faults, so routine runs end and start again all along. Some
traces are built to leave the routine path: two roots, a span id twice, one client
operation answered by two services."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from ddsketch import DDSketch
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_dl import semconv
from otel_dl.collector.assemble import DecisionCache, Trace
from otel_dl.collector.attribute import Attributor
from otel_dl.collector.baselines import Baselines, Calls
from otel_dl.collector.catalog import load_catalog
from otel_dl.collector.decision import Decision
from otel_dl.collector.decode import SpanRecord, flatten
from otel_dl.collector.enrich import set_attribute
from otel_dl.collector.faults import FaultProcessor
from otel_dl.collector.metrics import CollectorMetrics
from otel_dl.collector.routine import RoutineRun

_SERVER, _CLIENT = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT


def _traces(n: int, seed: int) -> list[tuple[bytes, list[SpanRecord]]]:
    rng = random.Random(seed)
    wanted = Attributor(load_catalog(None)).wanted_attributes
    out = []
    for i in range(n):
        trace_id = rng.getrandbits(128).to_bytes(16, "big")
        # The feature store slows down for ten traces in a row, in the middle.
        slow_features = n // 2 - 20 <= i < n // 2 - 10
        request = _request(rng, trace_id, 1000.0 + i, i >= n // 2, slow_features)
        records, _, _ = flatten(request, wanted)
        out.append((trace_id, records))
    return out


def _request(
    rng: random.Random, trace_id: bytes, t0: float, upgraded: bool, slow_features: bool
) -> ExportTraceServiceRequest:
    """One HotROD-shaped trace starting at ``t0`` s, with a ranker model and a feature
    store whose spans carry otel-dl's signals; ``upgraded``: the model's second version (a
    model change, then established); ``slow_features``: the feature lookup 2-4 times
    slower."""
    request = ExportTraceServiceRequest()
    shape = rng.random()
    fault = (
        rng.choice(["customer", "mysql", "driver", "route", "confidence", "drift", "features"])
        if rng.random() < 0.05
        else ""
    )

    def span(service, name, parent, start, duration, kind=0, error=False, **attrs):
        rs = request.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", service
        s = rs.scope_spans.add().spans.add()
        s.trace_id, s.name, s.kind = trace_id, name, kind
        s.span_id = rng.getrandbits(63).to_bytes(8, "big") or b"\x01" * 8
        if parent is not None:
            s.parent_span_id = parent.span_id
        s.start_time_unix_nano = int(start * 1e9)
        s.end_time_unix_nano = int((start + duration) * 1e9)
        for key, value in attrs.items():
            set_attribute(s, key.replace("_", "."), value)
        if error:
            s.status.code = Status.STATUS_CODE_ERROR
        return s

    def slow(service: str) -> float:
        return rng.uniform(3, 12) if fault == service and rng.random() < 0.7 else 1.0

    def err(service: str) -> bool:
        return fault == service and rng.random() < 0.3

    root = span("frontend", "HTTP GET /dispatch", None, t0, 0, _SERVER, http_route="/dispatch")
    t = t0 + 0.001
    d = rng.lognormvariate(0, 0.2) * 0.05 * slow("customer")
    client = span("frontend", "HTTP GET", root, t, d + 0.002, _CLIENT, server_address="customer")
    server = span("customer", "HTTP GET /customer", client, t + 0.001, d, _SERVER,
                  err("customer"), http_route="/customer")  # fmt: skip
    query = rng.lognormvariate(0, 0.3) * 0.03 * slow("mysql")
    span("mysql", "SQL SELECT", server, t + 0.002, min(query, d), _CLIENT, err("mysql"),
         peer_service="mysql")  # fmt: skip
    t += d + 0.003
    d = rng.lognormvariate(0, 0.2) * 0.02 * slow("driver")
    client = span("frontend", "FindNearest", root, t, d + 0.001, _CLIENT, rpc_service="driver")
    span("driver", "FindNearest", client, t + 0.0005, d, _SERVER, err("driver"))
    t += d + 0.002
    for _ in range(rng.randint(2, 4)):
        d = rng.lognormvariate(0, 0.25) * 0.01 * slow("route")
        client = span("frontend", "HTTP GET", root, t, d + 0.001, _CLIENT, server_address="route")
        # One trace in 50 has route answered by a second service: two callees for one
        # client operation in one trace.
        callee = "route-b" if shape < 0.02 else "route"
        span(callee, "HTTP GET /route", client, t + 0.0005, d, _SERVER, err("route"),
             http_route="/route")  # fmt: skip
        t += d + 0.0015
    # Two traces in five also rank: with a feature lookup and the ranker model, whose spans
    # carry otel-dl's signals, so their traces are not routine.
    ranked = slow_features or fault in ("confidence", "drift", "features") or rng.random() < 0.4
    if ranked:
        # A 1 ms feature lookup: slowed 2-4 times it stays within the 10 ms min_excess, so only
        # its own floor judges it (marked past it, fired when its previous trace was too).
        slow = slow_features or fault == "features"
        d = rng.lognormvariate(0, 0.2) * 0.001 * (rng.uniform(2, 4) if slow else 1)
        freshness = rng.uniform(30, 90) * (10 if fault == "features" and rng.random() < 0.5 else 1)
        span("features", "feature_store.get", root, t, d, 0, False,
             **{semconv.DL_FEATURE_FRESHNESS: freshness})  # fmt: skip
        t += d
        # The ranker answers once, or twice in one trace in ten (two observations of its model).
        for _ in range(2 if shape >= 0.9 else 1):
            d = rng.lognormvariate(0, 0.2) * 0.02
            drift = rng.uniform(0.3, 0.8) if fault == "drift" else rng.uniform(0.01, 0.08)
            confidence = rng.uniform(0.1, 0.3) if fault == "confidence" else rng.uniform(0.8, 0.95)
            span("ranker", "inference", root, t, d, 0, False, **{
                semconv.DL_MODEL_NAME: "ranker",
                semconv.DL_MODEL_FINGERPRINT: "v2" if upgraded else "v1",
                semconv.DL_CONFIDENCE_MEAN: confidence,
                semconv.DL_DRIFT_SCORE: drift,
                semconv.DL_DRIFT_METHOD: "psi",
                semconv.DL_DRIFT_STATUS: "alert" if drift >= 0.25 else "ok",
            })  # fmt: skip
            t += d
    root.end_time_unix_nano = int((t + 0.001) * 1e9)
    if 0.02 <= shape < 0.03:
        span("frontend", "background", None, t0, 0.001)  # a second root
    elif 0.03 <= shape < 0.04:
        request.resource_spans[-1].scope_spans[0].spans[0].span_id = root.span_id
    return request


def _fields(d: Decision) -> tuple:
    return (
        d.fault,
        d.root.span_id if d.root else None,
        d.mode.id if d.mode else None,
        d.score,
        d.candidates,
        d.blame,
        d.anomalous,
        d.trace_root.span_id if d.trace_root else None,
        d.evidence,
        tuple(s.span_id for s in d.symptoms),
        tuple(s.span_id for s in d.ranked_spans),
    )


def _bins(sketch: DDSketch) -> tuple:
    """A sketch's count, zero count and count per bin key: what its quantiles read. (Its
    store's array layout depends on the order its bins were first filled.)"""
    store = sketch._store
    counts = {store.offset + i: n for i, n in enumerate(store.bins) if n}
    return sketch.count, sketch._zero_count, counts


def _learned(attributor: Attributor) -> tuple:
    baselines = attributor.baselines
    for key in baselines.sketches:
        baselines.quantile(key, 0.123)  # a first read of a quantile adds what is kept aside
    return (
        {k: _bins(s) for k, s in baselines.sketches.items()},
        {
            k: (c.calls, c.errors, list(c.recent), c.recent_errors, c._limit, c._limit_at)
            for k, c in baselines.calls.items()
        },
        baselines.callees,
        baselines.values,
        attributor.latency._before,
        attributor.signals._fired_before,
    )


@pytest.mark.parametrize("round_size", [1, 7, 200, 3000])
def test_a_round_decides_and_learns_as_its_traces_one_at_a_time(round_size: int) -> None:
    traces = _traces(3000, seed=11)
    alone = Attributor(load_catalog(None), 30)
    expected = [alone.decide(trace_id, spans) for trace_id, spans in traces]
    together = Attributor(load_catalog(None), 30)
    general = 0

    def decide(trace_id: bytes, spans: Sequence[SpanRecord]) -> Decision:
        nonlocal general
        general += 1
        return together.decide(trace_id, spans)

    got: list[Decision] = []
    for start in range(0, len(traces), round_size):
        got += together.decide_many(traces[start : start + round_size], decide)
    assert [_fields(d) for d in got] == [_fields(d) for d in expected]
    assert _learned(together) == _learned(alone)
    faults = sum(d.fault for d in expected)
    assert faults > 50, faults
    # Most traces took the routine path: the comparison above tested it.
    assert general < len(traces) // 2, general


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.just(0.0), st.floats(1e-9, 100.0)),
            st.booleans(),  # a quantile read after this value
        ),
        max_size=300,
    ),
    st.sampled_from([0.5, 0.99, 0.999]),
)
def test_values_kept_aside_give_the_quantiles_one_at_a_time_gives(
    values: list[tuple[float, bool]], q: float
) -> None:
    now, later = Baselines(min_samples=5), Baselines(min_samples=5)
    key = ("svc", "op", "duration")
    for value, read in values:
        now.learn(key, value)
        later.learn_later(key, value)
        if read:
            assert later.quantile(key, q) == now.quantile(key, q)
    assert later.quantile(key, q) == now.quantile(key, q)
    if values:
        later.quantile(key, 0.123)  # a new quantile adds every value kept aside
        assert _bins(later.sketches[key]) == _bins(now.sketches[key])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.booleans(), max_size=120),
    st.integers(0, 200),
    st.integers(1, 60),
    st.sampled_from([0.001, 0.01, 0.2]),
)
def test_successes_counted_at_once_leave_the_state_of_one_call_at_a_time(
    history: list[bool], n: int, min_samples: int, budget: float
) -> None:
    one, many = Calls(), Calls()
    for error in history:
        one.add(error, min_samples, budget)
        many.add(error, min_samples, budget)
    for _ in range(n):
        one.add(False, min_samples, budget)
    many.add_ok(n, min_samples, budget)
    assert {slot: getattr(many, slot) for slot in Calls.__slots__} == {
        slot: getattr(one, slot) for slot in Calls.__slots__
    }


def test_a_failure_in_a_routine_run_forwards_the_round_unattributed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in the routine path loses no span: the round goes on, unattributed, and is
    counted as a decision error (the fault is injected: the routine path has none to hit)."""
    traces = [Trace(trace_id, 0.0) for trace_id, _ in _traces(300, seed=3)]
    for trace, (_, spans) in zip(traces, _traces(300, seed=3), strict=True):
        trace.spans.extend(spans)
    metrics = CollectorMetrics()
    processor = FaultProcessor(Attributor(load_catalog(None), 30), DecisionCache(1000), metrics)
    processor.process(traces[:200], [])  # learns the baselines: the next traces are routine

    def broken(self: RoutineRun, out: list[Decision | None]) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(RoutineRun, "close", broken)
    before = metrics.decision_errors._value.get()
    out = processor.process(traces[200:], [])
    assert len(out) == sum(len(t.spans) for t in traces[200:])
    assert metrics.decision_errors._value.get() == before + 1

"""Attribution on hand-built OTLP traces: ordering, explained symptoms, learning."""

from __future__ import annotations

import itertools

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from otel_dl import semconv
from otel_dl.collector.attribute import Attributor
from otel_dl.collector.catalog import load_catalog
from otel_dl.collector.decode import flatten
from otel_dl.collector.enrich import enrich, forwarded, set_attribute

_ids = itertools.count(1)


def _trace(spec: list[tuple[str, str, int | None, float, float, dict]]) -> list:
    """spec rows: (service, name, parent row index, start s, end s, attributes)."""
    request = ExportTraceServiceRequest()
    trace_id = next(_ids).to_bytes(16, "big")
    span_ids = [next(_ids).to_bytes(8, "big") for _ in spec]
    for i, (service, name, parent, start, end, attrs) in enumerate(spec):
        rs = request.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", service
        span = rs.scope_spans.add().spans.add()
        span.trace_id, span.span_id, span.name = trace_id, span_ids[i], name
        if parent is not None:
            span.parent_span_id = span_ids[parent]
        span.start_time_unix_nano = int(start * 1e9)
        span.end_time_unix_nano = int(end * 1e9)
        for key, value in attrs.items():
            if key == "error":
                span.status.code = Status.STATUS_CODE_ERROR
            elif key == "client":
                span.kind = Span.SPAN_KIND_CLIENT
            else:
                set_attribute(span, key, value)
    attributor = _trace.attributor  # type: ignore[attr-defined]
    records, _, _ = flatten(request, attributor.wanted_attributes)
    return records


def _pipeline(**overrides: dict) -> list[tuple]:
    rows = {
        "root": ("frontend", "predict", None, 0.0, 1.0, {}),
        "ingest": ("ingest", "ingest.read", 0, 0.01, 0.1, {semconv.DL_DRIFT_SCORE: 0.05}),
        "features": (
            "features",
            "feature_store.get",
            0,
            0.1,
            0.2,
            {semconv.DL_FEATURE_FRESHNESS: 30.0},
        ),
        "prep": ("preprocess", "transform", 0, 0.2, 0.3, {semconv.DL_QUALITY_NAN_FRACTION: 0.0}),
        "infer": (
            "inference",
            "inference",
            0,
            0.3,
            0.8,
            {
                semconv.DL_CONFIDENCE_MEAN: 0.9,
                semconv.DL_MODEL_NAME: "m",
                semconv.DL_MODEL_FINGERPRINT: "aaa",
            },
        ),
        "ext": ("external-api", "GET", 4, 0.4, 0.5, {"server.address": "api.x", "client": True}),
    }
    for key, attrs in overrides.items():
        service, name, parent, start, end, base = rows[key]
        rows[key] = (service, name, parent, start, end, {**base, **attrs})
    return list(rows.values())


def _attributor() -> Attributor:
    attributor = Attributor(load_catalog(), min_baseline_samples=5)
    _trace.attributor = attributor  # type: ignore[attr-defined]
    for _ in range(10):
        records = _trace(_pipeline())
        assert not attributor.decide(records[0].trace_id, records).fault
    return attributor


def test_healthy_traces_have_no_fault():
    attributor = _attributor()
    records = _trace(_pipeline())
    assert not attributor.decide(records[0].trace_id, records).fault


def test_upstream_drift_explains_downstream_low_confidence():
    attributor = _attributor()
    records = _trace(
        _pipeline(ingest={semconv.DL_DRIFT_SCORE: 0.6}, infer={semconv.DL_CONFIDENCE_MEAN: 0.3})
    )
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.root.service == "ingest"
    assert decision.mode.kind == semconv.FAULT_KIND_DATA_DRIFT
    assert decision.candidates[:2] == ("ingest", "inference")
    assert any(s.service == "inference" for s in decision.symptoms)


def test_nan_is_judged_beyond_what_the_reference_explains():
    """data-quality-nan reads dl.quality.nan_excess_fraction and
    out_of_range_excess_fraction; a span without them (from a producer that does not set
    them) is judged by dl.quality.nan_fraction and out_of_range_fraction."""
    attributor = _attributor()
    nan, excess = semconv.DL_QUALITY_NAN_FRACTION, semconv.DL_QUALITY_NAN_EXCESS_FRACTION
    outside = semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION
    beyond = semconv.DL_QUALITY_OUT_OF_RANGE_EXCESS_FRACTION
    for prep, fault in (
        ({nan: 0.2, excess: 0.0}, False),  # missing as often as in the reference
        ({nan: 0.2, excess: 0.05}, True),
        ({nan: 0.05}, True),  # no excess attribute: the whole share
        ({nan: 0.005}, False),
        ({outside: 0.25, beyond: 0.0}, False),  # one value of a 4-feature row, by chance
        ({outside: 0.25, beyond: 0.2}, True),
        ({outside: 0.25}, True),
    ):
        records = _trace(_pipeline(prep=prep))
        decision = attributor.decide(records[0].trace_id, records)
        assert bool(decision.fault) is fault, prep
        if fault:
            assert decision.root.service == "preprocess"
            assert decision.mode.id == "data-quality-nan"


def test_drift_is_judged_by_the_status_a_score_alone_by_the_thresholds():
    """data-drift reads dl.drift.status: otel-dl's spans carry one that counts only scores
    beyond chance (a score of 0.3 against a small reference can be sampling alone), and a
    span with a score and no status of ok/warn/alert gets the status the default
    thresholds give that score under its method."""
    attributor = _attributor()
    score, status, method = (
        semconv.DL_DRIFT_SCORE,
        semconv.DL_DRIFT_STATUS,
        semconv.DL_DRIFT_METHOD,
    )
    for ingest, fault in (
        ({score: 0.3, status: "ok"}, False),  # within chance for its sizes
        ({score: 0.3, status: "alert"}, True),
        ({score: 0.3}, True),  # no status: psi's alert threshold, 0.25
        ({score: 0.22}, False),
        ({score: 0.22, method: "ks"}, True),  # ks alerts at 0.2
        ({score: 0.3, status: "alarm"}, True),  # not a status: judged by the score
        ({score: float("nan")}, False),
    ):
        records = _trace(_pipeline(ingest=ingest))
        decision = attributor.decide(records[0].trace_id, records)
        assert bool(decision.fault) is fault, ingest
        if fault:
            assert decision.root.service == "ingest"
            assert decision.mode.id == "data-drift"


def test_low_confidence_within_its_usual_spread_is_background_a_burst_is_a_fault():
    """Any model is unsure of some predictions: a random forest on scikit-learn's digits
    of about 14 % of single rows. One-request traces of a model whose confidences spread
    over 0.35 to 1 (a fifth of them under 0.5) are no fault once that spread is learned
    (the first 30 calls: not yet learned, each unsure call is one); a burst of unsure
    calls is. A model whose confidences lie within 0.85 to 0.95 makes an unsure call a fault.
    Before, every unsure call was one."""
    import random

    rng = random.Random(4)

    def call(attributor: Attributor, confidence: float) -> bool:
        _trace.attributor = attributor  # type: ignore[attr-defined]
        attrs = {semconv.DL_CONFIDENCE_MEAN: confidence, semconv.DL_MODEL_NAME: "m"}
        records = _trace(
            [
                ("scorer", "POST /score", None, 0.0, 0.01, {}),
                ("scorer", "inference", 0, 0.001, 0.009, attrs),
            ]
        )
        return attributor.decide(records[0].trace_id, records).fault

    forest = Attributor(load_catalog(), min_baseline_samples=30)
    confidences = [rng.uniform(0.35, 1.0) for _ in range(400)]
    faults = [call(forest, c) for c in confidences]
    assert faults[:30] == [c < 0.5 for c in confidences[:30]]  # not learned yet
    assert sum(c < 0.5 for c in confidences[30:]) > 60
    assert not any(faults[30:])
    # A burst: once the last 20 calls hold more unsure ones than the usual share gives
    # with probability 0.001, each is a fault.
    burst = [call(forest, rng.uniform(0.35, 0.45)) for _ in range(12)]
    assert not burst[0]
    assert burst[-3:] == [True, True, True]

    sure = Attributor(load_catalog(), min_baseline_samples=30)
    assert not any(call(sure, rng.uniform(0.85, 0.95)) for _ in range(100))
    assert call(sure, 0.45)


def _forwarded_span(record) -> Span:
    """The span of ``record`` as its request is forwarded, with what was written onto it."""
    request = ExportTraceServiceRequest.FromString(forwarded(record.received))
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    span = spans[record.ordinal]
    assert span.span_id == record.span_id
    return span


def test_a_request_is_forwarded_as_it_arrived_unless_its_spans_are_enriched():
    """The collector keeps a request's encoding, not its decoded message: a request with
    no enriched span is forwarded as the very bytes it arrived as; one with an enriched
    span is decoded again and carries the attributes written onto its records."""
    attributor = _attributor()
    faulty = _trace(
        _pipeline(ingest={semconv.DL_DRIFT_SCORE: 0.6}, infer={semconv.DL_CONFIDENCE_MEAN: 0.3})
    )
    healthy = _trace(_pipeline())
    request = ExportTraceServiceRequest()
    for record in healthy:
        rs = request.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = record.service
        rs.scope_spans.add().spans.add().CopyFrom(_forwarded_span(record))
    raw = request.SerializeToString()
    records, _, _ = flatten(
        ExportTraceServiceRequest.FromString(raw), attributor.wanted_attributes, raw=raw
    )
    assert not attributor.decide(records[0].trace_id, records).fault
    assert forwarded(records[0].received) is raw
    decision = attributor.decide(faulty[0].trace_id, faulty)
    assert decision.fault
    enrich(decision, faulty)
    cause = _forwarded_span(decision.root)
    assert {kv.key for kv in cause.attributes} >= {
        semconv.DL_FAULT_ROOT_CAUSE,
        semconv.DL_FAULT_MODE,
    }
    others = [
        r for r in faulty if r not in (decision.root, decision.trace_root, *decision.symptoms)
    ]
    assert others and not any(
        kv.key.startswith("dl.fault.") for r in others for kv in _forwarded_span(r).attributes
    )


def test_every_copy_of_a_span_sent_twice_is_enriched():
    """An exporter's retry can deliver a span twice: a backend keeps either copy, so each
    carries the attribution, the cause's and the trace root's alike."""
    attributor = _attributor()
    records = _trace(
        _pipeline(ingest={semconv.DL_DRIFT_SCORE: 0.6}, infer={semconv.DL_CONFIDENCE_MEAN: 0.3})
    )
    request = ExportTraceServiceRequest()
    for record in (records[0], records[1]):  # the trace root and the cause, again
        rs = request.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", record.service
        rs.scope_spans.add().spans.add().CopyFrom(_forwarded_span(record))
    twins, _, _ = flatten(request, attributor.wanted_attributes)
    spans = [*records, *twins]
    decision = attributor.decide(records[0].trace_id, spans)
    enrich(decision, spans)
    assert decision.root.service == "ingest"
    for record in (records[1], twins[1]):
        keys = {kv.key for kv in _forwarded_span(record).attributes}
        assert {semconv.DL_FAULT_ROOT_CAUSE, semconv.DL_FAULT_MODE} <= keys
    for record in (records[0], twins[0]):
        keys = {kv.key for kv in _forwarded_span(record).attributes}
        assert {semconv.DL_FAULT_ROOT_CAUSE_SERVICE, semconv.DL_FAULT_CANDIDATES} <= keys


def test_external_error_is_a_dependency_outage_not_the_callers_error():
    attributor = _attributor()
    records = _trace(_pipeline(ext={"error": True}, infer={"error": True}, root={"error": True}))
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.root.service == "external-api"
    assert decision.mode.id == "external-dependency-error"
    assert decision.mode.origin == "external"


def test_model_fingerprint_change_beats_low_confidence_on_the_same_span():
    attributor = _attributor()
    records = _trace(
        _pipeline(infer={semconv.DL_MODEL_FINGERPRINT: "bbb", semconv.DL_CONFIDENCE_MEAN: 0.2})
    )
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.mode.kind == semconv.FAULT_KIND_MODEL_CHANGE
    # The old fingerprint is still the established one: normal traffic is not flagged.
    records = _trace(_pipeline())
    assert not attributor.decide(records[0].trace_id, records).fault


def test_latency_baseline_is_not_poisoned_by_slow_spans():
    attributor = _attributor()
    for _ in range(20):
        # The slow step makes the request slow: a symptom at the entry.
        slow = [r if r[1] != "transform" else (*r[:3], 0.2, 5.0, r[5]) for r in _pipeline()]
        slow[0] = (*slow[0][:4], 5.1, slow[0][5])
        records = _trace(slow)
        decision = attributor.decide(records[0].trace_id, records)
        assert decision.fault and decision.root.name == "transform"
        assert decision.mode.kind == semconv.FAULT_KIND_LATENCY


def test_requests_client_span_naming_its_peer_only_by_url_is_a_dependency_outage():
    # opentelemetry-instrumentation-requests in its default semconv mode writes only
    # http.url on the client span: no server.address, no peer.service.
    for peer in (
        {"http.url": "https://api.partner.example:8443/v1/score?q=1"},
        {"url.full": "https://api.partner.example/v1/score"},
        {"net.peer.name": "api.partner.example"},
        {"http.host": "api.partner.example"},
        {"rpc.service": "scoring.Scorer"},
    ):
        attributor = _attributor()
        rows = _pipeline(infer={"error": True}, root={"error": True})
        service, name, parent, start, end, _ = rows[5]
        rows[5] = (service, name, parent, start, end, {**peer, "client": True, "error": True})
        records = _trace(rows)
        decision = attributor.decide(records[0].trace_id, records)
        assert decision.mode.id == "external-dependency-error", peer
        assert decision.root.service == "external-api"


def test_a_url_without_a_host_names_no_peer():
    attributor = _attributor()
    rows = _pipeline(root={"error": True})
    for url in ("/v1/score", "http://[::1/broken"):
        service, name, parent, start, end, _ = rows[5]
        rows[5] = (
            service,
            name,
            parent,
            start,
            end,
            {"http.url": url, "client": True, "error": True},
        )
        records = _trace(rows)
        decision = attributor.decide(records[0].trace_id, records)
        assert decision.mode.id == "internal-error", url


def _asgi_send_trace(send_seconds: float) -> list:
    """A FastAPI-like request whose ASGI ``http send`` span is sub-millisecond."""
    return _trace(
        [
            ("api", "POST /predict", None, 0.0, 0.041 + send_seconds, {}),
            ("api", "POST /predict http send", 0, 0.04, 0.04 + send_seconds, {}),
        ]
    )


def _attributor_with(catalog) -> Attributor:
    attributor = Attributor(catalog, min_baseline_samples=5)
    _trace.attributor = attributor  # type: ignore[attr-defined]
    for i in range(20):
        records = _asgi_send_trace(0.0001 + i * 0.00001)
        assert not attributor.decide(records[0].trace_id, records).fault
    return attributor


def test_jitter_on_a_sub_millisecond_span_is_not_a_latency_fault():
    attributor = _attributor_with(load_catalog())
    # 6 ms is 20x the learned p99 of ~0.3 ms, but only scheduler jitter.
    records = _asgi_send_trace(0.006)
    assert not attributor.decide(records[0].trace_id, records).fault
    records = _asgi_send_trace(0.05)
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.fault and decision.mode.id == "slow-operation"


def test_min_excess_is_configurable_per_detect_rule(tmp_path):
    extra = tmp_path / "modes.yaml"
    extra.write_text(
        "modes:\n  - id: slow-operation\n    kind: latency\n    origin: internal\n"
        "    detect: [{signal: duration, above_baseline: 2.0, min_excess: 0.001}]\n"
        "    severity: low\n    owner: o\n    mitigation: m\n    runbook: r\n"
    )
    attributor = _attributor_with(load_catalog(extra))
    records = _asgi_send_trace(0.006)
    assert attributor.decide(records[0].trace_id, records).mode.id == "slow-operation"


def test_an_upstream_symptom_does_not_explain_a_later_cause():
    attributor = _attributor()
    # A slow ingest span (latency, a symptom kind) runs before three-day-old features.
    slow = _pipeline(features={semconv.DL_FEATURE_FRESHNESS: 3 * 86400.0})
    slow[1] = (*slow[1][:3], 0.01, 0.5, slow[1][5])
    # ... and made the request slow, so its latency counts as evidence.
    slow[0] = (*slow[0][:4], 1.4, slow[0][5])
    records = _trace(slow)
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.mode.kind == semconv.FAULT_KIND_STALE_FEATURES
    assert decision.root.service == "features"
    assert decision.candidates[:2] == ("features", "ingest")


def test_an_upstream_cause_still_explains_a_later_cause():
    attributor = _attributor()
    records = _trace(
        _pipeline(
            ingest={semconv.DL_DRIFT_SCORE: 0.9},
            features={semconv.DL_FEATURE_FRESHNESS: 3 * 86400.0},
        )
    )
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.mode.kind == semconv.FAULT_KIND_DATA_DRIFT


def test_a_client_span_to_a_traced_service_is_not_an_external_outage():
    attributor = _attributor()
    rows = _pipeline(infer={"error": True}, root={"error": True})
    parent, start, end = rows[5][2:5]
    url = {"http.url": "http://127.0.0.1:8002/score"}
    rows[5] = ("inference", "POST", parent, start, end, {**url, "client": True, "error": True})
    rows.append(("scorer", "POST /score", 5, 0.41, 0.49, {"error": True}))
    records = _trace(rows)
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.root.service == "scorer"
    assert decision.mode.id == "internal-error"


def _with_exception(records: list, name: str) -> list:
    for record in records:
        if record.name == name:
            record.exception = True
    return records


def test_a_5xx_is_rooted_at_the_span_that_raised_not_the_asgi_send_span():
    attributor = _attributor()
    spec = [
        ("api", "POST /predict", None, 0.0, 0.05, {"error": True}),
        ("api", "handler", 0, 0.001, 0.03, {}),
        ("api", "model.forward", 1, 0.002, 0.02, {}),
        ("api", "POST /predict http send", 0, 0.04, 0.041, {"error": True}),
    ]
    # FastAPI records the exception on the server span only; http send ends first.
    records = _with_exception(_trace(spec), "POST /predict")
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.root.name == "POST /predict"
    assert decision.ranked_spans[0] is decision.root
    # When several spans raised, the deepest is where the error started.
    spec[1] = (*spec[1][:5], {"error": True})
    records = _with_exception(_with_exception(_trace(spec), "POST /predict"), "handler")
    decision = attributor.decide(records[0].trace_id, records)
    assert decision.root.name == "handler"
    assert decision.mode.id == "internal-error"

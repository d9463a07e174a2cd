"""End to end: real OTel SDKs in several services → collector → real OTLP sink."""

from __future__ import annotations

import gzip
import json

import requests
from opentelemetry import context
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_dl import semconv


def _pipeline_trace(frontend, features, *, freshness: float = 10.0) -> None:
    """frontend: predict → (features: feature_store.get) → inference."""
    ft = frontend.get_tracer("test")
    fs = features.get_tracer("test")
    with ft.start_as_current_span("predict", kind=SpanKind.SERVER):
        carrier = context.get_current()
        with fs.start_as_current_span("feature_store.get", context=carrier) as span:
            span.set_attribute(semconv.DL_STAGE, semconv.STAGE_FEATURE_STORE)
            span.set_attribute(semconv.DL_FEATURE_FRESHNESS, freshness)
        with ft.start_as_current_span("inference") as span:
            span.set_attribute(semconv.DL_CONFIDENCE_MEAN, 0.9)


def test_grpc_fault_is_attributed_enriched_forwarded_and_stored(
    sink, make_collector, make_provider, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend = make_provider("frontend", endpoint)
    features = make_provider("feature-service", endpoint)

    _pipeline_trace(frontend, features, freshness=200_000.0)

    spans = wait_for(lambda: servicer.count() == 3 and servicer.spans())
    cause = spans["feature_store.get"]
    assert cause[semconv.DL_FAULT_ROOT_CAUSE] is True
    assert cause[semconv.DL_FAULT_KIND] == semconv.FAULT_KIND_STALE_FEATURES
    assert cause[semconv.DL_FAULT_MODE] == "stale-features"
    assert cause[semconv.DL_FAULT_ORIGIN] == "internal"
    assert cause[semconv.DL_FAULT_OWNER] == "feature-platform"
    assert 0 < cause[semconv.DL_FAULT_SCORE] <= 1
    root = spans["predict"]
    assert root[semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "feature-service"
    assert root[semconv.DL_FAULT_ROOT_CAUSE_SPAN_ID] == cause["span_id"]
    assert root[semconv.DL_FAULT_CANDIDATES] == ("feature-service",)
    assert not any(k.startswith("dl.fault") for k in spans["inference"])

    api = f"http://127.0.0.1:{collector.api_port}"
    faults = wait_for(lambda: requests.get(f"{api}/api/faults", timeout=5).json()["faults"])
    assert faults[0]["service"] == "feature-service"
    assert faults[0]["kind"] == "stale_features"
    metrics = requests.get(f"{api}/metrics", timeout=5).text
    assert "otel_dl_collector_spans_received_total 3.0" in metrics
    wait_for(
        lambda: (
            "otel_dl_collector_spans_forwarded_total 3.0"
            in requests.get(f"{api}/metrics", timeout=5).text
        )
    )


def test_http_protobuf_healthy_trace_gets_no_fault_attributes(
    sink, make_collector, make_provider, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    frontend = make_provider("frontend", endpoint, protocol="http")
    features = make_provider("feature-service", endpoint, protocol="http")

    _pipeline_trace(frontend, features)

    spans = wait_for(lambda: servicer.count() == 3 and servicer.spans())
    for attrs in spans.values():
        assert not any(k.startswith("dl.fault") for k in attrs)


def test_http_json_gzip_and_partial_success(sink, make_collector, wait_for):
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "external-api"}}
                    ]
                },
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "name": "call",
                                "kind": 3,
                                "startTimeUnixNano": "1000",
                                "endTimeUnixNano": "2000",
                                "attributes": [
                                    {"key": "server.address", "value": {"stringValue": "api.x"}}
                                ],
                                "status": {"code": 2},
                            },
                            {"traceId": "abcd", "spanId": "eee19b7ec3c1b175", "name": "bad"},
                        ]
                    }
                ],
            }
        ]
    }
    resp = requests.post(
        f"http://127.0.0.1:{collector.http_port}/v1/traces",
        data=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=5,
    )
    assert resp.status_code == 200
    assert resp.json()["partialSuccess"]["rejectedSpans"] == "1"
    spans = wait_for(lambda: servicer.spans())
    assert spans["call"][semconv.DL_FAULT_KIND] == semconv.FAULT_KIND_DEPENDENCY_OUTAGE
    assert spans["call"][semconv.DL_FAULT_ORIGIN] == "external"


def test_bad_payloads_get_clear_permanent_errors(make_collector):
    collector = make_collector()
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    resp = requests.post(
        url, data=b"\xff\x00garbage", timeout=5, headers={"Content-Type": "application/x-protobuf"}
    )
    assert resp.status_code == 400
    resp = requests.post(
        url, data=b"{not json", timeout=5, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert "not JSON" in resp.json()["message"]
    resp = requests.post(url, data=b"x", timeout=5, headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415


def test_error_status_in_child_service_is_the_root_cause(
    sink, make_collector, make_provider, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend = make_provider("frontend", endpoint).get_tracer("t")
    prep = make_provider("preprocess", endpoint).get_tracer("t")
    with frontend.start_as_current_span("predict") as root:
        with prep.start_as_current_span("transform") as span:
            span.set_status(Status(StatusCode.ERROR, "boom"))
        root.set_status(Status(StatusCode.ERROR, "failed"))
    spans = wait_for(lambda: servicer.count() == 2 and servicer.spans())
    assert spans["transform"][semconv.DL_FAULT_ROOT_CAUSE] is True
    assert spans["predict"][semconv.DL_FAULT_SYMPTOM] is True
    assert spans["predict"][semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "preprocess"

"""End to end: real OTel SDKs in several services → collector → real OTLP sink."""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import logging
import math
import time
import tracemalloc
import zlib
from collections import Counter

import grpc
import pytest
import requests
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry import context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from otel_dl import semconv
from tests.collector.conftest import EXPORT_METHOD, prometheus_samples


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

    spans = wait_for(lambda: servicer.spans == 3 and servicer.by_name())
    cause = spans["feature_store.get"]["attrs"]
    assert cause[semconv.DL_FAULT_ROOT_CAUSE] is True
    assert cause[semconv.DL_FAULT_KIND] == semconv.FAULT_KIND_STALE_FEATURES
    assert cause[semconv.DL_FAULT_MODE] == "stale-features"
    assert cause[semconv.DL_FAULT_ORIGIN] == "internal"
    assert cause[semconv.DL_FAULT_OWNER] == "feature-platform"
    assert 0 < cause[semconv.DL_FAULT_SCORE] <= 1
    root = spans["predict"]["attrs"]
    assert root[semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "feature-service"
    assert root[semconv.DL_FAULT_ROOT_CAUSE_SPAN_ID] == spans["feature_store.get"]["span_id"]
    assert root[semconv.DL_FAULT_CANDIDATES] == ("feature-service",)
    assert not any(k.startswith("dl.fault") for k in spans["inference"]["attrs"])

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


def _value(series: dict, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


def test_metrics_count_faults_drift_and_confidence_per_service(
    sink, make_collector, make_provider, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(
        export_endpoint=f"127.0.0.1:{sink_port}", max_metric_services=3, store="none"
    )
    api = f"http://127.0.0.1:{collector.api_port}"
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend = make_provider("frontend", endpoint)
    features = make_provider("feature-service", endpoint)
    ingest = make_provider("ingest", endpoint)
    labeller = make_provider("labeller", endpoint)

    # feature-service: stale features (a fault); frontend: one inference at 0.9 confidence.
    _pipeline_trace(frontend, features, freshness=200_000.0)
    wait_for(
        lambda: _value(
            prometheus_samples(api),
            "otel_dl_collector_confidence_mean_count",
            service_name="frontend",
        )
    )
    # ingest: one span per drift result, each its own trace; the third service labelled.
    reads = [
        (0.05, "ok", "psi"),
        (0.4, "alert", "psi"),  # a data_drift fault
        (0.12, "warn", "ks"),
        (math.nan, None, "psi"),  # no bucket takes NaN: not observed
        # A status other than ok/warn/alert and an unknown method: judged by the status
        # its score gives under psi's thresholds (alert at 0.25), a data_drift fault.
        (0.3, "alarm", "chi2"),
    ]
    tracer = ingest.get_tracer("test")
    for score, status, method in reads:
        with tracer.start_as_current_span("ingest.read") as span:
            span.set_attribute(semconv.DL_DRIFT_SCORE, score)
            span.set_attribute(semconv.DL_DRIFT_METHOD, method)
            if status is not None:
                span.set_attribute(semconv.DL_DRIFT_STATUS, status)
    wait_for(lambda: servicer.spans == 3 + len(reads))
    wait_for(
        lambda: _value(
            prometheus_samples(api),
            "otel_dl_collector_drift_score_count",
            service_name="ingest",
            method="unknown",
        )
    )
    # A fourth service is past max_metric_services.
    with labeller.get_tracer("test").start_as_current_span("label") as span:
        span.set_attribute(semconv.DL_CONFIDENCE_MEAN, 0.3)
    wait_for(
        lambda: _value(
            prometheus_samples(api),
            "otel_dl_collector_confidence_mean_count",
            service_name="(other)",
        )
    )

    series = prometheus_samples(api)
    faults = "otel_dl_collector_faults_total"
    assert _value(series, faults, service_name="feature-service", kind="stale_features") == 1
    assert _value(series, faults, service_name="ingest", kind="data_drift") == 2
    # 0.3 is low confidence: the service past the cap is named (other) there too.
    assert _value(series, faults, service_name="(other)", kind="low_confidence") == 1
    assert sum(v for (name, _), v in series.items() if name == faults) == 4

    drift = "otel_dl_collector_drift_score"
    assert _value(series, drift + "_count", service_name="ingest", method="psi") == 2
    assert _value(series, drift + "_sum", service_name="ingest", method="psi") == pytest.approx(
        0.45
    )
    assert _value(series, drift + "_bucket", service_name="ingest", method="psi", le="0.25") == 1
    assert _value(series, drift + "_bucket", service_name="ingest", method="psi", le="0.5") == 2
    assert _value(series, drift + "_count", service_name="ingest", method="ks") == 1
    assert _value(series, drift + "_count", service_name="ingest", method="unknown") == 1

    status = "otel_dl_collector_drift_status_total"
    by_status = {
        dict(labels)["status"]: v for (name, labels), v in series.items() if name == status
    }
    # The unknown status counts as the one its score gives; the NaN score gives none.
    assert by_status == {"ok": 1, "warn": 1, "alert": 2}

    confidence = "otel_dl_collector_confidence_mean"
    assert _value(series, confidence + "_count", service_name="frontend") == 1
    assert _value(series, confidence + "_sum", service_name="frontend") == pytest.approx(0.9)
    assert _value(series, confidence + "_bucket", service_name="frontend", le="0.8") == 0
    assert _value(series, confidence + "_bucket", service_name="frontend", le="0.9") == 1
    assert _value(series, confidence + "_count", service_name="(other)") == 1
    services = {dict(labels).get("service_name") for _, labels in series}
    assert services - {None} == {"frontend", "feature-service", "ingest", "(other)"}


def test_metrics_derive_the_operation_duration_of_otel_dl_spans(
    sink, make_collector, make_provider, wait_for
):
    """``dl.operation.duration``, which instrumented processes do not record by default,
    comes from the collector: one observation per span with ``dl.stage``, by service,
    stage and model, a sampled span counting ``dl.sampling.rate`` times."""
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}", store="none")
    api = f"http://127.0.0.1:{collector.api_port}"
    tracer = make_provider("scorer", f"127.0.0.1:{collector.grpc_port}").get_tracer("test")
    start = time.time_ns()
    calls = [  # (span name, attributes, duration in seconds)
        ("inference", {semconv.DL_STAGE: "inference", semconv.DL_MODEL_NAME: "m"}, 0.0003),
        ("inference", {semconv.DL_STAGE: "inference", semconv.DL_MODEL_NAME: "m"}, 0.002),
        (
            "inference",
            {
                semconv.DL_STAGE: "inference",
                semconv.DL_MODEL_NAME: "m",
                semconv.DL_SAMPLING_RATE: 10,
            },
            0.0004,
        ),
        ("dataloader.batch", {semconv.DL_STAGE: "dataloader"}, 0.02),
        ("GET /score", {"http.route": "/score"}, 0.5),  # not an otel-dl span
    ]
    for name, attributes, seconds in calls:
        span = tracer.start_span(name, attributes=attributes, start_time=start)
        span.end(end_time=start + int(seconds * 1e9))
    wait_for(lambda: servicer.spans == len(calls))
    duration = "otel_dl_collector_operation_duration_seconds"
    series = wait_for(
        lambda: (
            (found := prometheus_samples(api))
            and _value(
                found, duration + "_count", service_name="scorer", stage="dataloader", model=""
            )
            and found
        )
    )
    inference = {"service_name": "scorer", "stage": "inference", "model": "m"}
    assert _value(series, duration + "_count", **inference) == 12
    assert _value(series, duration + "_sum", **inference) == pytest.approx(0.0063)
    assert _value(series, duration + "_bucket", **inference, le="0.00025") == 0
    assert _value(series, duration + "_bucket", **inference, le="0.0005") == 11
    assert _value(series, duration + "_bucket", **inference, le="0.0025") == 12
    loader = {"service_name": "scorer", "stage": "dataloader", "model": ""}
    assert _value(series, duration + "_count", **loader) == 1
    assert _value(series, duration + "_sum", **loader) == pytest.approx(0.02)
    stages = {dict(labels).get("stage") for name, labels in series if name.startswith(duration)}
    assert stages == {"inference", "dataloader"}


def test_operation_durations_label_at_most_max_metric_services_stage_model_pairs() -> None:
    """Past ``max_metric_services`` (stage, model) pairs, the rest count as (other)."""
    from otel_dl.collector.decode import flatten
    from otel_dl.collector.enrich import set_attribute
    from otel_dl.collector.metrics import SIGNAL_ATTRIBUTES, CollectorMetrics

    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "scorer"
    spans = rs.scope_spans.add().spans
    for i, model in enumerate(["a", "b", "c", "d", "a"]):
        span = spans.add()
        span.trace_id, span.span_id = (i + 1).to_bytes(16, "big"), (i + 1).to_bytes(8, "big")
        span.name, span.start_time_unix_nano, span.end_time_unix_nano = "inference", 0, 1000
        set_attribute(span, semconv.DL_STAGE, "inference")
        set_attribute(span, semconv.DL_MODEL_NAME, model)
    records, _, _ = flatten(request, SIGNAL_ATTRIBUTES)
    metrics = CollectorMetrics(max_services=2)
    metrics.observe_signals(records)
    counts = {
        (sample.labels["stage"], sample.labels["model"]): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "otel_dl_collector_operation_duration_seconds_count"
    }
    assert counts == {("inference", "a"): 2, ("inference", "b"): 1, ("(other)", "(other)"): 2}


def test_http_protobuf_healthy_trace_gets_no_fault_attributes(
    sink, make_collector, make_provider, wait_for
):
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    frontend = make_provider("frontend", endpoint, protocol="http")
    features = make_provider("feature-service", endpoint, protocol="http")

    _pipeline_trace(frontend, features)

    spans = wait_for(lambda: servicer.spans == 3 and servicer.by_name())
    for span in spans.values():
        assert not any(k.startswith("dl.fault") for k in span["attrs"])


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
    spans = wait_for(lambda: servicer.by_name())
    assert spans["call"]["attrs"][semconv.DL_FAULT_KIND] == semconv.FAULT_KIND_DEPENDENCY_OUTAGE
    assert spans["call"]["attrs"][semconv.DL_FAULT_ORIGIN] == "external"


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


PB = "application/x-protobuf"
JS = "application/json"


def _named_spans(*names: str, first: int = 1) -> ExportTraceServiceRequest:
    """A request of one root span per name, each its own trace."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "encoded"
    scope = rs.scope_spans.add()
    for i, name in enumerate(names, first):
        scope.spans.add(
            trace_id=i.to_bytes(16, "big"),
            span_id=i.to_bytes(8, "big"),
            name=name,
            start_time_unix_nano=1000,
            end_time_unix_nano=2000,
        )
    return request


def _otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON: protobuf's JSON mapping, with the ids in hex."""
    data = json_format.MessageToDict(request)
    for rs in data["resourceSpans"]:
        for scope in rs["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId"):
                    span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(data).encode()


def _deflate(data: bytes, wbits: int = zlib.MAX_WBITS, level: int = 6) -> bytes:
    """zlib-wrapped deflate (RFC 1950) by default; raw deflate with ``wbits=-15``, gzip
    with ``wbits=31``."""
    stream = zlib.compressobj(level, zlib.DEFLATED, wbits)
    return stream.compress(data) + stream.flush()


def _post_encoded(port: int, body: bytes, ctype: str, encoding: str | None) -> requests.Response:
    headers = {"Content-Type": ctype}
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return requests.post(
        f"http://127.0.0.1:{port}/v1/traces", data=body, headers=headers, timeout=30
    )


def _status_message(resp: requests.Response) -> str:
    """The message of the google.rpc.Status the receiver answers a refusal with, in the
    request's encoding (JSON or protobuf)."""
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith(JS):
        return str(resp.json()["message"])
    assert ctype.startswith(PB), f"HTTP {resp.status_code} {ctype!r}: {resp.text[:200]!r}"
    return status_pb2.Status.FromString(resp.content).message


def _server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """aiohttp's logged errors (its 'Error handling request' traceback among them)."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("aiohttp") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


def test_http_unsupported_content_encoding_is_415_naming_it(make_collector, caplog):
    """br and zstd (decodable by aiohttp only with optional packages) and any other
    encoding get the documented 415, from the receiver, for protobuf and JSON alike:
    the header alone decides, the body is never inflated."""
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    collector = make_collector()
    request = _named_spans("never-accepted")
    answers = {}
    for encoding in ("br", "zstd", "BR", "compress", "x-foo", "gzip, br", "br, gzip", "gzip, gzip"):
        for ctype, body in ((PB, request.SerializeToString()), (JS, _otlp_json(request))):
            resp = _post_encoded(collector.http_port, body, ctype, encoding)
            answers[(encoding, ctype)] = resp.status_code
            assert resp.status_code == 415, (encoding, ctype, resp.status_code, resp.text)
            assert resp.headers["Content-Type"].startswith(ctype)
            message = _status_message(resp)
            assert f"Content-Encoding {encoding!r} is not supported" in message, message
            assert "use gzip, deflate or none" in message, message
    assert set(answers.values()) == {415}
    assert _server_errors(caplog) == []
    # The same request without the encoding is accepted by the same collector.
    resp = _post_encoded(collector.http_port, request.SerializeToString(), PB, None)
    assert resp.status_code == 200


def test_http_gzip_and_deflate_bodies_are_inflated_and_accepted(
    sink, make_collector, wait_for, caplog
):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    port = collector.http_port
    sent: list[str] = []

    def send(name: str, ctype: str, encoding: str | None, compress=lambda b: b) -> None:
        request = _named_spans(name, first=len(sent) + 1)
        raw = request.SerializeToString() if ctype == PB else _otlp_json(request)
        resp = _post_encoded(port, compress(raw), ctype, encoding)
        assert resp.status_code == 200, (name, resp.status_code, resp.text)
        sent.append(name)

    send("pb-gzip", PB, "gzip", gzip.compress)
    send("pb-gzip-upper", PB, "GZIP", gzip.compress)
    send("pb-deflate-zlib", PB, "deflate", _deflate)
    send("pb-deflate-raw", PB, "deflate", lambda b: _deflate(b, wbits=-zlib.MAX_WBITS))
    send("json-gzip", JS, "gzip", gzip.compress)
    send("json-deflate", JS, "deflate", _deflate)
    send("pb-identity", PB, "identity")
    send("json-identity-list", JS, "identity, gzip", gzip.compress)
    send("pb-empty-encoding", PB, "")
    # gzip may hold several members: two requests' bytes concatenate into one request.
    first, second = _named_spans("pb-member-1", first=90), _named_spans("pb-member-2", first=91)
    resp = _post_encoded(
        port,
        gzip.compress(first.SerializeToString()) + gzip.compress(second.SerializeToString()),
        PB,
        "gzip",
    )
    assert resp.status_code == 200, resp.text
    sent += ["pb-member-1", "pb-member-2"]

    spans = wait_for(lambda: set(sent) <= set(servicer.by_name()) and servicer.by_name())
    assert set(spans) == set(sent)
    assert _server_errors(caplog) == []


def test_http_gzip_bomb_is_413_without_inflating_it(make_collector, caplog):
    """A body small on the wire that inflates far past max_request_bytes is refused with
    413 naming the key, having inflated no more than the limit (traced in this process,
    where the collector runs)."""
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    limit = 1 << 20
    collector = make_collector(max_request_bytes=limit)
    inflated = 256 << 20
    bombs = {}
    for encoding, wbits in (("gzip", 16 + zlib.MAX_WBITS), ("deflate", zlib.MAX_WBITS)):
        stream = zlib.compressobj(9, zlib.DEFLATED, wbits)
        chunk = b"\0" * (1 << 20)
        parts = [stream.compress(chunk) for _ in range(inflated // len(chunk))]
        bombs[encoding] = b"".join(parts) + stream.flush()
        assert len(bombs[encoding]) < limit
    for (encoding, bomb), ctype in itertools.product(bombs.items(), (PB, JS)):
        tracemalloc.start()
        try:
            resp = _post_encoded(collector.http_port, bomb, ctype, encoding)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert resp.status_code == 413, (encoding, ctype, resp.status_code, resp.text)
        message = _status_message(resp)
        assert "max_request_bytes" in message and "after decompression" in message, message
        # 256 MiB inflated whole would show here; the limit is 1 MiB.
        assert peak < 32 << 20, f"{encoding}: {peak:,} bytes allocated at the peak"
    assert _server_errors(caplog) == []


def test_http_corrupt_gzip_or_deflate_body_is_400_with_a_message(make_collector, caplog):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    collector = make_collector()
    raw = _named_spans("corrupt").SerializeToString()
    good = gzip.compress(raw)
    bad_crc = good[:-8] + bytes(b ^ 0xFF for b in good[-8:-4]) + good[-4:]
    cases = [
        ("gzip", b"this is not gzip at all", "not valid gzip data"),
        ("gzip", good[: len(good) // 2], "gzip body is truncated"),
        ("gzip", bad_crc, "not valid gzip data"),
        ("gzip", good + b"trailing junk", "not valid gzip data"),
        ("deflate", b"\x78\x9cnot deflate data", "not valid deflate data"),
        ("deflate", _deflate(raw)[:-4], "deflate body is truncated"),
        ("deflate", _deflate(raw) + b"junk", "after the end of its compressed stream"),
    ]
    for encoding, body, expected in cases:
        for ctype in (PB, JS):
            resp = _post_encoded(collector.http_port, body, ctype, encoding)
            assert resp.status_code == 400, (encoding, body[:20], ctype, resp.status_code)
            message = _status_message(resp)
            assert expected in message, message
    assert _server_errors(caplog) == []
    resp = _post_encoded(collector.http_port, good, PB, "gzip")
    assert resp.status_code == 200, resp.text


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
    spans = wait_for(lambda: servicer.spans == 2 and servicer.by_name())
    assert spans["transform"]["attrs"][semconv.DL_FAULT_ROOT_CAUSE] is True
    assert spans["predict"]["attrs"][semconv.DL_FAULT_SYMPTOM] is True
    assert spans["predict"]["attrs"][semconv.DL_FAULT_ROOT_CAUSE_SERVICE] == "preprocess"


def _fault_kinds(servicer) -> Counter[str]:
    """``dl.fault.kind`` of every root-cause span the sink received, counted."""
    return Counter(
        span["attrs"][semconv.DL_FAULT_KIND]
        for spans in servicer.traces().values()
        for span in spans
        if semconv.DL_FAULT_KIND in span["attrs"]
    )


def test_error_type_of_another_type_is_ignored_with_a_warning_not_an_error(
    sink, make_collector, make_provider, wait_for, caplog
):
    """``error.type`` is a string in the semantic conventions: ``false`` or ``0`` sent as a
    bool or an int must neither make a healthy trace a fault nor pass silently."""
    caplog.set_level(logging.WARNING, logger="otel_dl.collector")
    servicer, sink_port = sink
    collector = make_collector(export_endpoint=f"127.0.0.1:{sink_port}")
    endpoint = f"127.0.0.1:{collector.grpc_port}"
    frontend = make_provider("frontend", endpoint).get_tracer("t")
    worker = make_provider("worker", endpoint).get_tracer("t")
    values: list[bool | int | str] = [False] * 98 + [True, 0] + ["TimeoutError"]
    for value in values:  # 100 healthy traces, then one with a real error.type
        with (
            frontend.start_as_current_span("predict") as entry,
            worker.start_as_current_span("transform") as span,
        ):
            span.set_attribute("error.type", value)
            # The request carries the step's error.type too, so a mistyped value read as
            # an error would reach the entry and make a fault (symptom first).
            entry.set_attribute("error.type", value)
    wait_for(lambda: servicer.spans == 2 * len(values), timeout=30)

    # Only the string error.type is an error; the other 100 traces are not.
    assert _fault_kinds(servicer)[semconv.FAULT_KIND_ERROR] == 1
    api = f"http://127.0.0.1:{collector.api_port}"
    stored = requests.get(f"{api}/api/faults?kind=error&limit=1000", timeout=5).json()
    assert len(stored["faults"]) == 1
    series = prometheus_samples(api)
    ignored = "otel_dl_collector_attributes_ignored_total"
    assert _value(series, ignored, attribute="error.type", value_type="boolean") == 2 * 99
    assert _value(series, ignored, attribute="error.type", value_type="int") == 2
    # Counted on both spans of each trace; one log line per cause, not per span or request.
    lines = [r.getMessage() for r in caplog.records if "error.type arrived as" in r.getMessage()]
    assert len(lines) == 2, lines
    assert any("arrived as boolean, not string" in line for line in lines)
    assert all("Fix the sender" in line for line in lines)

    # The sender gets the warning too: a partial success with 0 rejected spans.
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "raw"
    span = rs.scope_spans.add().spans.add(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="call", kind=3
    )
    span.attributes.add(key="error.type").value.bool_value = False
    span.attributes.add(key="server.address").value.int_value = 443
    with grpc.insecure_channel(endpoint) as channel:
        export = channel.unary_unary(
            EXPORT_METHOD, response_deserializer=ExportTraceServiceResponse.FromString
        )
        response = export(request.SerializeToString(), timeout=10)
    assert response.partial_success.rejected_spans == 0
    message = response.partial_success.error_message
    assert "error.type (boolean, not string)" in message, message
    assert "server.address (int, not string)" in message, message
    wait_for(lambda: servicer.spans == 2 * len(values) + 1)
    assert _fault_kinds(servicer)[semconv.FAULT_KIND_ERROR] == 1

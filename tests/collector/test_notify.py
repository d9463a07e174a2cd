"""The webhook notifier against a real HTTP receiver on loopback, and with none."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from otel_dl import semconv
from otel_dl.collector.attribute import Attributor
from otel_dl.collector.catalog import load_catalog
from otel_dl.collector.config import ConfigError, load_config
from otel_dl.collector.decode import flatten
from otel_dl.collector.enrich import set_attribute
from otel_dl.collector.metrics import CollectorMetrics
from otel_dl.collector.notify import OUTCOMES, Notifier, fault_from_decision
from otel_dl.collector.tracelink import render_trace_link
from tests.e2e.binaries import free_port

JAEGER_TEMPLATE = "http://jaeger:16686/trace/{trace_id}?uiFind={span_id}"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every JSON body POSTed to it.

    ``statuses`` is the list of status codes to answer, one per request, then 200.
    """

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.headers["Content-Type"] == "application/json"
                time.sleep(receiver.delay)
                with receiver.lock:
                    receiver.bodies.append(body)
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _counts(metrics: CollectorMetrics) -> dict[str, float]:
    counts = dict.fromkeys(OUTCOMES, 0.0)
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name == "otel_dl_collector_notifications":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["outcome"]] = sample.value
    return counts


def _fault(mode: str = "data-drift", service: str = "batch-scorer") -> dict[str, Any]:
    catalog_mode = load_catalog().by_id(mode)
    return {
        "kind": catalog_mode.kind,
        "mode": mode,
        "origin": catalog_mode.origin,
        "service": service,
        "span_id": "00f067aa0ba902b7",
        "span_name": "dataloader.batch",
        "owner": catalog_mode.owner,
        "severity": catalog_mode.severity,
        "mitigation": catalog_mode.mitigation,
        "runbook": catalog_mode.runbook,
        "score": 0.9,
        "evidence": "dl.drift.status=alert",
        "candidates": [service],
        "time": 1765000000.0,
    }


@pytest.fixture
def metrics() -> CollectorMetrics:
    return CollectorMetrics()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _wait(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _drifting_decision() -> Any:
    """A real attribution: one span of a real OTLP trace with dl.drift.status=alert."""
    attributor = Attributor(load_catalog(), min_baseline_samples=5)
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "batch-scorer"
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id = bytes.fromhex(TRACE_ID), bytes.fromhex("00f067aa0ba902b7")
    span.name = "dataloader.batch"
    span.start_time_unix_nano, span.end_time_unix_nano = 10**18, 10**18 + 10**6
    set_attribute(span, semconv.DL_DRIFT_STATUS, "alert")
    set_attribute(span, semconv.DL_DRIFT_SCORE, 0.6)
    records, _, _ = flatten(request, attributor.wanted_attributes)
    decision = attributor.decide(bytes.fromhex(TRACE_ID), records)
    assert decision.fault and decision.mode is not None
    return decision


def test_payload_of_a_real_attribution_reaches_the_receiver(receiver, metrics):
    decision = _drifting_decision()
    notifier = Notifier(receiver.url, metrics, trace_link_template=JAEGER_TEMPLATE)
    try:
        assert notifier.notify(fault_from_decision(decision), decision.trace_id.hex())
        _wait(lambda: len(receiver.bodies) == 1)
    finally:
        notifier.close()
    body = receiver.bodies[0]
    mode = load_catalog().by_id("data-drift")
    assert body["mode"] == "data-drift" and body["kind"] == "data_drift"
    assert body["service"] == "batch-scorer" and body["span_name"] == "dataloader.batch"
    assert body["span_id"] == "00f067aa0ba902b7" and body["trace_id"] == TRACE_ID
    assert (body["owner"], body["severity"]) == (mode.owner, mode.severity)
    assert body["runbook"] == mode.runbook and body["runbook"].endswith("/data-drift.md")
    assert body["mitigation"] == mode.mitigation
    assert body["trace_link"] == f"http://jaeger:16686/trace/{TRACE_ID}?uiFind=00f067aa0ba902b7"
    assert body["trace_link"] in body["text"] and mode.runbook in body["text"]
    assert "dl.drift" in body["evidence"] and body["candidates"][0] == "batch-scorer"
    assert 0 < body["score"] <= 1
    assert _counts(metrics)["sent"] == 1


def test_without_a_template_the_link_is_null(receiver, metrics):
    notifier = Notifier(receiver.url, metrics)
    try:
        notifier.notify(_fault(), TRACE_ID)
        _wait(lambda: receiver.bodies)
    finally:
        notifier.close()
    assert receiver.bodies[0]["trace_link"] is None
    assert "Trace:" not in receiver.bodies[0]["text"]


def test_one_notification_per_incident_within_the_window(receiver, metrics):
    notifier = Notifier(receiver.url, metrics, dedupe_window=0.5)
    try:
        assert notifier.notify(_fault(), TRACE_ID)
        assert not notifier.notify(_fault(), "1" * 32)  # same mode and service
        assert notifier.notify(_fault(service="ranker"), "2" * 32)  # another service
        assert notifier.notify(_fault(mode="low-confidence"), "3" * 32)  # another mode
        _wait(lambda: len(receiver.bodies) == 3)
        # The incident stays open while its faults keep coming within the window ...
        for _ in range(3):
            time.sleep(0.2)
            assert not notifier.notify(_fault(), "4" * 32)
        # ... and a fault after a quiet window opens a new one.
        time.sleep(0.6)
        assert notifier.notify(_fault(), "5" * 32)
        _wait(lambda: len(receiver.bodies) == 4)
    finally:
        notifier.close()
    assert [b["trace_id"] for b in receiver.bodies].count(TRACE_ID) == 1
    assert _counts(metrics)["duplicate"] == 4 and _counts(metrics)["sent"] == 4


def test_rate_limit_drops_and_counts(receiver, metrics):
    notifier = Notifier(receiver.url, metrics, max_per_minute=2)
    try:
        queued = [notifier.notify(_fault(service=f"svc-{i}"), TRACE_ID) for i in range(5)]
        _wait(lambda: len(receiver.bodies) == 2)
    finally:
        notifier.close()
    assert queued == [True, True, False, False, False]
    counts = _counts(metrics)
    assert (counts["sent"], counts["rate_limited"]) == (2, 3)


def test_retries_with_backoff_until_delivered(metrics):
    with Receiver(statuses=[503, 429]) as receiver:
        notifier = Notifier(receiver.url, metrics, retries=3)
        try:
            started = time.monotonic()
            notifier.notify(_fault(), TRACE_ID)
            _wait(lambda: _counts(metrics)["sent"] == 1)
            took = time.monotonic() - started
        finally:
            notifier.close()
    assert len(receiver.bodies) == 3  # 503, 429 (Retry-After: 0), then 200
    assert took >= 0.35  # the first backoff, 0.5 s +-20 %, was waited
    assert _counts(metrics)["failed"] == 0


def test_a_refusal_is_final_and_reopens_the_incident(metrics):
    with Receiver(statuses=[400]) as receiver:
        notifier = Notifier(receiver.url, metrics, retries=3)
        try:
            notifier.notify(_fault(), TRACE_ID)
            _wait(lambda: _counts(metrics)["failed"] == 1)
            assert len(receiver.bodies) == 1  # 400 is not retried
            # The lost notification did not close the incident: its next fault notifies.
            assert notifier.notify(_fault(), "6" * 32)
            _wait(lambda: _counts(metrics)["sent"] == 1)
        finally:
            notifier.close()


def test_a_payload_that_cannot_be_sent_does_not_stop_the_notifier(receiver, metrics):
    notifier = Notifier(receiver.url, metrics)
    try:
        notifier.notify({**_fault(), "score": object()}, TRACE_ID)  # not JSON
        _wait(lambda: _counts(metrics)["failed"] == 1)
        notifier.notify(_fault(service="ranker"), TRACE_ID)
        _wait(lambda: _counts(metrics)["sent"] == 1)
    finally:
        notifier.close()
    assert [b["service"] for b in receiver.bodies] == ["ranker"]


def test_receiver_down_never_blocks_and_counts_the_loss(metrics, caplog):
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    notifier = Notifier(url, metrics, retries=1, max_per_minute=10_000, queue_size=8)
    faults = [_fault(service=f"svc-{i}") for i in range(200)]
    started = time.monotonic()
    queued = sum(notifier.notify(fault, TRACE_ID) for fault in faults)
    took = time.monotonic() - started
    notifier.close(timeout=0.5)  # then what is still queued is dropped, and counted
    counts = _counts(metrics)
    assert took < 0.5, f"200 notify() calls took {took:.3f} s"
    assert counts["sent"] == 0
    assert counts["failed"] == queued and counts["queue_full"] == 200 - queued
    assert 8 <= queued < 200
    # One warning line for the whole outage, not one per lost notification.
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1


def test_a_hanging_receiver_never_blocks_the_caller(metrics):
    # A listening socket that never accepts: connections open, no answer ever comes.
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(16)
        url = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
        notifier = Notifier(url, metrics, retries=0, timeout=0.3, queue_size=4)
        faults = [_fault(service=f"s{i}") for i in range(20)]
        started = time.monotonic()
        queued = sum(notifier.notify(fault, TRACE_ID) for fault in faults)
        assert time.monotonic() - started < 0.2
        closing = time.monotonic()
        notifier.close(timeout=0.2)
        assert time.monotonic() - closing < 2.0
    counts = _counts(metrics)
    assert counts["sent"] == 0 and counts["failed"] == queued
    assert counts["queue_full"] == 20 - queued
    assert not notifier.notify(_fault(service="after-close"), TRACE_ID)


def test_options_come_from_the_configuration(receiver, metrics):
    assert Notifier.from_config(load_config(), metrics) is None
    config = load_config(
        env={
            "OTEL_DL_COLLECTOR_WEBHOOK_URL": receiver.url,
            "OTEL_DL_COLLECTOR_TRACE_LINK_TEMPLATE": "http://jaeger:16686/trace/{trace_id}",
            "OTEL_DL_COLLECTOR_WEBHOOK_DEDUPE_WINDOW": "60",
            "OTEL_DL_COLLECTOR_WEBHOOK_MAX_PER_MINUTE": "5",
            "OTEL_DL_COLLECTOR_WEBHOOK_RETRIES": "0",
        }
    )
    notifier = Notifier.from_config(config, metrics)
    assert notifier is not None
    try:
        assert (notifier.dedupe_window, notifier.max_per_minute, notifier.retries) == (60, 5, 0)
        notifier.notify(_fault(), TRACE_ID)
        _wait(lambda: receiver.bodies)
    finally:
        notifier.close()
    assert receiver.bodies[0]["trace_link"] == f"http://jaeger:16686/trace/{TRACE_ID}"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("webhook_url", "hooks.example.com/x", "must be an http(s):// URL"),
        ("webhook_max_per_minute", "0", "greater than 0"),
        ("webhook_retries", "-1", "0 or more"),
        ("trace_link_template", "http://jaeger/trace/{traceid}", "unknown placeholder {traceid}"),
        ("trace_link_template", "http://jaeger/trace/", "no {trace_id} placeholder"),
        ("trace_link_template", "jaeger:16686/trace/{trace_id}", "http(s):// URL with a host"),
        ("trace_link_template", "http://j/{trace_id:>40}", "formats the placeholder"),
        ("trace_link_template", 'http://j/?q={"t": "{trace_id}"}', "unknown placeholder"),
        ("trace_link_template", "http://j/{trace_id", "not a valid template"),
    ],
)
def test_bad_notifier_options_name_the_option_and_the_fix(key, value, needle):
    env = "OTEL_DL_COLLECTOR_" + key.upper()
    with pytest.raises(ConfigError) as caught:
        load_config(env={env: value})
    assert env in str(caught.value) and needle in str(caught.value)


def test_a_secret_webhook_url_stays_out_of_error_messages():
    with pytest.raises(ConfigError) as caught:
        load_config(env={"OTEL_DL_COLLECTOR_WEBHOOK_URL": "ftp://hooks/T0K3N"})
    assert "T0K3N" not in str(caught.value)


def test_trace_link_templates_render():
    assert render_trace_link(None, TRACE_ID) is None
    assert (
        render_trace_link("http://jaeger:16686/trace/{trace_id}", TRACE_ID)
        == f"http://jaeger:16686/trace/{TRACE_ID}"
    )
    grafana = (
        'http://grafana:3000/explore?left={{"datasource":"tempo","queries":'
        '[{{"query":"{trace_id}","queryType":"traceql"}}]}}'
    )
    load_config(env={"OTEL_DL_COLLECTOR_TRACE_LINK_TEMPLATE": grafana})  # accepted
    assert render_trace_link(grafana, TRACE_ID) == (
        'http://grafana:3000/explore?left={"datasource":"tempo","queries":'
        f'[{{"query":"{TRACE_ID}","queryType":"traceql"}}]}}'
    )
    # Values are URL-encoded: a service name cannot break out of its query parameter.
    assert render_trace_link("http://t/{trace_id}?s={service}", "ab", service="a b&c=d") == (
        "http://t/ab?s=a%20b%26c%3Dd"
    )


def test_the_collector_notifies_the_owner_of_a_fault_it_attributes(make_collector, receiver):
    """Wired end to end: a faulty trace the running collector attributes reaches the
    webhook, with the runbook of its catalog entry and the configured trace link."""
    collector = make_collector(webhook_url=receiver.url, trace_link_template=JAEGER_TEMPLATE)
    request = ExportTraceServiceRequest()
    for service, span_id, parent in (("frontend", 1, None), ("prep", 2, 1)):
        rs = request.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", service
        span = rs.scope_spans.add().spans.add()
        span.trace_id, span.span_id = bytes.fromhex(TRACE_ID), span_id.to_bytes(8, "big")
        if parent:
            span.parent_span_id = parent.to_bytes(8, "big")
        span.name, span.status.code = f"op-{span_id}", 2
        span.start_time_unix_nano, span.end_time_unix_nano = 10**18, 10**18 + 10**6
    collector.ingest(request, None)
    _wait(lambda: len(receiver.bodies) == 1)
    body = receiver.bodies[0]
    assert body["trace_id"] == TRACE_ID and body["service"] == "prep"
    assert body["owner"] == load_catalog().by_id(body["mode"]).owner
    assert body["trace_link"].startswith(f"http://jaeger:16686/trace/{TRACE_ID}")
    assert _counts(collector.metrics)["sent"] == 1

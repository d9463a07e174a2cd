"""Benchmarks of the otel-dl collector: attribution accuracy and throughput.

Run ``python benchmarks/collector.py`` (add ``--quick`` for a smoke run). It prints:

1. Attribution accuracy on a simulated DL system of six services (gateway, ingest,
   feature-store, preprocess, inference, external-api) driven through the real OTel
   SDK and OTLP/gRPC exporter into an in-process collector, which forwards to an
   in-process OTLP sink. Normal traffic warms the baselines; then every fault kind is
   injected at random magnitudes, mixed with normal traffic. Per kind: service-level
   AC@1, AC@3, Avg@5 (RCAEval definitions), span-level AC@1, and the false-positive rate
   on normal traces, beside three baselines scored on the same traces: random ranking,
   the service with the most error spans, and the span with the largest latency z-score.
2. Throughput of one collector process (``python -m otel_dl.collector``) fed
   pre-serialised OTLP/gRPC requests over several connections and forwarding to a sink,
   the added latency after a trace's last span (p50/p99), the RSS per 10k buffered
   spans, and a profile of the in-process receive → decide path.
3. The decision thread's CPU per span for the per-service Prometheus series (operation
   duration, drift score, drift status, confidence), against attribution itself and
   against the same observations through prometheus_client's ``Histogram``, on the same
   spans in the same run (medians of 7).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from prometheus_client import CollectorRegistry, Histogram

from otel_dl import semconv
from otel_dl.collector.attribute import Attributor
from otel_dl.collector.catalog import load_catalog
from otel_dl.collector.config import load_config
from otel_dl.collector.decode import flatten
from otel_dl.collector.metrics import SIGNAL_ATTRIBUTES, UNKNOWN_METHOD, CollectorMetrics
from otel_dl.collector.pipeline import Collector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.faultsim import TRUTH, System, collector_ranking, preserialised_requests
from tests.otlp_sink import OtlpSink


# --- 1. accuracy ------------------------------------------------------------------------
def _ranking_random(spans, rng) -> tuple[list[str], str | None]:
    services = list(dict.fromkeys(s["service"] for s in spans))
    rng.shuffle(services)
    return services, rng.choice(spans)["span_id"]


def _ranking_errors(spans) -> tuple[list[str], str | None]:
    counts: dict[str, int] = {}
    for s in spans:
        counts[s["service"]] = counts.get(s["service"], 0) + int(s["error"])
    ranked = sorted(counts, key=lambda k: -counts[k])
    errs = [s for s in spans if s["error"] and s["service"] == ranked[0]]
    return ranked, (errs[0]["span_id"] if errs else None)


def _ranking_zscore(spans, stats) -> tuple[list[str], str | None]:
    def z(s):
        mean, sd = stats.get((s["service"], s["name"]), (s["duration"], 1.0))
        return (s["duration"] - mean) / (sd or 1e-9)

    ordered = sorted(spans, key=z, reverse=True)
    return list(dict.fromkeys(s["service"] for s in ordered)), ordered[0]["span_id"]


def accuracy(per_kind: int, normal: int, warmup: int, seed: int) -> None:
    rng = random.Random(seed)
    sink = OtlpSink().start()
    tmp = tempfile.mkdtemp(prefix="otel-dl-bench-")
    collector = Collector(
        load_config(
            flags={
                "grpc_port": 0,
                "http_port": 0,
                "api_port": 0,
                "decision_wait": 2.0,
                "early_grace": 0.5,
                "store": "none",
                "queue_dir": f"{tmp}/q",
                "export_endpoint": f"127.0.0.1:{sink.port}",
            }
        )
    )
    collector.start()
    system = System(f"127.0.0.1:{collector.grpc_port}", rng)
    truth: dict[str, tuple[str | None, dict[str, str]]] = {}
    t0 = time.time_ns()
    for _ in range(warmup):
        trace_id, _ = system.request(None, t0)
        t0 += 50_000_000
    system.flush()
    time.sleep(3.0)  # let the warm-up traces be decided before any fault arrives
    plan = [k for k in semconv.FAULT_KINDS for _ in range(per_kind)] + [None] * normal
    rng.shuffle(plan)
    for kind in plan:
        trace_id, ids = system.request(kind, t0)
        t0 += 50_000_000
        truth[trace_id] = (kind, ids)
    system.flush()
    total = (warmup + len(plan)) * 6
    deadline = time.monotonic() + 60
    while sink.spans < total and time.monotonic() < deadline:
        time.sleep(0.1)
    system.shutdown()
    collector.stop()
    sink.stop()
    traces = sink.traces()

    durations: dict[tuple[str, str], list[float]] = {}
    for tid, spans in traces.items():
        if tid not in truth:
            for s in spans:
                durations.setdefault((s["service"], s["name"]), []).append(s["duration"])
    stats = {k: (statistics.fmean(v), statistics.pstdev(v)) for k, v in durations.items()}
    methods = {
        "otel-dl": lambda sp: collector_ranking(sp),
        "random": lambda sp: _ranking_random(sp, rng),
        "most-errors": _ranking_errors,
        "latency-z": lambda sp: _ranking_zscore(sp, stats),
    }
    print(
        f"\n## Attribution accuracy ({per_kind} injections per kind, {normal} normal traces, "
        f"{warmup} warm-up; {len(traces)} traces received)\n"
    )
    print(f"{'kind':<18} {'method':<12} {'AC@1':>6} {'AC@3':>6} {'Avg@5':>6} {'span AC@1':>9}")
    for kind in semconv.FAULT_KINDS:
        want_service, want_span = TRUTH[kind]
        cases = [(tid, ids) for tid, (k, ids) in truth.items() if k == kind and tid in traces]
        for name, method in methods.items():
            hits = [0] * 5
            span_hits = 0
            for tid, ids in cases:
                ranked, span_id = method(traces[tid])
                for k in range(5):
                    hits[k] += want_service in ranked[: k + 1]
                span_hits += span_id == ids[want_span]
            n = max(1, len(cases))
            print(
                f"{kind:<18} {name:<12} {hits[0] / n:>6.2f} {hits[2] / n:>6.2f} "
                f"{sum(hits) / 5 / n:>6.2f} {span_hits / n:>9.2f}"
            )
    normals = [tid for tid, (k, _) in truth.items() if k is None and tid in traces]
    fps = sum(bool(collector_ranking(traces[t])[0]) for t in normals)
    print(
        f"\nfalse positives on normal traces: {fps}/{len(normals)} "
        f"= {fps / max(1, len(normals)):.3%}"
    )


# --- 2. throughput ----------------------------------------------------------------------
def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def throughput(n_requests: int, traces_per_request: int, connections: int) -> None:
    payloads = preserialised_requests(n_requests, traces_per_request, seed=1)
    spans_total = n_requests * traces_per_request * 5
    sink = OtlpSink(keep=False).start()
    tmp = tempfile.mkdtemp(prefix="otel-dl-bench-")
    port = 43170 + os.getpid() % 1000
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "otel_dl.collector",
            "--grpc-port",
            str(port),
            "--http-port",
            "0",
            "--api-port",
            "0",
            "--store",
            "none",
            "--decision-wait",
            "1",
            "--export-endpoint",
            f"127.0.0.1:{sink.port}",
            "--log-level",
            "WARNING",
        ],
        env={
            **os.environ,
            "OTEL_DL_COLLECTOR_QUEUE_DIR": f"{tmp}/q",
            "OTEL_DL_COLLECTOR_EARLY_GRACE": "0.1",
            "OTEL_DL_COLLECTOR_MAX_SPANS": "2000000",
        },
    )
    try:
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(connections)]
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=30)
        calls = [
            ch.unary_unary(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                request_serializer=None,
                response_deserializer=None,
            )
            for ch in channels
        ]
        acks: list[float] = []
        start = time.monotonic()

        def send(i: int) -> None:
            calls[i % connections](payloads[i], timeout=60)
            acks.append(time.monotonic())

        with futures.ThreadPoolExecutor(connections) as pool:
            list(pool.map(send, range(n_requests)))
        received = time.monotonic() - start
        deadline = time.monotonic() + 120
        while sink.spans < spans_total and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        lat = sorted(a - b for a, b in zip(sorted(sink.arrivals), sorted(acks), strict=False))
        for ch in channels:
            ch.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sink.stop()
    print(
        f"\n## Throughput ({spans_total} spans in {n_requests} pre-serialised requests, "
        f"{connections} connections, early grace 0.1 s)\n"
    )
    print(f"received (acknowledged) : {spans_total / received:>10,.0f} spans/s")
    print(
        f"end to end (at the sink): {spans_total / elapsed:>10,.0f} spans/s "
        f"({sink.spans}/{spans_total} spans forwarded)"
    )
    if lat:
        p50 = lat[len(lat) // 2]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"ack → sink per request, minus early grace 0.1 s: p50 {p50 - 0.1:.3f} s, "
            f"p99 {p99 - 0.1:.3f} s"
        )


def memory_and_profile(spans: int) -> None:
    """RSS per 10k buffered spans and a profile of the in-process hot path."""
    payloads = preserialised_requests(spans // 500, 100, seed=2)
    tmp = tempfile.mkdtemp(prefix="otel-dl-bench-")
    collector = Collector(
        load_config(
            flags={
                "grpc_port": 0,
                "http_port": 0,
                "api_port": 0,
                "decision_wait": 600,
                "early_grace": 600,
                "store": "none",
                "queue_dir": f"{tmp}/q",
                "max_spans": 10**7,
            }
        )
    )
    before = _rss_kib()
    profiler = cProfile.Profile()
    profiler.enable()
    for raw in payloads:  # decoded one at a time, as the receivers do
        collector.ingest(ExportTraceServiceRequest.FromString(raw), raw)
    buffered_rss = _rss_kib()
    collector.buffer.decision_wait = collector.buffer.early_grace = 0
    collector.decide_now()
    profiler.disable()
    print(
        f"\n## Memory\n\nRSS per 10k buffered spans: "
        f"{(buffered_rss - before) / (spans / 10_000) / 1024:.1f} MiB "
        f"({spans} spans buffered: what the collector keeps of their requests)"
    )
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    print("\n## Profile of ingest + decide (top 12 by own time)\n")
    print("\n".join(out.getvalue().splitlines()[:40]))


def _cpu_median(run, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        run()
        times.append(time.process_time() - started)
    return statistics.median(times)


def signal_metrics_cost(spans: int) -> None:
    """CPU per span of CollectorMetrics.observe_signals beside attribution."""
    attributor = Attributor(load_catalog(None))
    wanted = attributor.wanted_attributes | SIGNAL_ATTRIBUTES
    records = [
        rec
        for raw in preserialised_requests(spans // 500, 100, seed=3)
        for rec in flatten(ExportTraceServiceRequest.FromString(raw), wanted)[0]
    ]
    traces: dict[bytes, list] = {}
    for rec in records:
        traces.setdefault(rec.trace_id, []).append(rec)
    carrying = sum(1 for r in records if r.attrs.keys() & SIGNAL_ATTRIBUTES)
    stages = sum(1 for r in records if semconv.DL_STAGE in r.attrs)

    def decide() -> None:
        for trace_id, trace in traces.items():
            attributor.decide(trace_id, trace)

    def observe() -> None:
        CollectorMetrics().observe_signals(records)

    def observe_with_histogram() -> None:
        registry = CollectorRegistry()
        drift = Histogram("d", "d", ["service_name", "method"], registry=registry)
        confidence = Histogram("c", "c", ["service_name"], registry=registry)
        duration = Histogram("o", "o", ["service_name", "stage", "model"], registry=registry)
        for rec in records:
            stage = rec.attrs.get(semconv.DL_STAGE)
            if stage is not None:
                model = rec.attrs.get(semconv.DL_MODEL_NAME, "")
                duration.labels(rec.service, stage, model).observe(rec.duration)
            score = rec.attrs.get(semconv.DL_DRIFT_SCORE)
            if score is not None:
                method = rec.attrs.get(semconv.DL_DRIFT_METHOD, UNKNOWN_METHOD)
                drift.labels(rec.service, method).observe(score)
            value = rec.attrs.get(semconv.DL_CONFIDENCE_MEAN)
            if value is not None:
                confidence.labels(rec.service).observe(value)

    base = _cpu_median(decide)
    rows = [
        ("attribution (Attributor.decide)", base),
        ("per-service series (CollectorMetrics.observe_signals)", _cpu_median(observe)),
        ("the same through prometheus_client Histogram", _cpu_median(observe_with_histogram)),
    ]
    print(
        f"\n## Decision-thread CPU per span ({len(records)} spans, {carrying} carrying a "
        f"signal attribute, {stages} of them dl.stage; medians of 7)\n"
    )
    print("| step | µs per span | vs attribution |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds / len(records) * 1e6:.2f} | {seconds / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not args.skip_accuracy:
        if args.quick:
            accuracy(per_kind=5, normal=40, warmup=60, seed=7)
        else:
            accuracy(per_kind=40, normal=400, warmup=200, seed=7)
    if not args.skip_throughput:
        if args.quick:
            throughput(n_requests=20, traces_per_request=100, connections=4)
            memory_and_profile(spans=10_000)
            signal_metrics_cost(spans=10_000)
        else:
            throughput(n_requests=200, traces_per_request=100, connections=8)
            memory_and_profile(spans=50_000)
            signal_metrics_cost(spans=50_000)


if __name__ == "__main__":
    main()

"""An instrumented application keeps working while its OTLP backend is down, slow or failing.

Each backend condition gets its own application process, set up by ``otel_dl.instrument()``
alone: the real OTLP exporter (gRPC or HTTP/protobuf) behind otel-dl's drop-counting
``BatchSpanProcessor``. Its loop calls an ``otel_dl.stage`` over a numpy batch (one span
per call, with drift, quality and fingerprint signals) and times every call. The
backends are real servers on loopback:

- healthy: the OTLP sink of ``tests/otlp_sink.py`` (OTLP/gRPC, or OTLP/HTTP answering 200);
- down: a port nothing listens on;
- slow: a TCP server that accepts and never answers (the exporter's 10 s timeout);
- failing: the same sink refusing every export, with UNAVAILABLE (gRPC) or 503 (HTTP).

Per condition the application reports the median and p99 of its per-call latency (the
healthy run of the same protocol, in the same test run, is the baseline), its RSS growth,
the longest export queue it saw, the spans otel-dl's ``otel_dl.export.dropped_spans``
counter counted, any exception that reached it, and how long ``force_flush(timeout)``
took; it then ends without calling ``shutdown()``, and the test measures how long its exit
took. The applications start together (their start-up is imports), run their loops one
at a time, and exit on their own, in the background of the next one's loop.

The module is also the application: ``python -m tests.reliability.test_sdk_exporter app
...`` runs one.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

import otel_dl
from otel_dl._instrument import SHUTDOWN_TIMEOUT_MILLIS
from tests.otlp_sink import OtlpSink
from tests.reliability.findings import record, scale

ROOT = Path(__file__).resolve().parents[2]
PYCACHE = str(Path(tempfile.gettempdir()) / "otel-dl-reliability-pycache")
MODULE = "tests.reliability.test_sdk_exporter"
PROTOCOLS = {"grpc": "grpc", "http": "http/protobuf"}
# The healthy runs go last: the failing ones take their bounded exit meanwhile.
CONDITIONS = ("down", "slow", "failing", "healthy")
QUEUE_SIZE = 2048  # the SDK's default OTEL_BSP_MAX_QUEUE_SIZE
BATCH_SIZE = 512  # and OTEL_BSP_MAX_EXPORT_BATCH_SIZE
EXPORTER_TIMEOUT_S = 10.0  # the OTLP exporters' default timeout
EXIT_BOUND_S = SHUTDOWN_TIMEOUT_MILLIS / 1000
RSS_BOUND_MB = 48.0


# --- The application ---------------------------------------------------------------------


@otel_dl.stage("score")
def _score(batch: np.ndarray) -> np.ndarray:
    return batch * 0.5 + 1.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _spans_alive() -> int:
    """Finished spans still in memory, once the garbage collector has run: the queue's and
    the batch being exported, if nothing else holds on to them."""
    from opentelemetry.sdk.trace import ReadableSpan

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, ReadableSpan))


def _dropped(reader: Any) -> int:
    """The ``otel_dl.export.dropped_spans`` counter, as the metric reader sees it."""
    total = 0
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == otel_dl.semconv.METRIC_EXPORT_DROPPED_SPANS:
                    total += sum(int(p.value) for p in metric.data.data_points)
    return total


def _app(calls: int, flush_ms: int) -> None:
    """Warm up, say ready, wait for "go" on stdin, run the timed loop, print the figures;
    then time ``force_flush(flush_ms)``, print that, and end."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    # The application's own meter provider (instrument() uses it) lets us read the drop
    # counter; the tracer provider and its OTLP exporter are instrument()'s.
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    handle = otel_dl.instrument("exporter-app", include=["ingest"], propagation=False)
    assert handle.tracer_provider is not None
    processor = handle.tracer_provider._active_span_processor._span_processors[0]
    assert isinstance(processor, otel_dl.DropCountingSpanProcessor)
    queue = processor._batch_processor._queue
    handed = [0]
    exporter = processor.span_exporter
    export = exporter.export

    def counting_export(spans: Any) -> Any:
        handed[0] += len(spans)
        return export(spans)

    exporter.export = counting_export  # type: ignore[method-assign]
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(32, 8)) for _ in range(64)]
    for batch in batches:  # warm-up: the stage's drift baseline is learned here
        _score(batch)
    print("ready", flush=True)
    sys.stdin.readline()
    made_before = len(batches)
    latencies = np.empty(calls, dtype=np.int64)
    escaped: list[str] = []
    rss = [_rss_mb()]
    longest_queue = 0
    for i in range(calls):
        batch = batches[i % len(batches)]
        start = time.perf_counter_ns()
        try:
            _score(batch)
        except Exception as exc:  # must never happen: reported, not raised
            escaped.append(f"{type(exc).__name__}: {exc}")
        latencies[i] = time.perf_counter_ns() - start
        if i % 64 == 0:
            longest_queue = max(longest_queue, len(queue))
        if (i + 1) % (calls // 4) == 0:
            rss.append(_rss_mb())
    # A consistent snapshot: the export thread moves spans from the queue to the
    # exporter, so read until two readings a millisecond apart agree.
    snapshot = None
    for _ in range(1000):
        reading = (handed[0], len(queue), _dropped(reader))
        if reading == snapshot:
            break
        snapshot = reading
        time.sleep(0.001)
    assert snapshot is not None
    handed_to_exporter, queued_at_end, dropped = snapshot
    figures = {
        "calls": calls,
        "p50_us": float(np.percentile(latencies, 50)) / 1000,
        "p99_us": float(np.percentile(latencies, 99)) / 1000,
        "rss_mb": rss,
        "longest_queue": longest_queue,
        "made": made_before + calls,
        "handed_to_exporter": handed_to_exporter,
        "queued_at_end": queued_at_end,
        "dropped": dropped,
        "dropped_property": processor.dropped_spans,
        "escaped": escaped,
        "spans_alive": _spans_alive(),
    }
    print(json.dumps(figures), flush=True)
    began = time.monotonic()
    flushed = handle.force_flush(flush_ms)
    flush = {
        "flushed": flushed,
        "flush_s": time.monotonic() - began,
        "exit_started_at": time.time(),
    }
    print(json.dumps(flush), flush=True)
    # No shutdown() call: the application just ends, and otel-dl's exit hook flushes.


# --- The backends ---------------------------------------------------------------------


@contextmanager
def _silent_backend() -> Iterator[str]:
    """Accepts connections and never reads or answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in held:
            conn.close()


def _dead_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@dataclass
class _Backend:
    endpoint: str
    received: Any  # () -> spans the backend received, or None when it keeps none


def _backend(stack: ExitStack, protocol: str, condition: str) -> _Backend:
    if condition == "down":
        return _Backend(_dead_endpoint(), lambda: None)
    if condition == "slow":
        return _Backend(stack.enter_context(_silent_backend()), lambda: None)
    # Failing: every export refused with UNAVAILABLE (gRPC) or 503 (HTTP).
    refusal = None if condition == "healthy" else grpc.StatusCode.UNAVAILABLE
    sink = stack.enter_context(OtlpSink(keep=False, http=protocol == "http", fail_with=refusal))
    endpoint = sink.endpoint if protocol == "grpc" else sink.http_endpoint
    return _Backend(endpoint, lambda: sink.spans)


# --- The test ---------------------------------------------------------------------------


@dataclass
class _Run:
    protocol: str
    condition: str
    process: subprocess.Popen[str]
    backend: _Backend
    figures: dict[str, Any] | None = None
    flush: dict[str, Any] | None = None
    exited_at: float | None = None


def _start(
    protocol: str, condition: str, backend: _Backend, log: Path, calls: int, flush_ms: int
) -> _Run:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=backend.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL=PROTOCOLS[protocol],
        OTEL_METRICS_EXPORTER="none",
        PYTHONPATH=str(ROOT),
        # Compiled bytecode in a cache of the children's own: the second child to import
        # torch or otel-dl does not compile it again.
        PYTHONPYCACHEPREFIX=PYCACHE,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", MODULE, "app", str(calls), str(flush_ms)],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    return _Run(protocol, condition, process, backend)


def _watch_exit(run: _Run) -> None:
    """Read the flush figures, then note when the process exits."""

    def wait() -> None:
        assert run.process.stdout is not None
        line = run.process.stdout.readline()
        run.flush = json.loads(line) if line else None
        run.process.wait()
        run.exited_at = time.time()

    threading.Thread(target=wait, daemon=True).start()


def _ms(us: float) -> str:
    return f"{us / 1000:.2f} ms" if abs(us) >= 1000 else f"{us:.0f} µs"


def test_backend_down_slow_or_failing_costs_the_application_nothing(tmp_path: Path) -> None:
    calls = int(scale(3_000, 30_000))
    flush_ms = int(scale(1_000, 5_000))
    runs: list[_Run] = []
    with ExitStack() as stack:
        for condition in CONDITIONS:
            for protocol in PROTOCOLS:
                backend = _backend(stack, protocol, condition)
                log = tmp_path / f"{protocol}-{condition}.log"
                runs.append(_start(protocol, condition, backend, log, calls, flush_ms))
        # Every application imports at once; the loops run one at a time.
        ready = [r for r in runs if r.process.stdout and r.process.stdout.readline() == "ready\n"]
        for run in ready:
            assert run.process.stdin is not None and run.process.stdout is not None
            run.process.stdin.write("go\n")
            run.process.stdin.flush()
            line = run.process.stdout.readline()
            run.figures = json.loads(line) if line else None
            _watch_exit(run)
        deadline = time.monotonic() + EXIT_BOUND_S + 30
        while time.monotonic() < deadline and any(r.exited_at is None for r in ready):
            time.sleep(0.05)
        for run in runs:
            if run.exited_at is None:
                run.process.kill()
        received = {(r.protocol, r.condition): r.backend.received() for r in runs}

    healthy = {r.protocol: r.figures for r in runs if r.condition == "healthy"}
    rows = [HEADER]
    did_not_hold: list[str] = []
    for run in sorted(runs, key=lambda r: (r.protocol, CONDITIONS.index(r.condition))):
        row, problems = _assess(run, healthy.get(run.protocol), received, flush_ms)
        rows.append(row)
        did_not_hold += problems
    measured = [r for r in runs if r.figures and r.flush and r.exited_at]
    faulty = [r for r in measured if r.condition != "healthy"]
    added_p50 = max(_added(r, healthy, "p50_us") for r in faulty) if faulty else 0.0
    added_p99 = max(_added(r, healthy, "p99_us") for r in faulty) if faulty else 0.0
    # Generous bounds for a shared 2-core machine; the table has the measured values.
    if added_p50 > 500:
        did_not_hold.append(f"A failing backend added {_ms(added_p50)} to the median call.")
    if added_p99 > 20_000:
        did_not_hold.append(f"A failing backend added {_ms(added_p99)} to the p99 call.")
    growth = max((_growth(r) for r in measured), default=0.0)
    alive = max((r.figures["spans_alive"] for r in measured if r.figures), default=0)
    exits = [_exit_s(r) for r in measured]
    flushes = [r.flush["flush_s"] for r in faulty if r.flush]
    dropped = sum(r.figures["dropped"] for r in faulty if r.figures)
    record(
        "sdk-exporter",
        tried=[
            f"{len(runs)} instrumented applications (gRPC and HTTP/protobuf x healthy, down, "
            f"slow, failing backend), {calls:,} timed calls each, one span per call, through "
            "otel_dl.instrument()'s OTLP exporter and drop-counting BatchSpanProcessor "
            f"(queue {QUEUE_SIZE:,}, exporter timeout {EXPORTER_TIMEOUT_S:.0f} s); then "
            f"force_flush({flush_ms}), and the application just ends, without shutdown().",
        ],
        held=[]
        if did_not_hold
        else [
            f"0 exceptions reached any application in {calls * len(runs):,} calls.",
            f"A down, slow or failing backend added at most {_ms(max(added_p50, 0))} to the "
            "median call and "
            + (
                f"{_ms(added_p99)} to the p99 call"
                if added_p99 > 0
                else f"nothing to the p99 call (at least {_ms(-added_p99)} lower)"
            )
            + ", against the healthy backend of the same protocol.",
            f"RSS grew at most {growth:.1f} MB during a loop (bound {RSS_BOUND_MB:.0f} MB); "
            f"the export queue never held more than {QUEUE_SIZE:,} spans, and after a garbage "
            f"collection at most {alive:,} finished spans were in memory (the queue, "
            f"{QUEUE_SIZE:,}, and one batch, {BATCH_SIZE}).",
            f"force_flush({flush_ms}) returned False within {max(flushes, default=0):.1f} s "
            "with a failing backend (True with a healthy one), and every application exited "
            f"within {max(exits, default=0):.1f} s: otel-dl's {EXIT_BOUND_S:.0f} s shutdown "
            "bound at exit, plus the interpreter's own teardown.",
            f"{dropped:,} spans were dropped on full queues, all counted by "
            "otel_dl.export.dropped_spans: spans made = handed to the exporter + still queued "
            "+ counted as dropped in every run, and the healthy backends received every span.",
        ],
        did_not_hold=did_not_hold,
        table=rows,
        notes=[
            "p50/p99 are per-call wall times of the application's own call, span and signals "
            "included; 'added' is the difference to the healthy run of the same protocol. A "
            "healthy exporter costs the application more than a failing one: encoding a batch "
            "holds the GIL on the export thread, which shows in the healthy p99.",
            "Before otel-dl bounded its shutdown, the same exits took 35 s (backend down) to "
            "80 s (hanging) here.",
            "RSS grows more with a failing backend than with a healthy one: the OTLP exporter "
            "keeps each failed export's error, whose traceback holds the batch, in a reference "
            "cycle that Python's cyclic garbage collector frees later; the spans-in-memory "
            "column is counted after a collection.",
        ],
    )
    assert not did_not_hold, did_not_hold


HEADER = [
    "protocol",
    "backend",
    "p50",
    "p99",
    "p50 added",
    "p99 added",
    "RSS growth",
    "longest queue",
    "spans in memory",
    "dropped",
    "force_flush",
    "exit",
]


def _growth(run: _Run) -> float:
    assert run.figures is not None
    rss = run.figures["rss_mb"]
    return float(rss[-1] - rss[0])


def _exit_s(run: _Run) -> float:
    assert run.flush is not None and run.exited_at is not None
    return run.exited_at - float(run.flush["exit_started_at"])


def _added(run: _Run, healthy: dict[str, dict[str, Any] | None], key: str) -> float:
    baseline = healthy.get(run.protocol)
    assert run.figures is not None and baseline is not None
    return float(run.figures[key] - baseline[key])


def _assess(
    run: _Run,
    healthy: dict[str, Any] | None,
    received: dict[tuple[str, str], int | None],
    flush_ms: int,
) -> tuple[list[str], list[str]]:
    """The table row of one run and what did not hold in it."""
    name = f"{run.protocol}/{run.condition}"
    figures, flush = run.figures, run.flush
    if figures is None or flush is None or healthy is None or run.exited_at is None:
        return [run.protocol, run.condition, *["-"] * (len(HEADER) - 2)], [
            f"{name}: the application did not finish (exit code {run.process.returncode})."
        ]
    problems = []
    is_healthy = run.condition == "healthy"
    exit_s = _exit_s(run)
    row = [
        run.protocol,
        run.condition,
        _ms(figures["p50_us"]),
        _ms(figures["p99_us"]),
        "-" if is_healthy else _ms(figures["p50_us"] - healthy["p50_us"]),
        "-" if is_healthy else _ms(figures["p99_us"] - healthy["p99_us"]),
        f"{_growth(run):.1f} MB",
        f"{figures['longest_queue']:,}",
        f"{figures['spans_alive']:,}",
        f"{figures['dropped']:,}",
        f"{flush['flushed']} in {flush['flush_s']:.2f} s",
        f"{exit_s:.1f} s",
    ]
    if figures["escaped"]:
        problems.append(
            f"{name}: {len(figures['escaped'])} exceptions reached the application, first "
            f"{figures['escaped'][0]}."
        )
    if _growth(run) > RSS_BOUND_MB:
        problems.append(f"{name}: RSS grew {_growth(run):.1f} MB (bound {RSS_BOUND_MB:.0f} MB).")
    if figures["longest_queue"] > QUEUE_SIZE:
        problems.append(f"{name}: the export queue held {figures['longest_queue']:,} spans.")
    if figures["spans_alive"] > QUEUE_SIZE + BATCH_SIZE:
        problems.append(f"{name}: {figures['spans_alive']:,} finished spans still in memory.")
    if flush["flushed"] is not is_healthy or flush["flush_s"] > flush_ms / 1000 + 1:
        problems.append(
            f"{name}: force_flush({flush_ms}) returned {flush['flushed']} after "
            f"{flush['flush_s']:.1f} s."
        )
    if exit_s > EXIT_BOUND_S + 3:
        problems.append(f"{name}: exit took {exit_s:.1f} s (bound {EXIT_BOUND_S:.0f} s).")
    accounted = figures["handed_to_exporter"] + figures["queued_at_end"] + figures["dropped"]
    if figures["dropped"] != figures["dropped_property"] or accounted != figures["made"]:
        problems.append(
            f"{name}: {figures['made']:,} spans made, {figures['handed_to_exporter']:,} handed "
            f"to the exporter, {figures['queued_at_end']:,} queued, {figures['dropped']:,} "
            f"counted as dropped ({figures['dropped_property']:,} by the processor)."
        )
    if not is_healthy and figures["made"] > QUEUE_SIZE + 512 and figures["dropped"] == 0:
        problems.append(f"{name}: no drop was counted although the backend took nothing.")
    got = received[(run.protocol, run.condition)]
    if is_healthy and got != figures["made"]:
        problems.append(f"{name}: the backend received {got} of {figures['made']:,} spans.")
    return row, problems


if __name__ == "__main__":
    if sys.argv[1:2] == ["app"]:
        _app(int(sys.argv[2]), int(sys.argv[3]))

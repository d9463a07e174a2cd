"""Side by side: the otel-dl collector and Jaeger v2's own trace-grouping pipeline.

Run ``python benchmarks/pipelines.py`` (``--quick`` for a smoke run, ``--loads`` to pick
loads, ``--pipelines`` to pick pipelines, ``--threads`` to split the otel-dl collector's
CPU by thread: receiving workers, decision thread, exporter, gRPC's serving and C
threads). To measure another revision of otel-dl, run
this script with ``PYTHONPATH`` naming that revision's tree (with ``otel_dl/collector``
linked to its ``collector``): the collector process inherits it. Each load is sent, in
the same run, to three pipelines, each its own process forwarding over OTLP/gRPC to the
same in-process sink:

- **otel-dl**: ``python -m otel_dl.collector`` with its defaults (on-disk journal fsync'd
  every 100 ms, fsync'd disk export queue, attribution of every trace) and no store
  (``--store none``); ``OTEL_DL_COLLECTOR_JOURNAL_FSYNC_MS=0`` in the environment runs
  it with an fsync per request before its acknowledgement;
- **Jaeger v2**: Jaeger v2 configured as a pure pipeline: otlp receiver →
  ``tail_sampling`` (always_sample) → batch → OTLP/gRPC exporter;
- **OTel Collector**: the same pipeline in the small OpenTelemetry Collector built from
  ``examples/deploy/otelcol/builder.yaml`` (a newer ``tail_sampling``).

The loads:

- ``preserialised``: the project's own pre-serialised OTLP/gRPC requests
  (``tests.faultsim.preserialised_requests``: 5-span traces over three services, 500
  spans a request), sent from this process over ``--connections`` channels;
- ``tg-grpc``, ``tg-http``, ``tg-procs``: ``telemetrygen traces`` from
  opentelemetry-collector-contrib (2-span traces, unthrottled): one process of 4 workers
  over OTLP/gRPC, the same over OTLP/HTTP, and 16 processes of one worker each with
  batches of 2,048 spans over OTLP/gRPC. Each process's ``OTEL_BSP_MAX_QUEUE_SIZE`` is set
  to all the spans it sends: the Go SDK's default queue of 2,048 spans would silently
  drop spans at an unthrottled rate.

All three pipelines wait the same ``--decision-wait`` before deciding a trace (otel-dl may
decide earlier once a trace's root has ended, after ``early_grace``: 1 s by default, so
not at the default decision wait). Each
run first sends one warm-up request through the whole pipeline. For each load and
pipeline: spans/s end to end (load started → last span at the sink), the pipeline
process's CPU-seconds per 100k spans (user + system from /proc), medians of
``--repeats`` runs interleaved, the ratios to Jaeger, and the spans sent against those
that reached the sink (every run must deliver them all; a shortfall is printed). The
client and the sink share the machine with the pipeline, as they would on one host.

The Go binaries come from ``tests.e2e.binaries`` (built and cached in
``~/.cache/otel-dl/bin`` by ``python -m tests.e2e.binaries``). Jaeger v2 v1.76.0 is built
on Collector v0.140, which knows the OTLP/gRPC exporter only by its old name ``otlp``; the
OTel Collector (v0.160) gets the current name ``otlp_grpc``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.binaries import free_port, jaeger_binary, otelcol_binary, telemetrygen_binary
from tests.faultsim import preserialised_requests
from tests.otlp_sink import OtlpSink

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
#: Seconds without a new span at the sink after which a run stops waiting for the rest.
STALL_SECONDS = 30.0

TAIL_SAMPLING = """
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{port}
        max_recv_msg_size_mib: 64
      http:
        endpoint: 127.0.0.1:{http_port}
processors:
  tail_sampling:
    decision_wait: {wait}s
    num_traces: 500000
    expected_new_traces_per_sec: 50000
    policies:
      - name: keep-all
        type: always_sample
  batch: {{}}
exporters:
  {exporter}:
    endpoint: 127.0.0.1:{sink}
    tls:
      insecure: true
service:
  telemetry:
    logs:
      level: warn
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      processors: [tail_sampling, batch]
      exporters: [{exporter}]
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


#: Started in place of ``python -m otel_dl.collector`` with ``--threads``.
_PROBED = Path(__file__).resolve().parent / "probes" / "thread_cpu.py"


#: Set by ``--threads``: the file the otel-dl collector's thread probe writes.
THREAD_CPU_FILE: str | None = None


def _otel_dl(
    port: int, http_port: int, sink: int, wait: float, tmp: str
) -> subprocess.Popen[bytes]:
    launch = [str(_PROBED)] if THREAD_CPU_FILE else ["-m", "otel_dl.collector"]
    argv = [
        sys.executable, *launch, "--grpc-port", str(port),
        "--http-port", str(http_port), "--api-port", "0", "--store", "none",
        "--decision-wait", str(wait), "--export-endpoint", f"127.0.0.1:{sink}",
        "--log-level", "WARNING",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OTEL_DL_COLLECTOR_QUEUE_DIR": f"{tmp}/queue",
        "OTEL_DL_COLLECTOR_MAX_SPANS": "2000000",
    }
    if THREAD_CPU_FILE:
        env["THREAD_CPU_FILE"] = THREAD_CPU_FILE
    return subprocess.Popen(argv, env=env, start_new_session=True)


def _tail_sampling(
    binary: Callable[[], Path], exporter: str
) -> Callable[..., subprocess.Popen[bytes]]:
    def start(
        port: int, http_port: int, sink: int, wait: float, tmp: str
    ) -> subprocess.Popen[bytes]:
        config = Path(tmp) / "config.yaml"
        config.write_text(
            TAIL_SAMPLING.format(
                port=port, http_port=http_port, sink=sink, wait=wait, exporter=exporter
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        log = open(Path(tmp) / "pipeline.log", "wb")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(
            [str(binary()), f"--config={config}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    return start


JAEGER = "Jaeger v2 tail_sampling"
PIPELINES: dict[str, Callable[..., subprocess.Popen[bytes]]] = {
    "otel-dl collector": _otel_dl,
    JAEGER: _tail_sampling(jaeger_binary, "otlp"),
    "OTel Collector tail_sampling": _tail_sampling(otelcol_binary, "otlp_grpc"),
}


#: The pipelines by their ``--pipelines`` names.
SHORT = {
    "otel-dl": "otel-dl collector",
    "jaeger": JAEGER,
    "otelcol": "OTel Collector tail_sampling",
}


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the pipeline accepts connections: polled here, because a gRPC channel
    that finds the port closed backs off a whole second before it tries again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the pipeline exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _send_with_retry(call: grpc.UnaryUnaryMultiCallable, payload: bytes) -> None:
    while True:
        try:
            call(payload, timeout=60)
            return
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            time.sleep(0.05)


@dataclass(frozen=True)
class Preserialised:
    """The project's own load: pre-serialised requests over ``connections`` channels."""

    payloads: list[bytes]
    connections: int
    spans: int

    @property
    def title(self) -> str:
        return f"pre-serialised OTLP/gRPC, {self.connections} connections"

    def prepare(self, port: int, http_port: int) -> Callable[[], None]:
        """Open the channels; return the timed part, which sends every request."""
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(self.connections)]
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=60)
        calls = [ch.unary_unary(EXPORT) for ch in channels]

        def send(i: int) -> None:
            _send_with_retry(calls[i % self.connections], self.payloads[i])

        def go() -> None:
            try:
                with futures.ThreadPoolExecutor(self.connections) as pool:
                    list(pool.map(send, range(len(self.payloads))))
            finally:
                for ch in channels:
                    ch.close()

        return go


@dataclass(frozen=True)
class Telemetrygen:
    """``telemetrygen traces``: ``processes`` clients of ``workers`` workers each."""

    processes: int
    workers: int
    traces_per_worker: int
    http: bool = False
    batch_size: int = 100  # telemetrygen's default

    #: telemetrygen writes a parent and ``--child-spans`` (1) children per trace.
    SPANS_PER_TRACE = 2

    @property
    def spans(self) -> int:
        return self.processes * self.workers * self.traces_per_worker * self.SPANS_PER_TRACE

    @property
    def title(self) -> str:
        transport = "OTLP/HTTP" if self.http else "OTLP/gRPC"
        clients = f"{self.processes} processes" if self.processes > 1 else f"{self.workers} workers"
        return f"telemetrygen {transport}, {clients}, batch {self.batch_size}"

    def prepare(self, port: int, http_port: int) -> Callable[[], None]:
        """Return the timed part: run the clients and wait until they have sent it all."""
        argv = [
            str(telemetrygen_binary()), "traces",
            "--otlp-endpoint", f"127.0.0.1:{http_port if self.http else port}",
            "--otlp-insecure", "--rate", "0", "--child-spans", "1",
            "--workers", str(self.workers), "--traces", str(self.traces_per_worker),
            "--batch-size", str(self.batch_size), "--timeout", "60s",
        ]  # fmt: skip
        if self.http:
            argv.append("--otlp-http")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["OTEL_BSP_MAX_QUEUE_SIZE"] = str(self.spans // self.processes)

        def go() -> None:
            with tempfile.TemporaryFile() as log:
                procs = [
                    subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
                    for _ in range(self.processes)
                ]
                codes = [proc.wait() for proc in procs]
                if any(codes):
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"telemetrygen exited with {codes}:\n{tail}")

        return go


@dataclass
class Run:
    rate: float
    cpu: float
    sent: int
    received: int
    #: With ``--threads``, the otel-dl collector's CPU-s per 100k spans by thread.
    threads: dict[str, float] = field(default_factory=dict)


def _thread_cpu() -> dict[str, float]:
    """The thread probe's last figures (see probes/thread_cpu.py), or none."""
    try:
        return json.loads(Path(THREAD_CPU_FILE).read_text()) if THREAD_CPU_FILE else {}
    except (OSError, ValueError):
        return {}


def _span_count(payload: bytes) -> int:
    request = ExportTraceServiceRequest.FromString(payload)
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def run_once(name: str, load: Preserialised | Telemetrygen, warmup: bytes, wait: float) -> Run:
    """One run of ``load`` through pipeline ``name``, after one warm-up request."""
    sink = OtlpSink(keep=False).start()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="otel-dl-bench-") as tmp:
        proc = PIPELINES[name](port, http_port, sink.port, wait, tmp)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            _wait_listening(port, proc)
            _wait_listening(http_port, proc)
            grpc.channel_ready_future(channel).result(timeout=60)
            _send_with_retry(channel.unary_unary(EXPORT), warmup)
            # The pipeline may forward the warm-up in several batches: wait for all of it.
            warmup_spans = _span_count(warmup)
            deadline = time.monotonic() + 60
            while sink.spans < warmup_spans and time.monotonic() < deadline:
                time.sleep(0.01)
            before = sink.spans
            go = load.prepare(port, http_port)
            if name == "otel-dl collector" and THREAD_CPU_FILE:
                time.sleep(0.5)  # the probe's figures after the warm-up
            threads0 = _thread_cpu() if name == "otel-dl collector" else {}
            cpu0 = _cpu_seconds(proc.pid)
            start = time.monotonic()
            go()
            expected = before + load.spans
            seen, last_progress = sink.spans, time.monotonic()
            while sink.spans < expected and time.monotonic() - last_progress < STALL_SECONDS:
                time.sleep(0.005)
                if sink.spans != seen:
                    seen, last_progress = sink.spans, time.monotonic()
            with sink.lock:
                received = sink.spans - before
                elapsed = sink.arrivals[-1] - start
            cpu = _cpu_seconds(proc.pid) - cpu0
            if threads0:
                time.sleep(0.5)  # the probe's figures after the last span
            threads1 = _thread_cpu() if threads0 else {}
        finally:
            channel.close()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            sink.stop()
    per_thread = {
        thread: (seconds - threads0.get(thread, 0.0)) / received * 100_000
        for thread, seconds in threads1.items()
        if thread != "thread-cpu probe"
    }
    return Run(received / elapsed, cpu / received * 100_000, load.spans, received, per_thread)


def _loads(
    args: argparse.Namespace, payloads: list[bytes]
) -> dict[str, Preserialised | Telemetrygen]:
    # 2-span traces: telemetrygen's --traces counts traces per worker.
    per_worker = args.telemetrygen_spans // 4 // Telemetrygen.SPANS_PER_TRACE
    per_process = args.telemetrygen_spans * 2 // 16 // Telemetrygen.SPANS_PER_TRACE
    return {
        "preserialised": Preserialised(payloads[1:], args.connections, (args.requests - 1) * 500),
        "tg-grpc": Telemetrygen(processes=1, workers=4, traces_per_worker=per_worker),
        "tg-http": Telemetrygen(processes=1, workers=4, traces_per_worker=per_worker, http=True),
        "tg-procs": Telemetrygen(
            processes=16, workers=1, traces_per_worker=per_process, batch_size=2048
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of the harness (about 10k spans a load, 1 repeat, decision wait "
        "0.25 s); its rates mean nothing: tail_sampling decides on a 1-s tick",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=201, help="requests of 500 spans")
    parser.add_argument(
        "--telemetrygen-spans",
        type=int,
        default=200_000,
        help="spans of the 4-worker telemetrygen loads (the 16-process load sends twice this)",
    )
    parser.add_argument(
        "--decision-wait", type=float, default=None, help="seconds (default 1; --quick: 0.25)"
    )
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--loads",
        help="comma-separated loads to run (default: all; --quick: every load but tg-grpc, "
        "which differs from tg-http only in its transport)",
    )
    parser.add_argument(
        "--pipelines",
        help=f"comma-separated pipelines to run (default: all of {', '.join(SHORT)}); the "
        "ratio columns need jaeger",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="also report the otel-dl collector's CPU per 100k spans by thread (read from "
        "/proc by a probe in the collector process, Linux only)",
    )
    args = parser.parse_args()
    if args.threads:
        global THREAD_CPU_FILE
        THREAD_CPU_FILE = str(Path(tempfile.mkdtemp(prefix="otel-dl-threads-")) / "cpu.json")
    if args.quick:
        args.requests, args.telemetrygen_spans, args.repeats = 21, 8_000, 1
        if args.decision_wait is None:
            args.decision_wait = 0.25
        if args.loads is None:
            args.loads = "preserialised,tg-http,tg-procs"
    if args.decision_wait is None:
        args.decision_wait = 1.0
    payloads = preserialised_requests(args.requests, 100, seed=1)
    warmup = payloads[0]  # its traces are not in the load
    every = _loads(args, payloads)
    chosen = [key.strip() for key in (args.loads or ",".join(every)).split(",") if key.strip()]
    unknown = [key for key in chosen if key not in every]
    if unknown:
        parser.error(f"unknown load(s) {', '.join(unknown)}; choose from {', '.join(every)}")
    loads = {key: every[key] for key in chosen}
    picked = [key.strip() for key in (args.pipelines or ",".join(SHORT)).split(",") if key]
    unknown = [key for key in picked if key not in SHORT]
    if unknown:
        parser.error(f"unknown pipeline(s) {', '.join(unknown)}; choose from {', '.join(SHORT)}")
    chosen_pipelines = [SHORT[key] for key in picked]
    results: dict[str, dict[str, list[Run]]] = {
        key: {name: [] for name in chosen_pipelines} for key in loads
    }
    for repeat in range(args.repeats):
        for key, load in loads.items():
            for name in chosen_pipelines:
                run = run_once(name, load, warmup, args.decision_wait)
                results[key][name].append(run)
                print(
                    f"repeat {repeat + 1}: {key:<13} {name:<30} {run.rate:>9,.0f} spans/s "
                    f"{run.cpu:>6.2f} CPU-s/100k  {run.received:,}/{run.sent:,} spans at the sink",
                    flush=True,
                )
    short = []
    for key, load in loads.items():
        print(
            f"\n## {load.title}: {load.spans:,} spans per run, decision wait "
            f"{args.decision_wait:g} s, medians of {args.repeats}\n"
        )
        medians = {
            name: (statistics.median(r.rate for r in runs), statistics.median(r.cpu for r in runs))
            for name, runs in results[key].items()
        }
        # Without Jaeger in the run, the ratios are left out.
        ref_rate, ref_cpu = medians.get(JAEGER, (float("nan"), float("nan")))
        print(
            f"| {'pipeline':<30} | {'spans/s':>9} | {'CPU-s per 100k spans':>20} "
            f"| {'rate vs Jaeger':>14} | {'CPU vs Jaeger':>13} | {'sent → at sink':>25} |"
        )
        print(f"|{'-' * 32}|{'-' * 11}|{'-' * 22}|{'-' * 16}|{'-' * 15}|{'-' * 27}|")
        for name, (rate, cpu) in medians.items():
            received = sorted({r.received for r in results[key][name]})
            arrived = f"{load.spans:,} → " + "/".join(f"{n:,}" for n in received)
            print(
                f"| {name:<30} | {rate:>9,.0f} | {cpu:>20.2f} | {rate / ref_rate:>13.2f}x "
                f"| {cpu / ref_cpu:>12.2f}x | {arrived:>25} |"
            )
            if received != [load.spans]:
                short.append(f"{key} via {name}: {arrived} spans")
        threads = [r.threads for r in results[key].get("otel-dl collector", []) if r.threads]
        if threads:
            print("\notel-dl collector by thread, CPU-s per 100k spans (median of the runs):\n")
            names = sorted({n for t in threads for n in t}, key=lambda n: -threads[0].get(n, 0))
            for thread in names:
                median = statistics.median(t.get(thread, 0.0) for t in threads)
                print(f"- {thread}: {median:.2f}")
    if short:
        print("\nSpans lost or duplicated (rates count what arrived):", *short, sep="\n- ")
        sys.exit(1)


if __name__ == "__main__":
    main()

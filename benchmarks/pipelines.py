"""Side by side: the otel-dl collector and Jaeger v2's own trace-grouping pipeline.

Run ``python benchmarks/pipelines.py`` (``--quick`` for a smoke run). The same
pre-serialised OTLP/gRPC load (``tests.faultsim.preserialised_requests``: 5-span traces over
three services) is sent, in the same run, to three pipelines, each its own process
forwarding over OTLP/gRPC to the same in-process sink:

- **otel-dl**: ``python -m otel_dl.collector`` with its defaults (fsync'd journal, disk
  export queue, attribution of every trace) and no store (``--store none``);
- **Jaeger v2**: Jaeger v2 configured as a pure pipeline: otlp receiver →
  ``tail_sampling`` (always_sample) → batch → otlp exporter;
- **OTel Collector**: the same pipeline in the small OpenTelemetry Collector built from
  ``examples/deploy/otelcol/builder.yaml`` (a newer ``tail_sampling``).

All three wait the same ``--decision-wait`` before deciding a trace (otel-dl may decide
earlier once a trace's root has ended: ``early_grace``, 0.5 s by default). For each
pipeline: spans/s end to end (first request sent → last span at the sink) and the
pipeline process's CPU-seconds per 100k spans (user + system from /proc), medians of
``--repeats`` runs interleaved, and the ratios to Jaeger. The sender and the sink run in
this process and share the machine with the pipeline, as they would on one host.

The Go binaries come from ``tests.e2e.binaries`` (built and cached in
``~/.cache/otel-dl/bin`` by ``python -m tests.e2e.binaries``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.binaries import free_port, jaeger_binary, otelcol_binary
from tests.faultsim import preserialised_requests, start_sink

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

TAIL_SAMPLING = """
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{port}
        max_recv_msg_size_mib: 64
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
  otlp:
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
      exporters: [otlp]
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def _otel_dl(port: int, sink: int, wait: float, tmp: str) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "otel_dl.collector", "--grpc-port", str(port),
        "--http-port", "0", "--api-port", "0", "--store", "none",
        "--decision-wait", str(wait), "--export-endpoint", f"127.0.0.1:{sink}",
        "--log-level", "WARNING",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OTEL_DL_COLLECTOR_QUEUE_DIR": f"{tmp}/queue",
        "OTEL_DL_COLLECTOR_MAX_SPANS": "2000000",
    }
    return subprocess.Popen(argv, env=env, start_new_session=True)


def _tail_sampling(binary: Callable[[], Path]) -> Callable[..., subprocess.Popen[bytes]]:
    def start(port: int, sink: int, wait: float, tmp: str) -> subprocess.Popen[bytes]:
        config = Path(tmp) / "config.yaml"
        config.write_text(TAIL_SAMPLING.format(port=port, sink=sink, wait=wait))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        log = open(Path(tmp) / "pipeline.log", "wb")  # noqa: SIM115 - lives with the process
        return subprocess.Popen(
            [str(binary()), f"--config={config}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    return start


PIPELINES: dict[str, Callable[..., subprocess.Popen[bytes]]] = {
    "otel-dl collector": _otel_dl,
    "Jaeger v2 tail_sampling": _tail_sampling(jaeger_binary),
    "OTel Collector tail_sampling": _tail_sampling(otelcol_binary),
}


def run_once(
    name: str, payloads: list[bytes], spans_each: int, wait: float, connections: int
) -> tuple[float, float]:
    """One run: (spans/s end to end, CPU-seconds of the pipeline process)."""
    sink, sink_server, sink_port = start_sink(keep=False)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="otel-dl-bench-") as tmp:
        proc = PIPELINES[name](port, sink_port, wait, tmp)
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(connections)]
        try:
            for ch in channels:
                grpc.channel_ready_future(ch).result(timeout=60)
            calls = [ch.unary_unary(EXPORT) for ch in channels]

            def send(i: int) -> None:
                while True:
                    try:
                        calls[i % connections](payloads[i], timeout=60)
                        return
                    except grpc.RpcError as exc:
                        if exc.code() not in RETRYABLE:
                            raise
                        time.sleep(0.05)

            send(0)  # warm up: one request through the whole pipeline
            deadline = time.monotonic() + 60
            while sink.spans < spans_each and time.monotonic() < deadline:
                time.sleep(0.01)
            expected = sink.spans + (len(payloads) - 1) * spans_each
            cpu0 = _cpu_seconds(proc.pid)
            start = time.monotonic()
            with futures.ThreadPoolExecutor(connections) as pool:
                list(pool.map(send, range(1, len(payloads))))
            deadline = time.monotonic() + 300
            while sink.spans < expected and time.monotonic() < deadline:
                time.sleep(0.005)
            elapsed = time.monotonic() - start
            cpu = _cpu_seconds(proc.pid) - cpu0
            if sink.spans < expected:
                raise RuntimeError(f"{name}: {sink.spans}/{expected} spans reached the sink")
        finally:
            for ch in channels:
                ch.close()
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            sink_server.stop(None)
    sent = (len(payloads) - 1) * spans_each
    return sent / elapsed, cpu / sent * 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10k spans, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=201, help="requests of 500 spans")
    parser.add_argument("--decision-wait", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats = 21, 1
    traces_per_request = 100
    payloads = preserialised_requests(args.requests, traces_per_request, seed=1)
    spans_each = traces_per_request * 5
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in PIPELINES}
    for repeat in range(args.repeats):
        for name in PIPELINES:
            rate, cpu = run_once(name, payloads, spans_each, args.decision_wait, args.connections)
            results[name].append((rate, cpu))
            print(f"repeat {repeat + 1}: {name:<30} {rate:>9,.0f} spans/s {cpu:>7.2f} CPU-s/100k")
    spans = (args.requests - 1) * spans_each
    print(
        f"\n## Side by side ({spans:,} spans per run in {args.requests - 1} requests, "
        f"{args.connections} connections, decision wait {args.decision_wait:g} s, "
        f"medians of {args.repeats})\n"
    )
    medians = {
        name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in results.items()
    }
    ref_rate, ref_cpu = medians["Jaeger v2 tail_sampling"]
    print(
        f"| {'pipeline':<30} | {'spans/s':>9} | {'CPU-s per 100k spans':>20} "
        f"| {'rate vs Jaeger':>14} | {'CPU vs Jaeger':>13} |"
    )
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 22}|{'-' * 16}|{'-' * 15}|")
    for name, (rate, cpu) in medians.items():
        print(
            f"| {name:<30} | {rate:>9,.0f} | {cpu:>20.2f} | {rate / ref_rate:>13.2f}x "
            f"| {cpu / ref_cpu:>12.2f}x |"
        )


if __name__ == "__main__":
    main()

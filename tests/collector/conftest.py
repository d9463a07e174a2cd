"""Fixtures and helpers for the collector tests: a real OTLP sink (the ``sink`` fixture,
an :class:`tests.otlp_sink.OtlpSink`), collectors on ephemeral ports (in-process, or the
CLI as a child process), real OpenTelemetry SDK tracer providers exporting to them over
loopback, and concurrent senders of raw OTLP requests that count what the collector
acknowledged.

The reliability tests (tests/reliability/test_collector_*.py) import the helpers
(:class:`CollectorProcess`, :class:`Traffic`, :func:`time_until`) and use them, and
``OtlpSink``, as context managers, which stop every server, process and thread on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
import requests
import yaml
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from otel_dl import semconv
from otel_dl.collector.config import load_config
from otel_dl.collector.pipeline import Collector
from tests.otlp_sink import OtlpSink

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, every: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout:g} s")


def time_until(predicate: Callable[[], Any], timeout: float, every: float = 0.1) -> float | None:
    """Seconds until ``predicate`` held, polling it; None when it did not in ``timeout``.

    For figures such as a drain time, where not holding is a finding to record rather
    than an immediate failure."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(every)


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    return wait_until


@pytest.fixture
def sink() -> Iterator[tuple[OtlpSink, int]]:
    """An OTLP/gRPC backend for a collector to export to: ``(sink, port)``."""
    with OtlpSink() as backend:
        yield backend, backend.port


@pytest.fixture
def make_collector(tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    started: list[Collector] = []

    def make(**flags: Any) -> Collector:
        values = {
            "grpc_port": 0,
            "http_port": 0,
            "api_port": 0,
            "decision_wait": 0.3,
            "early_grace": 0.05,
            "store": str(tmp_path / "faults.sqlite"),
            "queue_dir": str(tmp_path / "queue"),
            "min_baseline_samples": 5,
            **flags,
        }
        collector = Collector(load_config(flags=values))
        collector.start()
        started.append(collector)
        return collector

    yield make
    for collector in started:
        if collector._decider.is_alive():
            collector.stop()


@pytest.fixture
def make_provider() -> Iterator[Callable[..., TracerProvider]]:
    providers: list[TracerProvider] = []

    def make(service: str, endpoint: str, protocol: str = "grpc") -> TracerProvider:
        if protocol == "grpc":
            exporter: Any = GrpcExporter(endpoint=endpoint, insecure=True)
        else:
            exporter = HttpExporter(endpoint=endpoint)
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        provider.shutdown()


# --- the collector CLI as a child process ---------------------------------------------------
Labels = frozenset[tuple[str, str]]


def prometheus_samples(api: str) -> dict[tuple[str, Labels], float]:
    """Every sample the collector API at ``api`` (``http://host:port``) serves on
    ``/metrics``, parsed by prometheus_client: ``(sample name, labels) -> value``."""
    text = requests.get(f"{api}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


_LISTENING = re.compile(r"listening on \S+: OTLP/gRPC (\d+), OTLP/HTTP (\d+), API (\d+)")


class CollectorProcess:
    """``python -m otel_dl.collector`` in its own process group, with a data directory.

    The configuration is written to ``<data_dir>/collector.yaml`` (queue and store
    inside the directory, ports 0); the ports picked at the first start are given as
    flags to every later start, so a restart listens where senders already send::

        with CollectorProcess(tmp_path / "data", export_endpoint="127.0.0.1:4317") as c:
            c.start()
            c.otlp_grpc         # "127.0.0.1:port"
            c.metric("otel_dl_collector_spans_received_total")
            c.series("otel_dl_collector_faults_total")   # {labels: value}
            c.kill()            # SIGKILL to the whole process group
            c.start()           # same data directory, same ports
            assert c.stop() == 0

    Leaving the ``with`` block kills the process group if it is still running.
    """

    def __init__(self, data_dir: Path, **config: Any) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir = self.dir / "queue"
        values = {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "api_port": 0,
            "queue_dir": str(self.queue_dir),
            "store": str(self.dir / "faults.sqlite"),
            **config,
        }
        self.config_path = self.dir / "collector.yaml"
        self.config_path.write_text(yaml.safe_dump(values), encoding="utf-8")
        self.log_path = self.dir / "collector.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = self.http_port = self.api_port = 0
        self.starts = 0
        self.start_log = ""  # what the last start logged until it listened

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait until it listens; return the seconds that took."""
        argv = [sys.executable, "-m", "otel_dl.collector", "--config", str(self.config_path)]
        if self.grpc_port:
            argv += ["--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port)]
            argv += ["--api-port", str(self.api_port)]
        # Its configuration is the file and the flags alone: no OTEL_* from the tests' own.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = started + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                self.start_log = fh.read().decode(errors="replace")
            found = _LISTENING.search(self.start_log)
            if found:
                self.grpc_port, self.http_port, self.api_port = map(int, found.groups())
                return time.monotonic() - started
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        raise AssertionError(f"collector did not start; log tail:\n{self.log_tail()}")

    @property
    def otlp_grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group (kill -9), and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for a clean exit, return the exit status (kill on timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"collector did not stop in {timeout:g} s") from None

    def close(self) -> None:
        if self.running:
            self.kill()

    def __enter__(self) -> CollectorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def memory(self) -> tuple[int, int]:
        """``(RSS, peak RSS)`` of the running process, in bytes (VmRSS, VmHWM)."""
        assert self.proc is not None
        values = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the running process has used."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        """The collector's Prometheus metrics: each sample under its full name
        (``name{a="x",b="y"}``, labels in name order), and labelled samples also summed
        under their bare name."""
        out: dict[str, float] = {}
        for (name, labels), value in prometheus_samples(self.api).items():
            if labels:
                inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels))
                out[f"{name}{{{inner}}}"] = value
            out[name] = out.get(name, 0.0) + value
        return out

    def series(self, name: str) -> dict[Labels, float]:
        """The samples named ``name`` (``..._faults_total``), by their labels."""
        return {
            labels: value
            for (sample, labels), value in prometheus_samples(self.api).items()
            if sample == name
        }

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample, e.g. ``..._spans_received_total``."""
        try:
            return self.series(name)[frozenset()]
        except KeyError:
            raise KeyError(name) from None

    def disk_bytes(self) -> int:
        """Bytes of the journal and export-queue files on disk."""
        if not self.queue_dir.exists():
            return 0
        total = 0
        for path in self.queue_dir.rglob("*.log"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total


# --- senders of raw OTLP requests -------------------------------------------------------------
# One trace: 5 spans over 3 services, root first, like an inference request.
_TRACE = (
    ("gateway", "predict", None),
    ("preprocess", "transform", 0),
    ("inference", "inference", 0),
    ("inference", "tokenize", 2),
    ("inference", "forward", 2),
)
SPANS_PER_TRACE = len(_TRACE)


def trace_id(sender: int, seq: int, trace: int) -> bytes:
    return sender.to_bytes(4, "big") + seq.to_bytes(8, "big") + trace.to_bytes(4, "big")


def span_keys(sender: int, seq: int, traces: int) -> Iterator[bytes]:
    """``trace_id + span_id`` of every span in request ``seq`` of ``sender``."""
    for t in range(traces):
        tid = trace_id(sender, seq, t)
        for i in range(SPANS_PER_TRACE):
            yield tid + (i + 1).to_bytes(8, "big")


def _build_request(sender: int, seq: bytes, traces: int) -> bytes:
    req = ExportTraceServiceRequest()
    groups = {}
    for service in ("gateway", "preprocess", "inference"):
        rs = req.resource_spans.add()
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", service
        groups[service] = rs.scope_spans.add().spans
    base = time.time_ns()
    for t in range(traces):
        tid = sender.to_bytes(4, "big") + seq + t.to_bytes(4, "big")
        for i, (service, name, parent) in enumerate(_TRACE):
            span = groups[service].add(
                trace_id=tid,
                span_id=(i + 1).to_bytes(8, "big"),
                name=name,
                start_time_unix_nano=base + i * 1000,
                end_time_unix_nano=base + 2_000_000 - i * 1000,
            )
            if parent is not None:
                span.parent_span_id = (parent + 1).to_bytes(8, "big")
            kv = span.attributes.add()
            if service == "inference":
                kv.key, kv.value.double_value = semconv.DL_CONFIDENCE_MEAN, 0.9
            else:
                kv.key, kv.value.string_value = semconv.DL_STAGE, semconv.STAGE_PREPROCESS
    return req.SerializeToString()


_SEQ_MARK = b"\xa5\x5a" * 4  # no request number has these 8 bytes
_templates: dict[tuple[int, int], bytes] = {}


def span_request(sender: int, seq: int, traces: int) -> bytes:
    """A serialized OTLP request of ``traces`` whole traces with ids unique to
    ``(sender, seq)``, carrying the ``dl.*`` attributes the catalog reads.

    Built once per sender as a template whose trace ids hold a marker in place of
    ``seq``, then copied with the marker replaced: cheap enough for senders to offer
    tens of thousands of spans a second from one process.
    """
    template = _templates.get((sender, traces))
    if template is None:
        template = _templates[(sender, traces)] = _build_request(sender, _SEQ_MARK, traces)
    prefix = sender.to_bytes(4, "big")
    return template.replace(prefix + _SEQ_MARK, prefix + seq.to_bytes(8, "big"))


OK = "accepted"
BACKPRESSURE = "back-pressure"  # HTTP 429/503, gRPC RESOURCE_EXHAUSTED
NO_CONNECTION = "connection refused or lost"  # the collector is down, or was killed
TIMEOUT = "timeout"
TOO_MANY_IN_FLIGHT = "not sent (the client's in-flight limit)"
_TIMEOUT_SECONDS = 10.0
_PROTOBUF = {"Content-Type": "application/x-protobuf"}


@dataclass
class Tally:
    """What one sender sent and how it was answered.

    ``acked`` lists ``(seq, spans acknowledged)``: the request's spans minus the
    partial-success ``rejected_spans``. ``answers`` counts ``(phase, answer)``.
    """

    index: int
    protocol: str
    acked: list[tuple[int, int]] = field(default_factory=list)
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejected: int = 0
    sent: int = 0  # request numbers used, 0 .. sent - 1
    no_retry_hint: int = 0  # back-pressure without Retry-After / RetryInfo


def _grpc_answer(code: grpc.StatusCode, trailers: Any) -> tuple[str, float, bool]:
    """``(answer, retry delay, whether back-pressure came without a retry hint)``."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        delay = retry_delay(trailers)
        return BACKPRESSURE, delay, delay == 0
    if code == grpc.StatusCode.UNAVAILABLE:
        # The collector refuses with RESOURCE_EXHAUSTED; UNAVAILABLE is grpc's answer
        # when nothing listens or the connection broke.
        return NO_CONNECTION, 0.0, False
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TIMEOUT, 0.0, False
    return f"gRPC {code.name}", 0.0, False


def _http_answer(status: int, retry_after: str | None) -> tuple[str, float, bool]:
    if status in (429, 503):
        return BACKPRESSURE, float(retry_after or 0), retry_after is None
    return f"HTTP {status}", 0.0, False


def retry_delay(trailers: Any) -> float:
    """The RetryInfo delay in a gRPC error's status details, or 0."""
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return 0.0


class _ClosedLoopSender(threading.Thread):
    """Sends the next request once the last was answered; a request that was not
    acknowledged is sent again after ``Retry-After`` (or 0.1 s), so in the end every
    request is acknowledged once."""

    def __init__(self, traffic: Traffic, tally: Tally, port: int) -> None:
        super().__init__(name=f"otlp-sender-{tally.index}", daemon=True)
        self.traffic = traffic
        self.tally = tally
        self.port = port
        self._http: http.client.HTTPConnection | None = None
        self._channel: grpc.Channel | None = None
        self._call: Any = None

    def _send_grpc(self, body: bytes) -> tuple[str, float, bool, int]:
        if self._call is None:
            # Reconnect within half a second once a restarted collector listens again.
            self._channel = grpc.insecure_channel(
                f"127.0.0.1:{self.port}",
                options=[
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500),
                ],
            )
            self._call = self._channel.unary_unary(
                EXPORT_METHOD, response_deserializer=ExportTraceServiceResponse.FromString
            )
        try:
            response = self._call(body, timeout=_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            answer = _grpc_answer(exc.code(), exc.trailing_metadata())  # type: ignore[attr-defined]
            return (*answer, 0)
        return OK, 0.0, False, response.partial_success.rejected_spans

    def _send_http(self, body: bytes) -> tuple[str, float, bool, int]:
        for attempt in range(2):
            if self._http is None:
                self._http = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=_TIMEOUT_SECONDS
                )
            try:
                self._http.request("POST", "/v1/traces", body=body, headers=_PROTOBUF)
                resp = self._http.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._http.close()
                self._http = None
                # A kept-alive connection the server had closed gets one fresh try.
                if attempt == 0 and not isinstance(exc, (ConnectionRefusedError, TimeoutError)):
                    continue
                return (TIMEOUT if isinstance(exc, TimeoutError) else NO_CONNECTION), 0, False, 0
            if resp.getheader("Connection", "").lower() == "close":
                self._http.close()
                self._http = None
            if resp.status == 200:
                partial = ExportTraceServiceResponse.FromString(data).partial_success
                return OK, 0.0, False, partial.rejected_spans
            return (*_http_answer(resp.status, resp.getheader("Retry-After")), 0)
        raise AssertionError("unreachable")

    def run(self) -> None:
        traffic, tally = self.traffic, self.tally
        send = self._send_grpc if tally.protocol == "grpc" else self._send_http
        seq = 0
        body = span_request(tally.index, seq, traffic.traces_per_request)
        try:
            while not traffic.stopping.is_set():
                tally.sent = seq + 1
                answer, delay, no_hint, rejected = send(body)
                traffic.count(tally, answer, no_hint, seq, rejected)
                if answer == OK:
                    seq += 1
                    body = span_request(tally.index, seq, traffic.traces_per_request)
                else:
                    traffic.stopping.wait(delay or 0.1)
        finally:
            if self._channel is not None:
                self._channel.close()
            if self._http is not None:
                self._http.close()


class Traffic:
    """Concurrent senders of raw OTLP requests, half OTLP/gRPC and half OTLP/HTTP, to
    one collector, counting every span it acknowledged::

        with Traffic(collector, senders=4, traces_per_request=20) as traffic:
            time.sleep(5)
        assert sink.missing(traffic.acked_keys()) == 0

    Without ``rate``, each sender is a thread in a closed loop (the next request once
    the last is answered; what was not acknowledged is sent again). With ``rate``
    (requests/s, all senders together) the load is offered in an open loop from one
    asyncio thread (grpc.aio and aiohttp): requests go on schedule whatever the answers,
    concurrently, and one that was not acknowledged is not sent again, so the offered
    load stays at ``rate``. Every request times out after 10 s, so at most ``rate`` x
    10 s are in flight; the client holds back (``TOO_MANY_IN_FLIGHT``) only past
    ``max_in_flight``, one second more than that, when its own event loop falls behind.
    ``peak_in_flight`` and ``latencies`` (seconds from send to answer, by answer) say how
    promptly the open loop was answered. ``phase`` labels the answers.
    Leaving the block stops the senders and waits for the requests in flight.
    """

    def __init__(
        self,
        collector: CollectorProcess | Collector,
        senders: int = 4,
        traces_per_request: int = 20,
        rate: float | None = None,
        first_index: int = 1,
    ) -> None:
        self.traces_per_request = traces_per_request
        self.rate = rate
        self.stopping = threading.Event()
        self.phase = "run"
        self.last_ack = 0.0
        self.peak_in_flight = 0
        self.latencies: dict[str, list[float]] = {}
        self.max_in_flight = 0 if rate is None else math.ceil(rate * (_TIMEOUT_SECONDS + 1))
        self._lock = threading.Lock()
        self.tallies = [
            Tally(first_index + i, "grpc" if i % 2 == 0 else "http") for i in range(senders)
        ]
        self._ports = {"grpc": collector.grpc_port, "http": collector.http_port}
        self._threads: list[threading.Thread]
        if rate is None:
            self._threads = [
                _ClosedLoopSender(self, t, self._ports[t.protocol]) for t in self.tallies
            ]
        else:
            self._threads = [
                threading.Thread(target=self._run_open_loop, name="otlp-open-loop", daemon=True)
            ]

    @property
    def spans_per_request(self) -> int:
        return self.traces_per_request * SPANS_PER_TRACE

    def count(self, tally: Tally, answer: str, no_hint: bool, seq: int, rejected: int) -> None:
        with self._lock:
            tally.answers[(self.phase, answer)] += 1
            tally.no_retry_hint += no_hint
            if answer == OK:
                tally.acked.append((seq, self.spans_per_request - rejected))
                tally.rejected += rejected
                self.last_ack = time.monotonic()

    # --- open loop ---------------------------------------------------------------------------
    def _run_open_loop(self) -> None:
        asyncio.run(self._open_loop())

    async def _open_loop(self) -> None:
        assert self.rate is not None
        channels = {
            t.index: grpc.aio.insecure_channel(f"127.0.0.1:{self._ports['grpc']}")
            for t in self.tallies
            if t.protocol == "grpc"
        }
        calls = {
            index: ch.unary_unary(
                EXPORT_METHOD, response_deserializer=ExportTraceServiceResponse.FromString
            )
            for index, ch in channels.items()
        }
        url = f"http://127.0.0.1:{self._ports['http']}/v1/traces"
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT_SECONDS)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def send(tally: Tally, seq: int) -> None:
                body = span_request(tally.index, seq, self.traces_per_request)
                rejected, no_hint = 0, False
                sent_at = time.monotonic()
                try:
                    if tally.protocol == "grpc":
                        response = await calls[tally.index](body, timeout=_TIMEOUT_SECONDS)
                        answer, rejected = OK, response.partial_success.rejected_spans
                    else:
                        async with session.post(url, data=body, headers=_PROTOBUF) as resp:
                            data = await resp.read()
                            if resp.status == 200:
                                partial = ExportTraceServiceResponse.FromString(data)
                                answer = OK
                                rejected = partial.partial_success.rejected_spans
                            else:
                                retry_after = resp.headers.get("Retry-After")
                                answer, _, no_hint = _http_answer(resp.status, retry_after)
                except grpc.aio.AioRpcError as exc:
                    trailers = tuple(exc.trailing_metadata() or ())
                    answer, _, no_hint = _grpc_answer(exc.code(), trailers)
                except asyncio.TimeoutError:
                    answer = TIMEOUT
                except aiohttp.ClientError:
                    answer = NO_CONNECTION
                self.latencies.setdefault(answer, []).append(time.monotonic() - sent_at)
                self.count(tally, answer, no_hint, seq, rejected)

            tasks: set[asyncio.Task[None]] = set()
            start = time.monotonic()
            n = 0
            while not self.stopping.is_set():
                delay = start + n / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tally = self.tallies[n % len(self.tallies)]
                seq, tally.sent = tally.sent, tally.sent + 1
                n += 1
                if len(tasks) >= self.max_in_flight:
                    self.count(tally, TOO_MANY_IN_FLIGHT, False, seq, 0)
                    continue
                task = asyncio.create_task(send(tally, seq))
                tasks.add(task)
                self.peak_in_flight = max(self.peak_in_flight, len(tasks))
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        for ch in channels.values():
            await ch.close()

    # --- lifecycle and figures ---------------------------------------------------------------
    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=_TIMEOUT_SECONDS + 20)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"senders still running: {alive}"

    def acked_spans(self) -> int:
        with self._lock:
            return sum(n for t in self.tallies for _, n in t.acked)

    def acked_requests(self) -> int:
        with self._lock:
            return sum(len(t.acked) for t in self.tallies)

    def offered_requests(self) -> int:
        return sum(t.sent for t in self.tallies)

    def rejected(self) -> int:
        return sum(t.rejected for t in self.tallies)

    def no_retry_hint(self) -> int:
        """Back-pressure answers without Retry-After (HTTP) or RetryInfo (gRPC)."""
        return sum(t.no_retry_hint for t in self.tallies)

    def acked_keys(self) -> Iterator[bytes]:
        """``trace_id + span_id`` of every span the collector acknowledged."""
        with self._lock:
            acked = [(t.index, seq) for t in self.tallies for seq, _ in t.acked]
        for index, seq in acked:
            yield from span_keys(index, seq, self.traces_per_request)

    def sent_keys(self) -> Iterator[bytes]:
        """Every span of every request sent, acknowledged or not."""
        for tally in self.tallies:
            for seq in range(tally.sent):
                yield from span_keys(tally.index, seq, self.traces_per_request)

    def answers(self, phase: str | None = None, protocol: str | None = None) -> Counter[str]:
        out: Counter[str] = Counter()
        with self._lock:
            for tally in self.tallies:
                if protocol is not None and tally.protocol != protocol:
                    continue
                for (p, answer), n in tally.answers.items():
                    if phase is None or p == phase:
                        out[answer] += n
        return out

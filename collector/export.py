"""Export: forward enriched spans from the persistent queue to an OTLP backend.

:func:`queue_item` joins encoded requests into one export-queue record.
:class:`Exporter` is a thread that takes requests from
the :class:`~.diskqueue.ExportQueue` in order, sends each over OTLP/gRPC
(``host:port``) or OTLP/HTTP protobuf (``http(s)://`` URL, ``/v1/traces`` appended when
the URL has no path), and acknowledges it only once the backend accepted it::

    exporter = Exporter("127.0.0.1:4317", queue, metrics, timeout=10, max_backoff=30)
    exporter.start()
    ...
    exporter.stop()

Retryable failures (gRPC UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...;
HTTP 429, 502, 503, 504 or no connection) are retried with exponential backoff and
jitter up to ``max_backoff`` seconds, for as long as it takes: the request stays on
disk meanwhile. While nothing accepts connections at the backend's address, the wait
is cut short as soon as a TCP connection to it succeeds (tried once a second), so
delivery resumes within about a second of the backend's return, not at the end of a
backoff that grew during the outage. A permanent failure (any other status) drops the
request and counts its spans as dropped, as the OTLP specification asks.
"""

from __future__ import annotations

import gzip
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlparse

import grpc
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from .diskqueue import ExportQueue
from .metrics import CollectorMetrics

_log = logging.getLogger(__name__)
_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE_GRPC = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_FIRST_BACKOFF = 0.05
_PROBE_SECONDS = 1.0
# The channel's own reconnect backoff (grpc's default grows to 120 s) must not outlast
# the backend's return once a probe saw it back.
_GRPC_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class _Retryable(Exception):
    """The backend did not take the request this time; try again later.

    ``unreachable``: nothing accepted a connection at the backend's address.
    """

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class _Permanent(Exception):
    """The backend refused the request for good."""


_COUNT = struct.Struct("<I")


def queue_item(spans: int, requests: Iterable[bytes]) -> bytes:
    """The export-queue record of encoded requests holding ``spans`` spans in all: the
    count, then the requests concatenated, which encodes one request holding them all."""
    return _COUNT.pack(spans) + b"".join(requests)


class _GrpcSender:
    def __init__(self, endpoint: str, headers: tuple[tuple[str, str], ...], timeout: float):
        self._channel = grpc.insecure_channel(
            endpoint, options=_GRPC_OPTIONS, compression=grpc.Compression.Gzip
        )
        self._call = self._channel.unary_unary(
            _EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        self._headers = headers
        self._timeout = timeout

    def send(self, payload: bytes) -> int:
        try:
            response = self._call(payload, timeout=self._timeout, metadata=self._headers)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            message = f"gRPC {code.name}: {exc.details()}"  # type: ignore[attr-defined]
            if code in _RETRYABLE_GRPC:
                unreachable = code == grpc.StatusCode.UNAVAILABLE and "connect" in message.lower()
                raise _Retryable(message, unreachable) from exc
            raise _Permanent(message) from exc
        return response.partial_success.rejected_spans

    def close(self) -> None:
        self._channel.close()


class _HttpSender:
    def __init__(self, url: str, headers: tuple[tuple[str, str], ...], timeout: float):
        self._url = url if urlparse(url).path not in ("", "/") else url.rstrip("/") + "/v1/traces"
        self._session = requests.Session()
        self._headers = {
            **dict(headers),
            "Content-Type": "application/x-protobuf",
            "Content-Encoding": "gzip",
        }
        self._timeout = timeout

    def send(self, payload: bytes) -> int:
        try:
            resp = self._session.post(
                self._url,
                data=gzip.compress(payload, 1),
                headers=self._headers,
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            unreachable = isinstance(exc, requests.ConnectionError)
            raise _Retryable(f"HTTP request failed: {exc}", unreachable) from exc
        if resp.status_code in _RETRYABLE_HTTP:
            raise _Retryable(f"HTTP {resp.status_code}")
        if resp.status_code >= 300:
            raise _Permanent(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.content:
            return ExportTraceServiceResponse.FromString(
                resp.content
            ).partial_success.rejected_spans
        return 0


def _address(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of an OTLP/gRPC ``host:port`` or OTLP/HTTP URL endpoint."""
    if endpoint.startswith(("http://", "https://")):
        url = urlparse(endpoint)
        return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _accepts_connections(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=_PROBE_SECONDS):
            return True
    except OSError:
        return False


class Exporter(threading.Thread):
    """Drains the export queue to the backend, in order, with retries."""

    def __init__(
        self,
        endpoint: str,
        queue: ExportQueue,
        metrics: CollectorMetrics,
        headers: tuple[tuple[str, str], ...] = (),
        timeout: float = 10.0,
        max_backoff: float = 30.0,
    ) -> None:
        super().__init__(name="otel-dl-exporter", daemon=True)
        self._queue = queue
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._halt = threading.Event()
        self._address = _address(endpoint)
        if endpoint.startswith(("http://", "https://")):
            self._sender: _GrpcSender | _HttpSender = _HttpSender(endpoint, headers, timeout)
        else:
            self._sender = _GrpcSender(endpoint, headers, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the request in flight; what is left stays on disk for the next run."""
        self._halt.set()
        self.join(timeout)
        if isinstance(self._sender, _GrpcSender):
            self._sender.close()

    def _wait(self, seconds: float, unreachable: bool) -> bool:
        """Wait ``seconds`` before a retry; return True when cut short because the
        backend, unreachable so far, accepts connections again."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._halt.wait(min(left, _PROBE_SECONDS)):
                return False
            if unreachable and _accepts_connections(self._address):
                return True

    def run(self) -> None:
        backoff = _FIRST_BACKOFF
        while not self._halt.is_set():
            item = self._queue.peek(timeout=0.2)
            if item is None:
                continue
            position, item_bytes = item
            (spans,) = _COUNT.unpack_from(item_bytes)
            queued = spans
            payload = item_bytes[_COUNT.size :]
            try:
                rejected = self._sender.send(payload)
            except _Retryable as exc:
                self._metrics.export_retries.inc()
                _log.warning("export failed, retrying in %.2fs: %s", backoff, exc)
                back = self._wait(backoff * (0.5 + random.random()), exc.unreachable)
                backoff = _FIRST_BACKOFF if back else min(self._max_backoff, backoff * 2)
                continue
            except _Permanent as exc:
                _log.error("backend refused %d spans for good, dropping them: %s", spans, exc)
                self._metrics.spans_dropped.inc(spans)
                rejected = 0
                spans = 0
            backoff = _FIRST_BACKOFF
            self._queue.ack(position)
            self._metrics.spans_forwarded.inc(spans - rejected)
            if rejected:
                self._metrics.spans_dropped.inc(rejected)
            self._metrics.spans_queued.dec(queued)

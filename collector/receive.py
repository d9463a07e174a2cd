"""Receive: OTLP/gRPC and OTLP/HTTP (protobuf and JSON, gzip or deflate) into the pipeline.

Both receivers decode a request and hand it to a *sink*, a callable
``sink(request, raw) -> (rejected_spans, error_message)`` (the collector's
``ingest``), which may raise :class:`~.diskqueue.QueueFull` or
:class:`~.decode.PayloadError`. They run requests on worker threads of their own
(:class:`~.admission.TimedExecutor`) and ask a *gate*, ``gate(waited, queued)`` (the
collector's ``admit``), which raises :class:`~.diskqueue.QueueFull` to refuse a request:

- as the request arrives, with how long it would wait for a worker and how many
  requests already wait for a busy one (while memory is above the pace limit, one may
  wait behind the held ones; later ones are refused): on OTLP/gRPC in
  grpc's serving thread, before the request message is read, answering a refusal from
  there; on OTLP/HTTP before the body is read. A refused request costs no worker, no
  read and no decoding;
- when a worker takes it, with how long it waited; while memory in use is above the
  pace limit (:class:`~.admission.MemoryGuard`) the worker holds the request back,
  asking again after every memory sample, until memory falls (at most
  :data:`MAX_HOLD_SECONDS`).

Responses follow the OTLP specification:

- success, with ``partial_success`` (rejected spans and a message) when some spans
  were refused;
- a payload that cannot be decoded: gRPC ``INVALID_ARGUMENT`` / HTTP 400, not retryable;
- back-pressure when the disk queue is full, memory is over its limit or the
  collector is overloaded: gRPC ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` detail,
  HTTP 429 with ``Retry-After``; the sender retries later;
- a request over ``max_request_bytes`` (after decompression): HTTP 413, gRPC
  ``RESOURCE_EXHAUSTED`` without ``RetryInfo`` (so the sender does not retry it);
- on OTLP/HTTP, a ``Content-Encoding`` other than ``gzip``, ``deflate`` or none
  (``identity``): HTTP 415 naming it, before the body is read; a body that does not
  inflate as its encoding says: HTTP 400. The receiver inflates a body itself, at most
  ``max_request_bytes`` plus one byte of it (a gzip bomb is refused at the limit);
- a missing or wrong bearer token (when ``auth_token`` is set): HTTP 401, gRPC
  ``UNAUTHENTICATED``, before the body is decoded.

Payload values never reach the logs: error messages go back to the sender only.

Use :func:`add_grpc_receiver` on a ``grpc.server`` and :func:`http_routes` on an aiohttp
application, run with :data:`HTTP_RUNNER_OPTIONS` (aiohttp's own decompression off).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .admission import TimedExecutor, memory_pressing, wait_for_memory_sample, waited
from .decode import PayloadError
from .diskqueue import QueueFull
from .security import UNAUTHENTICATED_MESSAGE, BearerAuth

Sink = Callable[[ExportTraceServiceRequest, bytes | None], tuple[int, str]]
Gate = Callable[[float, int], None]
RETRY_AFTER_SECONDS = 1
MAX_HOLD_SECONDS = 2.0
# Worker threads of each receiver. The work is Python under one interpreter lock: more
# threads add no throughput, and each busy one delays grpc's serving thread and the
# HTTP event loop (which answer refusals) a switch interval more.
WORKERS = 4
# Calls grpc's core may hold before its one Python serving thread has picked them up.
# Past grpc's own limits (1,000, then at random up to 3,000) it cancels the newest, and
# the client gets CANCELLED, with no retry hint, within milliseconds: at a 3x overload
# that was 4 to 229 of 40,000 requests in most runs, while the serving thread answered
# each call it picked up with RESOURCE_EXHAUSTED and a RetryInfo. These limits leave
# every call to that admission; they still bound calls the serving thread cannot reach.
MAX_PENDING_CALLS = 20_000
GRPC_SERVER_OPTIONS = (
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
)
# Protobuf refuses messages nested deeper than 100; JSON gets the same bound.
MAX_JSON_DEPTH = 100
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# aiohttp's web.AppRunner settings for an application with http_routes: the handler reads
# the body as sent and inflates it itself (aiohttp would inflate it first, and refuse an
# encoding it cannot inflate with a 400 and a traceback before the handler runs).
HTTP_RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False}
_SUPPORTED_ENCODINGS = "use gzip, deflate or none (identity)"


def _hex_ids_to_base64(data: Any) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes.

    Walks iteratively and bounds the depth, so a deeply nested body is refused
    instead of exhausting the stack.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise PayloadError(
                f"JSON nested deeper than {MAX_JSON_DEPTH} levels; OTLP requests are shallow"
            )
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _ID_FIELDS and isinstance(value, str) and value:
                    try:
                        node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                    except ValueError as exc:
                        raise PayloadError(
                            f"field {key} is not hex; OTLP/JSON ids are hex strings"
                        ) from exc
                elif isinstance(value, (dict, list)):
                    stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node if isinstance(item, (dict, list)))


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    """Decode an OTLP/JSON trace request."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not JSON ({exc}); send OTLP/JSON or protobuf") from exc
    except RecursionError as exc:
        raise PayloadError(
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels; OTLP requests are shallow"
        ) from exc
    if not isinstance(data, dict):
        raise PayloadError("OTLP/JSON body must be an object with 'resourceSpans'")
    _hex_ids_to_base64(data)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as exc:
        # The parser's message can quote the offending value; name the field path only.
        raise PayloadError(
            f"not an OTLP/JSON trace request ({type(exc).__name__}: {_field_path(exc)}); "
            "see the OTLP/JSON encoding of ExportTraceServiceRequest"
        ) from exc
    return request


def _field_path(exc: Exception) -> str:
    """The path of the field the parser refused, never its value: json_format nests
    "Failed to parse <field> field: " once per level, and may add " at <path>" with
    indices; the value comes after both."""
    text = str(exc)
    at = _AT_PATH.search(text)
    if at is not None:
        return "field " + at.group(1).rstrip(".")
    fields = _FAILED_FIELD.findall(text)
    return "field " + ".".join(fields) if fields else "invalid field"


_AT_PATH = re.compile(r" at ExportTraceServiceRequest\.((?:\w+(?:\[\d+\])?\.?)+)")
_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field")


def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Decode an OTLP/protobuf trace request."""
    try:
        return ExportTraceServiceRequest.FromString(body)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning subclasses
        raise PayloadError(
            f"body is not an OTLP protobuf ExportTraceServiceRequest: {exc}"
        ) from exc


_RPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    413: code_pb2.INVALID_ARGUMENT,
    415: code_pb2.INVALID_ARGUMENT,
}


def _retry_info_trailer() -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS))
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="collector queue is full, retry later"
    )
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


_RETRY_INFO_TRAILER = _retry_info_trailer()


def _response(rejected: int, message: str) -> ExportTraceServiceResponse:
    response = ExportTraceServiceResponse()
    # rejected 0 with a message is the specification's way to send a warning.
    if rejected or message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    return response


def _open(_waited: float, _queued: int = 0) -> None:
    """A gate that takes every request."""


def _admit(gate: Gate) -> None:
    """On a worker thread: ask ``gate`` with how long the request has waited, and while
    memory in use is above the pace limit (:func:`~.admission.memory_pressing`), hold the
    request back until it falls, asking again after each memory sample: the gate refuses
    it once it has waited ``max_request_wait`` or memory is over its limit. A request is
    held at most :data:`MAX_HOLD_SECONDS`.
    """
    since = time.monotonic() - waited()
    while True:
        held = time.monotonic() - since
        gate(held, 0)
        if held >= MAX_HOLD_SECONDS or not memory_pressing():
            return
        wait_for_memory_sample(MAX_HOLD_SECONDS - held)


class _Inline(ThreadPoolExecutor):
    """Runs a task at once on the thread that submits it: grpc's serving thread, for a
    refusal, which reads nothing and only queues its status to be sent."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


_INLINE = _Inline(max_workers=1)


class _Refuse:
    """A refused gRPC call's behaviour: back-pressure without reading the request."""

    # grpc runs a behaviour on its own pool when it names one: this one on the serving thread.
    experimental_thread_pool = _INLINE

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, _requests: Any, context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata(_RETRY_INFO_TRAILER)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.message)


class _Export:
    """``TraceService/Export`` on a :class:`TimedExecutor` of its own."""

    def __init__(self, sink: Sink, gate: Gate, workers: int) -> None:
        self.sink = sink
        self.gate = gate
        self.experimental_thread_pool = TimedExecutor(workers, "otel-dl-otlp-grpc")

    def __call__(self, body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        try:
            _admit(self.gate)
            rejected, message = self.sink(decode_protobuf(body), body)
        except QueueFull as exc:
            context.set_trailing_metadata(_RETRY_INFO_TRAILER)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later")
        except PayloadError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return _response(rejected, message)


class _TraceService(grpc.GenericRpcHandler):
    """Asks the gate as each call arrives, on grpc's serving thread: a refused call is
    answered there, before its request is read or a worker is taken."""

    def __init__(self, sink: Sink, gate: Gate, workers: int) -> None:
        self.export = _Export(sink, gate, workers)
        self.gate = gate
        self.accept = grpc.unary_unary_rpc_method_handler(
            self.export, response_serializer=ExportTraceServiceResponse.SerializeToString
        )

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != _EXPORT:
            return None
        try:
            pool = self.export.experimental_thread_pool
            self.gate(pool.expected_wait(), pool.backlog)
        except QueueFull as exc:
            return grpc.stream_unary_rpc_method_handler(_Refuse(f"{exc}; retry later"))
        return self.accept


def add_grpc_receiver(
    server: grpc.Server, sink: Sink, gate: Gate = _open, workers: int = WORKERS
) -> None:
    """Register the OTLP ``TraceService/Export`` method on ``server``.

    The request arrives as raw bytes and is decoded here, so undecodable protobuf gets
    ``INVALID_ARGUMENT`` with the cause rather than grpc's generic ``INTERNAL``, and a
    valid request is journaled as received, without a second serialization. Requests
    run on a pool of ``workers`` threads of the receiver's own; the gate is asked as a
    call arrives, with how long it would wait for one of them, and again when it has
    one, with how long it waited.
    """
    server.add_generic_rpc_handlers((_TraceService(sink, gate, workers),))


def _content_coding(header: str) -> str | None:
    """The coding to undo for a ``Content-Encoding`` header: ``"gzip"``, ``"deflate"``,
    ``""`` for none, or None when it names anything else or more than one coding
    (``identity`` is none and may appear in a list)."""
    codings = [c for c in (t.strip().lower() for t in header.split(",")) if c]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return ""
    if len(codings) == 1 and codings[0] in ("gzip", "deflate"):
        return codings[0]
    return None


class _TooLarge(Exception):
    """The body inflates past ``max_request_bytes``."""


def _inflate(body: bytes, coding: str, max_bytes: int) -> bytes:
    """``body`` without its content ``coding`` (``"gzip"``, ``"deflate"`` or ``""``).

    Inflates at most ``max_bytes + 1`` bytes: raises :class:`_TooLarge` past
    ``max_bytes`` (a gzip bomb costs no more memory than the limit), and
    :class:`~.decode.PayloadError` for a corrupt or truncated stream. ``gzip`` may hold
    several members, as the format allows; ``deflate`` is the zlib format (RFC 1950),
    or raw deflate (RFC 1951), which some senders use instead.
    """
    if not coding or not body:
        return body
    out = bytearray()
    data = body
    while data:
        if coding == "gzip":
            wbits = 16 + zlib.MAX_WBITS
        else:  # a zlib header starts with compression method 8 in its low four bits
            wbits = zlib.MAX_WBITS if data[0] & 0x0F == 8 else -zlib.MAX_WBITS
        stream = zlib.decompressobj(wbits)
        try:
            out += stream.decompress(data, max_bytes + 1 - len(out))
        except zlib.error as exc:
            raise PayloadError(
                f"body is not valid {coding} data ({exc}); send it compressed as "
                "Content-Encoding says, or without Content-Encoding"
            ) from exc
        if len(out) > max_bytes:
            raise _TooLarge
        # Under the output limit, the stream took every byte given or it ended.
        if not stream.eof:
            raise PayloadError(
                f"{coding} body is truncated: it ends before its compressed stream does"
            )
        data = stream.unused_data
        if data and coding == "deflate":
            raise PayloadError(
                f"deflate body has {len(data)} bytes after the end of its compressed stream"
            )
    return bytes(out)


def http_routes(
    app: web.Application,
    sink: Sink,
    max_bytes: int,
    auth: BearerAuth | None = None,
    gate: Gate = _open,
    workers: int = WORKERS,
) -> None:
    """Add ``POST /v1/traces`` to an aiohttp application.

    ``max_bytes`` bounds the body as sent and after decompression; give the application
    the same ``client_max_size`` so aiohttp stops reading at that size, and run it with
    :data:`HTTP_RUNNER_OPTIONS`, so that the handler inflates ``gzip`` and ``deflate``
    bodies itself, within ``max_bytes``. Requests are decoded and
    handed to the sink on a pool of ``workers`` threads of the receiver's own (shut down
    with the application); the gate is asked before the body is read, with how long the
    request would wait for one of them, and again when it has one.
    """
    auth = auth or BearerAuth(None)
    pool = TimedExecutor(workers, "otel-dl-otlp-http")

    async def close_pool(_app: web.Application) -> None:
        pool.shutdown(wait=False)

    app.on_cleanup.append(close_pool)

    def respond(
        as_json: bool, response: ExportTraceServiceResponse, status: int = 200
    ) -> web.Response:
        if as_json:
            body = json_format.MessageToJson(response).encode()
            return web.Response(status=status, body=body, content_type=_JSON)
        return web.Response(
            status=status, body=response.SerializeToString(), content_type=_PROTOBUF
        )

    def error(
        as_json: bool, status: int, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        st = status_pb2.Status(code=_RPC_CODES.get(status, code_pb2.UNAVAILABLE), message=message)
        if as_json:
            return web.Response(
                status=status,
                text=json_format.MessageToJson(st),
                content_type=_JSON,
                headers=headers,
            )
        return web.Response(
            status=status, body=st.SerializeToString(), content_type=_PROTOBUF, headers=headers
        )

    def handle_sync(raw: bytes, coding: str, as_json: bool) -> tuple[int, str]:
        _admit(gate)
        body = _inflate(raw, coding, max_bytes)
        if as_json:
            return sink(decode_json(body), None)
        return sink(decode_protobuf(body), body)

    def backpressure(as_json: bool, exc: QueueFull) -> web.Response:
        return error(as_json, 429, f"{exc}; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})

    too_large = (
        f"request body over max_request_bytes ({max_bytes} bytes, after decompression); "
        "send smaller batches or raise max_request_bytes"
    )

    async def traces(request: web.Request) -> web.Response:
        ctype = request.content_type
        as_json = ctype == _JSON
        if not auth.allows(request.headers.get("Authorization")):
            return error(as_json, 401, UNAUTHENTICATED_MESSAGE, {"WWW-Authenticate": "Bearer"})
        if ctype not in (_PROTOBUF, _JSON):
            return web.Response(
                status=415,
                text=f"Content-Type {ctype!r} is not supported; use {_PROTOBUF} or {_JSON}",
            )
        encoding = ", ".join(request.headers.getall("Content-Encoding", []))
        coding = _content_coding(encoding)
        if coding is None:
            return error(
                as_json,
                415,
                f"Content-Encoding {encoding!r} is not supported; {_SUPPORTED_ENCODINGS}",
            )
        if request.content_length is not None and request.content_length > max_bytes:
            return error(as_json, 413, too_large)
        try:
            # Refused before the body is read: nothing spent on it.
            gate(pool.expected_wait(), pool.backlog)
        except QueueFull as exc:
            return backpressure(as_json, exc)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(as_json, 413, too_large)
        loop = asyncio.get_running_loop()
        try:
            # Inflating, decoding and the fsync'd journal write block; keep them off the
            # event loop.
            rejected, message = await loop.run_in_executor(pool, handle_sync, body, coding, as_json)
        except QueueFull as exc:
            return backpressure(as_json, exc)
        except _TooLarge:
            return error(as_json, 413, too_large)
        except PayloadError as exc:
            return error(as_json, 400, str(exc))
        return respond(as_json, _response(rejected, message))

    app.router.add_post("/v1/traces", traces)

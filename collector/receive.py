"""Receive: OTLP/gRPC and OTLP/HTTP (protobuf and JSON, gzip) into the pipeline.

Both receivers decode a request and hand it to a *sink*, a callable
``sink(request, raw) -> (rejected_spans, error_message)`` (the collector's
``ingest``), which may raise :class:`~.diskqueue.QueueFull` or
:class:`~.decode.PayloadError`. Before decoding they ask a *gate*,
``gate(waited)`` (the collector's ``admit``; ``waited`` is how long the request waited
for a worker thread), which raises :class:`~.diskqueue.QueueFull` to refuse it; the
HTTP receiver also asks before it reads the body. Responses follow the OTLP
specification:

- success, with ``partial_success`` (rejected spans and a message) when some spans
  were refused;
- a payload that cannot be decoded: gRPC ``INVALID_ARGUMENT`` / HTTP 400, not retryable;
- back-pressure when the disk queue is full, memory is over its limit or the
  collector is overloaded: gRPC ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` detail,
  HTTP 429 with ``Retry-After``; the sender retries later;
- a request over ``max_request_bytes`` (after decompression): HTTP 413, gRPC
  ``RESOURCE_EXHAUSTED`` without ``RetryInfo`` (so the sender does not retry it);
- a missing or wrong bearer token (when ``auth_token`` is set): HTTP 401, gRPC
  ``UNAUTHENTICATED``, before the body is decoded.

Payload values never reach the logs: error messages go back to the sender only.

Use :func:`add_grpc_receiver` on a ``grpc.server`` and :func:`http_routes` on an aiohttp
application.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
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

from .admission import waited
from .decode import PayloadError
from .diskqueue import QueueFull
from .security import UNAUTHENTICATED_MESSAGE, BearerAuth

Sink = Callable[[ExportTraceServiceRequest, bytes | None], tuple[int, str]]
Gate = Callable[[float], None]
RETRY_AFTER_SECONDS = 1
# Protobuf refuses messages nested deeper than 100; JSON gets the same bound.
MAX_JSON_DEPTH = 100
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


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
    text = str(exc)
    # json_format names the path first ("Failed to parse x field: ..."), values later.
    head = text.split(":", 1)[0]
    return head if len(head) < 200 else "invalid field"


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


def _response(rejected: int, message: str) -> ExportTraceServiceResponse:
    response = ExportTraceServiceResponse()
    # rejected 0 with a message is the specification's way to send a warning.
    if rejected or message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = message
    return response


def _open(_waited: float) -> None:
    """A gate that takes every request."""


def add_grpc_receiver(server: grpc.Server, sink: Sink, gate: Gate = _open) -> None:
    """Register the OTLP ``TraceService/Export`` method on ``server``.

    The request arrives as raw bytes and is decoded here, so undecodable protobuf gets
    ``INVALID_ARGUMENT`` with the cause rather than grpc's generic ``INTERNAL``, and a
    valid request is journaled as received, without a second serialization.
    """

    def export(body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        try:
            gate(waited())
            rejected, message = sink(decode_protobuf(body), body)
        except QueueFull as exc:
            context.set_trailing_metadata(_retry_info_trailer())
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later")
        except PayloadError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return _response(rejected, message)

    handler = grpc.unary_unary_rpc_method_handler(
        export, response_serializer=ExportTraceServiceResponse.SerializeToString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, {"Export": handler}),)
    )


def _supported_encoding(encoding: str) -> bool:
    # aiohttp has already inflated gzip and deflate bodies when the handler reads them.
    return encoding.strip().lower() in ("", "identity", "gzip", "deflate")


def http_routes(
    app: web.Application,
    sink: Sink,
    max_bytes: int,
    auth: BearerAuth | None = None,
    gate: Gate = _open,
) -> None:
    """Add ``POST /v1/traces`` to an aiohttp application.

    ``max_bytes`` bounds the body after decompression; give the application the same
    ``client_max_size`` so aiohttp stops reading at that size.
    """
    auth = auth or BearerAuth(None)

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

    def handle_sync(body: bytes, as_json: bool) -> tuple[int, str]:
        gate(waited())
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
        encoding = request.headers.get("Content-Encoding", "")
        if not _supported_encoding(encoding):
            return error(
                as_json, 415, f"Content-Encoding {encoding!r} is not supported; use gzip or none"
            )
        if request.content_length is not None and request.content_length > max_bytes:
            return error(as_json, 413, too_large)
        try:
            gate(0.0)  # refused before the body is read: no memory spent on it
        except QueueFull as exc:
            return backpressure(as_json, exc)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(as_json, 413, too_large)
        loop = asyncio.get_running_loop()
        try:
            # Decoding and the fsync'd journal write block; keep them off the event loop.
            rejected, message = await loop.run_in_executor(None, handle_sync, body, as_json)
        except QueueFull as exc:
            return backpressure(as_json, exc)
        except PayloadError as exc:
            return error(as_json, 400, str(exc))
        return respond(as_json, _response(rejected, message))

    app.router.add_post("/v1/traces", traces)

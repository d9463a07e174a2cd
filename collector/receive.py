"""Receive: OTLP/gRPC and OTLP/HTTP (protobuf and JSON, gzip) into the pipeline.

Both receivers decode a request and hand it to a *sink*, a callable
``sink(request, raw) -> (rejected_spans, error_message)`` (the collector's
``ingest``), which may raise :class:`~.diskqueue.QueueFull` or
:class:`~.assemble.PayloadError`. Responses follow the OTLP specification:

- success, with ``partial_success`` (rejected spans and a message) when some spans
  were refused;
- a payload that cannot be decoded: gRPC ``INVALID_ARGUMENT`` / HTTP 400, not retryable;
- back-pressure when the disk queue is full: gRPC ``RESOURCE_EXHAUSTED`` with a
  ``RetryInfo`` detail, HTTP 429 with ``Retry-After``; the sender retries later.

Use :func:`add_grpc_receiver` on a ``grpc.server`` and :func:`http_routes` on an aiohttp
application.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from .assemble import PayloadError
from .diskqueue import QueueFull

Sink = Callable[[ExportTraceServiceRequest, bytes | None], tuple[int, str]]
_log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1
_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str) and value:
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError as exc:
                    raise PayloadError(
                        f"field {key} = {value!r} is not hex; OTLP/JSON ids are hex strings"
                    ) from exc
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    """Decode an OTLP/JSON trace request."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not JSON ({exc}); send OTLP/JSON or protobuf") from exc
    if not isinstance(data, dict):
        raise PayloadError("OTLP/JSON body must be an object with 'resourceSpans'")
    _hex_ids_to_base64(data)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise PayloadError(f"not an OTLP/JSON trace request: {exc}") from exc
    return request


def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Decode an OTLP/protobuf trace request."""
    try:
        return ExportTraceServiceRequest.FromString(body)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning subclasses
        raise PayloadError(
            f"body is not an OTLP protobuf ExportTraceServiceRequest: {exc}"
        ) from exc


def _retry_info_trailer() -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS))
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="collector queue is full, retry later"
    )
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def Export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        try:
            rejected, message = self._sink(request, None)
        except QueueFull as exc:
            context.set_trailing_metadata(_retry_info_trailer())
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later")
        except PayloadError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
        return response


def add_grpc_receiver(server: grpc.Server, sink: Sink) -> None:
    """Register the OTLP ``TraceService`` on ``server``."""
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(sink), server)


def _check_encoding(encoding: str) -> None:
    # aiohttp has already inflated gzip and deflate bodies when the handler reads them.
    if encoding.strip().lower() not in ("", "identity", "gzip", "deflate"):
        raise PayloadError(f"Content-Encoding {encoding!r} is not supported; use gzip or none")


def http_routes(app: web.Application, sink: Sink) -> None:
    """Add ``POST /v1/traces`` to an aiohttp application."""

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
        st = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT if status == 400 else code_pb2.UNAVAILABLE,
            message=message,
        )
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

    def handle_sync(body: bytes, encoding: str, as_json: bool) -> tuple[int, str]:
        _check_encoding(encoding)
        raw = body
        if as_json:
            return sink(decode_json(raw), None)
        return sink(decode_protobuf(raw), raw)

    async def traces(request: web.Request) -> web.Response:
        ctype = request.content_type
        if ctype not in (_PROTOBUF, _JSON):
            return web.Response(
                status=415,
                text=f"Content-Type {ctype!r} is not supported; use {_PROTOBUF} or {_JSON}",
            )
        as_json = ctype == _JSON
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        loop = asyncio.get_running_loop()
        try:
            # Decoding and the fsync'd journal write block; keep them off the event loop.
            rejected, message = await loop.run_in_executor(
                None, handle_sync, body, encoding, as_json
            )
        except QueueFull as exc:
            return error(
                as_json, 429, f"{exc}; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)}
            )
        except PayloadError as exc:
            return error(as_json, 400, str(exc))
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
        return respond(as_json, response)

    app.router.add_post("/v1/traces", traces)

"""Malformed input: a seeded fuzz of both receivers through the real servers on loopback.

Every payload is sent to a running collector, over one kept-alive HTTP session
(protobuf and JSON, half of them gzip) and one gRPC channel (some gzip), and its
answer is classified. Each category has the answers it may get; none may get a 5xx or
a gRPC status other than OK / INVALID_ARGUMENT / RESOURCE_EXHAUSTED, and after the
barrage the collector still accepts a valid request on both receivers and its
decision thread is alive. The figures, the per-category table among them, are recorded
for docs/reliability.md (section "collector-fuzz"; ``-s`` prints them).

Hypothesis properties below go straight at the decoders and the attributor, which
must only ever accept or raise ``PayloadError``.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import requests
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from otel_dl.collector.attribute import Attributor
from otel_dl.collector.catalog import load_catalog
from otel_dl.collector.decode import PayloadError, flatten
from otel_dl.collector.receive import decode_json, decode_protobuf
from tests.collector.conftest import time_until
from tests.reliability.findings import record, scale

SEED = 20240909
LIMIT = 64 * 1024  # max_request_bytes of the fuzzed collector, so oversized stays cheap
HTTP_PAYLOADS = int(scale(2000, 5000))
GRPC_PAYLOADS = int(scale(2200, 5500))
EXAMPLES = int(scale(100, 300))
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PB = "application/x-protobuf"
JS = "application/json"
ACCEPTED = frozenset({"ok", "partial", "warn"})
# Known dl.* attributes the shipped catalog reads, with their contract types.
TYPED = {
    "dl.drift.score": "double",
    "dl.confidence.mean": "double",
    "dl.feature.freshness": "double",
    "dl.stage": "string",
    "dl.model.fingerprint": "string",
    "dl.quality.schema_mismatch": "boolean",
}


@dataclass
class Case:
    category: str
    body: bytes  # protobuf bytes, or JSON text for as_json
    as_json: bool
    allowed: frozenset[str]
    rejected: int | None = None  # exact rejected spans expected on acceptance
    ctype: str | None = None  # an HTTP Content-Type other than the encoding's
    encoding: str | None = None  # an HTTP Content-Encoding to claim instead of gzip/none


# --- payload generation -------------------------------------------------------------------
def _ids(rng: random.Random) -> tuple[bytes, bytes]:
    return rng.randbytes(15) + b"\x01", rng.randbytes(7) + b"\x01"


def _span(rng: random.Random, trace_id: bytes, span_id: bytes, parent: bytes = b"") -> Span:
    start = rng.randrange(1, 2**62)
    span = Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=rng.choice(["predict", "feature_store.get", "inference", "load"]),
        start_time_unix_nano=start,
        end_time_unix_nano=start + rng.randrange(0, 10**9),
    )
    kv = span.attributes.add()
    kv.key, kv.value.double_value = "dl.drift.score", rng.random()
    return span


def _request(spans: list[Span], service: str = "fuzz") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", service
    rs.scope_spans.add().spans.extend(spans)
    return req


def _valid(rng: random.Random, n: int | None = None) -> ExportTraceServiceRequest:
    trace_id, root_id = _ids(rng)
    spans = [_span(rng, trace_id, root_id)]
    for _ in range(n if n is not None else rng.randrange(0, 5)):
        spans.append(_span(rng, trace_id, _ids(rng)[1], root_id))
    return _request(spans)


def _to_json(req: ExportTraceServiceRequest) -> dict:
    data = json_format.MessageToDict(req)
    for rs in data.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for sp in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in sp:
                        sp[key] = base64.b64decode(sp[key]).hex()
    return data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def _deep_protobuf(rng: random.Random, depth: int) -> bytes:
    """A span whose attribute value is a kvlist nested ``depth`` levels, built by hand
    (protobuf itself would recurse that deep to serialize it)."""
    value = b"\x0a\x01x"  # AnyValue{string_value: "x"}
    for _ in range(depth):
        kv = _field(0x0A, b"k") + _field(0x12, value)  # KeyValue{key, value}
        value = _field(0x32, _field(0x0A, kv))  # AnyValue{kvlist_value{values: [kv]}}
    trace_id, span_id = _ids(rng)
    span = Span(trace_id=trace_id, span_id=span_id, name="deep").SerializeToString()
    span += _field(0x4A, _field(0x0A, b"a") + _field(0x12, value))  # attributes
    return _field(0x0A, _field(0x12, _field(0x12, span)))  # request.resource_spans


def _deep_json(rng: random.Random, depth: int) -> bytes:
    if rng.random() < 0.5:
        return ("[" * depth + "]" * depth).encode()
    value = '{"stringValue": "x"}'
    for _ in range(depth):
        value = '{"kvlistValue": {"values": [{"key": "k", "value": ' + value + "}]}}"
    trace_id, span_id = _ids(rng)
    span = (
        f'{{"traceId": "{trace_id.hex()}", "spanId": "{span_id.hex()}", "name": "deep", '
        f'"attributes": [{{"key": "a", "value": {value}}}]}}'
    )
    return ('{"resourceSpans": [{"scopeSpans": [{"spans": [' + span + "]}]}]}").encode()


def _bad_ids(rng: random.Random, as_json: bool) -> Case:
    trace_id, root_id = _ids(rng)
    spans = [_span(rng, trace_id, root_id)]
    bad = rng.randrange(1, 4)
    for _ in range(bad):
        which = rng.randrange(7)
        t, s = _ids(rng)
        p = b""
        if which == 0:
            t = rng.randbytes(rng.choice([0, 1, 8, 15, 17, 32]))
        elif which == 1:
            t = bytes(16)
        elif which == 2:
            s = rng.randbytes(rng.choice([0, 1, 4, 7, 9, 16]))
        elif which == 3:
            s = bytes(8)
        elif which == 4:
            p = rng.randbytes(rng.choice([1, 4, 7, 9, 16]))
        elif which == 5:
            p = bytes(8)
        else:
            t, s = b"", b""
        spans.append(_span(rng, t, s, p))
    rng.shuffle(spans)
    req = _request(spans)
    body = json.dumps(_to_json(req)).encode() if as_json else req.SerializeToString()
    return Case("invalid ids", body, as_json, frozenset({"partial"}), rejected=bad)


def _graph(rng: random.Random, as_json: bool) -> Case:
    """Duplicate ids, parent cycles and clock skew: valid OTLP, accepted and decided."""
    trace_id, a = _ids(rng)
    b, c = _ids(rng)[1], _ids(rng)[1]
    kind = rng.randrange(5)
    if kind == 0:  # duplicates: the same span twice, and a span id reused across traces
        first = _span(rng, trace_id, a)
        spans = [first, first, _span(rng, _ids(rng)[0], a)]
        category = "duplicate ids"
    elif kind == 1:  # a → b → c → a
        spans = [_span(rng, trace_id, a, c), _span(rng, trace_id, b, a), _span(rng, trace_id, c, b)]
        category = "parent cycle"
    elif kind == 2:  # a span that is its own parent, beside a root
        spans = [_span(rng, trace_id, a), _span(rng, trace_id, b, b)]
        category = "parent cycle"
    else:  # end before start, zero and far-future times
        spans = [_span(rng, trace_id, a), _span(rng, trace_id, b, a)]
        for span in spans:
            span.start_time_unix_nano = rng.choice([0, 2**64 - 1, 10**9, 4 * 10**18])
            before = max(0, span.start_time_unix_nano - 1)
            span.end_time_unix_nano = rng.choice([0, 1, 2**64 - 1, before])
        category = "clock skew"
    req = _request(spans)
    body = json.dumps(_to_json(req)).encode() if as_json else req.SerializeToString()
    return Case(category, body, as_json, frozenset({"ok"}), rejected=0)


def _mistyped(rng: random.Random, as_json: bool) -> Case:
    req = _valid(rng, 1)
    span = req.resource_spans[0].scope_spans[0].spans[1]
    key = rng.choice(sorted(TYPED))
    kv = span.attributes.add()
    kv.key = key
    choice = rng.randrange(4)
    if choice == 0:
        kv.value.kvlist_value.values.add(key="x").value.string_value = "y"
    elif choice == 1:
        kv.value.array_value.values.add().int_value = 3
    elif choice == 2:
        kv.value.bytes_value = rng.randbytes(8)
    elif TYPED[key] == "string":
        kv.value.double_value = 1.5
    else:
        kv.value.string_value = "not-a-number"
    body = json.dumps(_to_json(req)).encode() if as_json else req.SerializeToString()
    return Case("unknown dl.* value type", body, as_json, frozenset({"warn"}), rejected=0)


def _malformed_protobuf(rng: random.Random) -> Case:
    valid = _valid(rng).SerializeToString()
    how = rng.randrange(3)
    if how == 0:
        body = rng.randbytes(rng.randrange(1, 512))
    elif how == 1:
        body = valid[: rng.randrange(1, len(valid))]
    else:
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        body = bytes(data)
    # Random bytes may still be valid protobuf (unknown fields are skipped).
    return Case("malformed protobuf", body, False, ACCEPTED | {"bad"})


def _malformed_json(rng: random.Random) -> Case:
    text = json.dumps(_to_json(_valid(rng)))
    how = rng.randrange(5)
    if how == 0:
        body = text[: rng.randrange(1, len(text) - 1)].encode()
    elif how == 1:
        body = rng.randbytes(rng.randrange(1, 256))
    elif how == 2:
        body = json.dumps(rng.choice([[], 3, "x", None, [{"resourceSpans": []}]])).encode()
    elif how == 3:
        body = json.dumps({"resourceSpans": rng.choice(["x", 5, [{"scopeSpans": 7}]])}).encode()
    else:
        data = _to_json(_valid(rng))
        data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "zz" * 16
        body = json.dumps(data).encode()
    return Case("malformed JSON", body, True, frozenset({"bad"}))


def _oversized(rng: random.Random, as_json: bool, compressible: bool) -> Case:
    size = LIMIT + rng.randrange(1, LIMIT)
    # Sent gzip, a compressible body is small on the wire and inflates past the limit.
    body = (b" " if as_json else b"\x00") * size if compressible else rng.randbytes(size)
    return Case("oversized", body, as_json, frozenset({"big"}))


def generate(rng: random.Random, n: int, http: bool) -> Iterator[Case]:
    for i in range(n):
        as_json = http and rng.random() < 0.5
        roll = rng.random()
        if i % 300 == 0:
            yield _oversized(rng, as_json, compressible=rng.random() < 0.5)
        elif roll < 0.22:
            yield _malformed_json(rng) if as_json else _malformed_protobuf(rng)
        elif roll < 0.30:
            depth = rng.choice([rng.randrange(101, 300), rng.randrange(300, 3000)])
            body = _deep_json(rng, depth) if as_json else _deep_protobuf(rng, depth)
            yield Case(
                "deep nesting", body, as_json, frozenset({"big" if len(body) > LIMIT else "bad"})
            )
        elif roll < 0.50:
            yield _bad_ids(rng, as_json)
        elif roll < 0.70:
            yield _graph(rng, as_json)
        elif roll < 0.85:
            yield _mistyped(rng, as_json)
        elif http and roll < 0.92:
            ctype = rng.choice(["text/plain", "application/xml", "application/grpc", ""])
            encoding = None if rng.random() < 0.7 else rng.choice(["br", "zstd", "x-foo"])
            body = _valid(rng).SerializeToString()
            # The receiver inflates gzip and deflate itself: any other encoding is a 415.
            if encoding:
                yield Case(
                    "wrong content type", body, False, frozenset({"type"}), None, PB, encoding
                )
            else:
                yield Case("wrong content type", body, False, frozenset({"type"}), None, ctype)
        else:
            req = _valid(rng)
            body = json.dumps(_to_json(req)).encode() if as_json else req.SerializeToString()
            yield Case("valid", body, as_json, frozenset({"ok"}), rejected=0)


# --- sending and classifying --------------------------------------------------------------
def _accepted(response: ExportTraceServiceResponse) -> tuple[str, int]:
    ps = response.partial_success
    if ps.rejected_spans:
        return "partial", ps.rejected_spans
    return ("warn" if ps.error_message else "ok"), 0


class _Http:
    """One kept-alive loopback connection (http.client: far less client overhead than
    requests), reopened when the server closed it after refusing a request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("POST", "/v1/traces", body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                return resp.status, resp.getheader("Content-Type", ""), data
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def _send_http(client: _Http, case: Case, gzipped: bool) -> tuple[str, int]:
    body = case.body
    headers = {
        "Content-Type": case.ctype if case.ctype is not None else (JS if case.as_json else PB)
    }
    if case.encoding:
        headers["Content-Encoding"] = case.encoding
    elif gzipped:
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    code, ctype, data = client.post(body, headers)
    if code == 200:
        out = ExportTraceServiceResponse()
        if case.as_json:
            json_format.Parse(data, out)
        else:
            out.ParseFromString(data)
        return _accepted(out)
    if code == 400 and ctype.startswith((PB, JS)):
        # Every refusal of ours names its cause in a google.rpc.Status body.
        status = status_pb2.Status()
        if ctype.startswith(JS):
            status.message = json.loads(data).get("message", "")
        else:
            status.ParseFromString(data)
        if not status.message:
            return "400 without a message", 0
    return {400: "bad", 413: "big", 415: "type"}.get(code, f"http {code}"), 0


def _send_grpc(
    call: Callable[..., ExportTraceServiceResponse], case: Case, gzipped: bool
) -> tuple[str, int]:
    try:
        compression = grpc.Compression.Gzip if gzipped else None
        return _accepted(call(case.body, timeout=30, compression=compression))
    except grpc.RpcError as exc:
        code = exc.code()
        if not exc.details():
            return f"grpc {code.name} without details", 0
        names = {
            grpc.StatusCode.INVALID_ARGUMENT: "bad",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "big",
        }
        return names.get(code, f"grpc {code.name}"), 0


def test_fuzz_both_receivers_answer_every_payload_and_keep_serving(make_collector):
    collector = make_collector(max_request_bytes=LIMIT, store="none")
    rng = random.Random(SEED)
    url = f"http://127.0.0.1:{collector.http_port}/v1/traces"
    table: Counter[tuple[str, str, str]] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    def check(transport: str, case: Case, outcome: str, rejected: int) -> None:
        table[(case.category, transport, outcome)] += 1
        if outcome not in case.allowed:
            failures.append(f"{transport} {case.category}: {outcome}, allowed {set(case.allowed)}")
        elif case.rejected is not None and outcome in ACCEPTED and rejected != case.rejected:
            failures.append(
                f"{transport} {case.category}: {rejected} rejected, not {case.rejected}"
            )

    client = _Http(collector.http_port)
    for case in generate(rng, HTTP_PAYLOADS, http=True):
        gzipped = rng.random() < 0.5 or (case.category == "oversized" and case.body[:1] in b" \0")
        check("http", case, *_send_http(client, case, gzipped))
    client.conn.close()
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        call = channel.unary_unary(
            EXPORT, response_deserializer=ExportTraceServiceResponse.FromString
        )
        for case in generate(rng, GRPC_PAYLOADS, http=False):
            check("grpc", case, *_send_grpc(call, case, gzipped=rng.random() < 0.3))
    elapsed = time.monotonic() - started

    total = sum(table.values())

    # Still serving: a valid request is accepted on both receivers and decided.
    decided_before = collector.metrics.traces_assembled._value.get()
    http_after = requests.post(
        url, data=_valid(rng).SerializeToString(), headers={"Content-Type": PB}, timeout=5
    ).status_code
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        call = channel.unary_unary(
            EXPORT, response_deserializer=ExportTraceServiceResponse.FromString
        )
        grpc_after = _accepted(call(_valid(rng).SerializeToString(), timeout=5))
    decided = (
        time_until(
            lambda: (
                collector.metrics.traces_assembled._value.get() >= decided_before + 2
                and collector.buffer.span_count == 0
            ),
            timeout=10,
        )
        is not None
    )
    alive = collector._decider.is_alive()
    errors = collector.metrics.decision_errors._value.get()
    metrics = collector.metrics
    server_errors = sum(
        n
        for (_, _, outcome), n in table.items()
        if outcome.startswith("http 5") or outcome in ("grpc UNKNOWN", "grpc INTERNAL")
    )
    still_serving = http_after == 200 and grpc_after == ("ok", 0) and decided and alive
    held, did_not_hold = [], []
    (did_not_hold if failures else held).append(
        f"{total - len(failures):,} of {total:,} payloads got an answer their category "
        f"allows; {server_errors} HTTP 5xx or gRPC UNKNOWN / INTERNAL. Every 400 carried a "
        "google.rpc.Status with a message and every gRPC error had details."
    )
    (held if still_serving and not errors else did_not_hold).append(
        f"After the barrage the collector accepted a valid request on both receivers "
        f"(HTTP {http_after}, gRPC {'accepted' if grpc_after == ('ok', 0) else grpc_after})"
        ", "
        + ("decided it and emptied its buffer" if decided else "but did not decide it")
        + f"; its decision thread was {'alive' if alive else 'dead'} with {errors:.0f} "
        f"decision errors. Across the run it accepted "
        f"{metrics.spans_received._value.get():,.0f} spans, rejected "
        f"{metrics.spans_rejected._value.get():,.0f} and decided "
        f"{metrics.traces_assembled._value.get():,.0f} traces."
    )
    held.append(
        f"The whole barrage took {elapsed:.0f} s: {elapsed / total * 1000:.1f} ms per "
        "payload on average, client, generation and the fsync'd journal write of every "
        "accepted request included."
    )
    did_not_hold += [f"{f}." for f in failures[:10]]
    http_n = sum(n for (_, t, _), n in table.items() if t == "http")
    record(
        "collector-fuzz",
        tried=[
            f"{total:,} payloads from a seeded generator (seed {SEED}), sent through the real "
            f"servers of one running collector: {http_n:,} to OTLP/HTTP `POST /v1/traces` "
            "over one kept-alive connection (half JSON, half protobuf; half of the bodies "
            f"gzip) and {total - http_n:,} to OTLP/gRPC `TraceService/Export` over one "
            "channel (30 % gzip). The collector ran with max_request_bytes = 64 KiB so that "
            "oversized payloads stay cheap. Each answer was checked against what its "
            "payload's category may get:",
        ],
        table=_table(table),
        held=held,
        did_not_hold=did_not_hold,
        notes=[
            "**Found and fixed by this test.** Before these changes: JSON nested a few "
            "thousand levels deep raised `RecursionError` and got HTTP 500; undecodable "
            "protobuf on gRPC got grpc's generic `INTERNAL` (\"Exception deserializing "
            'request") instead of `INVALID_ARGUMENT`; all-zero ids and malformed parent ids '
            "were accepted; a kvlist value on a `changed` signal (`dl.model.fingerprint`) "
            "would have raised in the decision thread, and any exception there stopped that "
            "thread for good (nothing decided or forwarded after it); spans on a parent "
            "cycle were never evaluated. Each is fixed and covered above.",
            "**Not covered.** HTTP/2 framing attacks and slow-loris clients (left to grpc "
            "and aiohttp); the payloads are sent one at a time, not concurrently (the "
            "overload test below sends valid requests concurrently).",
        ],
    )
    assert not failures, failures[:20]
    assert total == HTTP_PAYLOADS + GRPC_PAYLOADS
    assert http_after == 200 and grpc_after == ("ok", 0)
    assert alive and decided
    assert errors == 0


_CATEGORIES = {
    "malformed protobuf": "random bytes, truncated and bit-flipped valid requests",
    "malformed JSON": "truncated, random bytes, non-object top level, wrong field types, "
    "non-hex ids",
    "wrong content type": "`text/plain`, `application/xml`, `application/grpc`, none; or a "
    "supported type with `br`, `zstd` or an unknown `Content-Encoding`",
    "oversized": "random bodies over the limit, and gzip bodies that inflate past it",
    "deep nesting": "JSON arrays and kvlist values nested 101–3,000 deep; protobuf kvlists "
    "likewise",
    "invalid ids": "trace ids of 0–32 bytes or all zero, span ids of 0–16 bytes or all zero, "
    "bad parent ids, 1–3 per request beside a valid span",
    "duplicate ids": "the same span twice; one span id in two traces",
    "parent cycle": "a → b → c → a; a span that is its own parent",
    "clock skew": "end before start, zero, 2⁶⁴−1 and far-future times",
    "unknown dl.* value type": "`dl.drift.score`, `dl.stage`, `dl.model.fingerprint`... as "
    "kvlist, array, bytes or the wrong scalar",
    "valid": "well-formed traces, mixed in",
}
_ANSWERS = {
    ("http", "bad"): "400",
    ("http", "big"): "413",
    ("http", "type"): "415",
    ("grpc", "bad"): "`INVALID_ARGUMENT`",
    ("grpc", "big"): "`RESOURCE_EXHAUSTED`",
}
_ACCEPTED_AS = {
    "ok": "accepted",
    "partial": "partial success, `rejected_spans` exactly the bad spans",
    "warn": "partial success with 0 rejected and a warning naming the attribute",
}


def _table(counts: Counter[tuple[str, str, str]]) -> list[list[str]]:
    """The answers by category, transport and answer, in the order of ``_CATEGORIES``."""
    merged: Counter[tuple[str, str, str]] = Counter()
    for (category, transport, outcome), n in counts.items():
        answer = _ANSWERS.get((transport, outcome)) or _ACCEPTED_AS.get(outcome, outcome)
        if category == "malformed protobuf" and outcome in ACCEPTED:
            answer = "accepted (the bytes still parse: unknown fields are skipped)"
        merged[(category, "gRPC" if transport == "grpc" else "HTTP", answer)] += n
    order = list(_CATEGORIES)
    rows = [["category", "what the payloads are", "transport", "answer", "count"]]
    last = ""
    for key in sorted(merged, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1:])):
        category, transport, answer = key
        first, last = category != last, category
        rows.append(
            [
                category if first else "",
                _CATEGORIES.get(category, "") if first else "",
                transport,
                answer,
                f"{merged[key]:,}",
            ]
        )
    return rows


# --- properties of the decoders and the attributor ----------------------------------------
# Outcomes of the properties below, by property; each must only accept or refuse.
_outcomes: dict[str, Counter[str]] = {
    "protobuf": Counter(),
    "json": Counter(),
    "attribution": Counter(),
}
_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(st.binary(max_size=2048))
def _protobuf_decoder_accepts_or_raises_payload_error(body: bytes) -> None:
    try:
        decode_protobuf(body)
    except PayloadError as exc:
        assert str(exc)
        _outcomes["protobuf"]["refused"] += 1
    else:
        _outcomes["protobuf"]["accepted"] += 1


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)


@_SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["resourceSpans", "scopeSpans", "spans", "traceId", "x"]),
        _json_values,
        max_size=3,
    )
)
def _json_decoder_accepts_or_raises_payload_error(data: dict) -> None:
    try:
        decode_json(json.dumps(data).encode())
    except PayloadError as exc:
        assert str(exc)
        _outcomes["json"]["refused"] += 1
    else:
        _outcomes["json"]["accepted"] += 1


_ATTRIBUTOR = Attributor(load_catalog(None), min_baseline_samples=2)
_id = st.sampled_from([bytes([i]) * 8 for i in range(1, 7)])


@_SETTINGS
@given(
    st.lists(
        st.tuples(
            _id,
            st.none() | _id,
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.sampled_from(sorted(TYPED)),
            st.none() | st.floats(allow_nan=True) | st.text(max_size=4) | st.booleans(),
        ),
        min_size=1,
        max_size=12,
    )
)
def _attribution_survives_any_span_graph(spans) -> None:
    """Duplicate ids, cycles, self-parents, skewed clocks and odd values: a decision."""
    trace_id = b"\x07" * 16
    built = []
    for span_id, parent, start, end, key, value in spans:
        span = Span(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=parent or b"",
            name="s",
            start_time_unix_nano=start,
            end_time_unix_nano=end,
        )
        if value is not None:
            kv = span.attributes.add()
            kv.key = key
            if isinstance(value, bool):
                kv.value.bool_value = value
            elif isinstance(value, float):
                kv.value.double_value = value
            else:
                kv.value.string_value = value
        built.append(span)
    records, rejected, _ = flatten(_request(built), _ATTRIBUTOR.wanted_attributes)
    assert rejected == 0
    decision = _ATTRIBUTOR.decide(trace_id, records)
    assert decision.trace_id == trace_id
    if decision.fault:
        assert decision.root is not None and 0 <= decision.score <= 1
    _outcomes["attribution"]["fault" if decision.fault else "no fault"] += 1


def test_decoders_and_attributor_accept_or_refuse_any_input() -> None:
    """Hypothesis properties straight at the decoders and the attributor."""
    failures: list[BaseException] = []
    for prop in (
        _protobuf_decoder_accepts_or_raises_payload_error,
        _json_decoder_accepts_or_raises_payload_error,
        _attribution_survives_any_span_graph,
    ):
        try:
            prop()
        except Exception as exc:  # recorded first, raised below
            failures.append(exc)
    pb, js, attr = (_outcomes[k] for k in ("protobuf", "json", "attribution"))
    held = [
        f"The protobuf decoder on {pb.total():,} arbitrary byte strings accepted "
        f"{pb['accepted']:,} and refused {pb['refused']:,} with a `PayloadError` naming the "
        f"cause; the JSON decoder on {js.total():,} arbitrary JSON trees accepted "
        f"{js['accepted']:,} and refused {js['refused']:,} the same way; nothing else came "
        "out of either.",
        f"The attributor decided all {attr.total():,} span graphs of up to 12 spans with "
        "duplicate ids, cycles, self-parents, skewed clocks and odd values "
        f"({attr['fault']:,} with a fault), each with a valid decision.",
    ]
    record(
        "collector-fuzz",
        tried=[
            f"Three hypothesis properties, up to {EXAMPLES} examples each (examples run: "
            f"{pb.total() + js.total() + attr.total():,}, shrinking included).",
        ],
        held=[] if failures else held,
        did_not_hold=[f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" for e in failures],
    )
    if failures:
        raise failures[0]


def test_size_limit_is_enforced_on_both_receivers(make_collector) -> None:
    collector = make_collector(max_request_bytes=4096)
    big = _request(
        [_span(random.Random(1), b"\x01" * 16, struct.pack(">Q", i + 1)) for i in range(200)]
    ).SerializeToString()
    resp = requests.post(
        f"http://127.0.0.1:{collector.http_port}/v1/traces",
        data=big,
        headers={"Content-Type": PB},
        timeout=5,
    )
    status = status_pb2.Status.FromString(resp.content) if resp.status_code == 413 else None
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        call = channel.unary_unary(
            EXPORT, response_deserializer=ExportTraceServiceResponse.FromString
        )
        try:
            call(big, timeout=5)
            grpc_big = "OK"
        except grpc.RpcError as exc:
            grpc_big = exc.code().name
        small = _valid(random.Random(2), 0).SerializeToString()
        grpc_small = _accepted(call(small, timeout=5))
    names_key = status is not None and "max_request_bytes" in status.message
    line = (
        f"With max_request_bytes at 4 KiB, a {len(big):,}-byte request got HTTP "
        f"{resp.status_code}"
        + (" naming max_request_bytes" if names_key else " without naming the key")
        + f" and gRPC {grpc_big}; a small request on the same channel was then "
        + ("accepted." if grpc_small == ("ok", 0) else f"answered {grpc_small}.")
    )
    ok = names_key and grpc_big == "RESOURCE_EXHAUSTED" and grpc_small == ("ok", 0)
    record(
        "collector-fuzz",
        tried=["The size limit on its own, at 4 KiB, on both receivers."],
        held=[line] if ok else [],
        did_not_hold=[] if ok else [line],
    )
    assert len(big) > 4096
    assert resp.status_code == 413 and names_key
    assert grpc_big == "RESOURCE_EXHAUSTED"
    assert grpc_small == ("ok", 0)

"""What attribution reads from spans: operation keys, remote peers, and the tree of a trace.

:func:`operation` names what a span does, finer than its name (baselines are learned per
service and operation); :func:`peer_host` names the remote peer of a client span.
:class:`TraceView` is one trace as the detectors read it: its spans in data-flow order,
parents and children, its entry span, and each span's operation, computed once::

    view = TraceView(trace.spans)
    for span in view.order:          # callees before callers, earlier siblings first
        print(view.op(span), view.children.get(span.span_id, ()))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any
from urllib.parse import urlsplit

from otel_dl import semconv

from .decode import SpanRecord

CLIENT = 3

#: Attributes naming the remote peer of a client span, in the order they are trusted.
#: Instrumentations differ: current semconv writes ``server.address`` (gRPC also
#: ``rpc.service``) and names a traced callee ``service.peer.name`` (``peer.service``
#: before it), the requests/urllib instrumentations in their default (old) semconv
#: mode write only ``http.url`` and sometimes ``net.peer.name`` or ``http.host``.
PEER_NAME_ATTRIBUTES = (
    "server.address",
    "service.peer.name",
    "peer.service",
    "net.peer.name",
    "http.host",
    "rpc.service",
)
#: URL attributes the peer host is parsed from when no name attribute is set.
PEER_URL_ATTRIBUTES = ("url.full", "http.url")
#: Attributes naming the operation within a span name, in the order they are trusted:
#: HotROD names its customer calls (~300 ms) and route calls (~50 ms) both ``HTTP GET``,
#: so a baseline keyed by span name alone mixes them.
ROUTE_ATTRIBUTES = ("http.route", "url.template", "rpc.method")
#: Path attributes a route is derived from when no route attribute is set.
PATH_ATTRIBUTES = ("url.path", "http.target")
#: Port attributes that tell apart services on one host (loopback deployments).
PORT_ATTRIBUTES = ("server.port", "net.peer.port")
#: HTTP status code attributes, current and old semconv: a 4xx answer is the client's
#: mistake, not an error of the span that gave it (OpenTelemetry's HTTP semconv).
HTTP_STATUS_ATTRIBUTES = ("http.response.status_code", "http.status_code")
_OPERATION_ATTRIBUTES = frozenset(
    {*ROUTE_ATTRIBUTES, *PATH_ATTRIBUTES, *PORT_ATTRIBUTES, *PEER_URL_ATTRIBUTES}
)
_PEER_NAMES = frozenset(PEER_NAME_ATTRIBUTES)
_CLIENT_OPERATION_ATTRIBUTES = _OPERATION_ATTRIBUTES | _PEER_NAMES
#: Span attributes read besides the catalog's own signals.
CORE_ATTRIBUTES = frozenset(
    {
        "error.type",
        *PEER_NAME_ATTRIBUTES,
        *PEER_URL_ATTRIBUTES,
        *ROUTE_ATTRIBUTES,
        *PATH_ATTRIBUTES,
        *PORT_ATTRIBUTES,
        *HTTP_STATUS_ATTRIBUTES,
        semconv.DL_MODEL_NAME,
        semconv.DL_STAGE,
    }
)


def peer_host(attrs: Mapping[str, Any]) -> str | None:
    """The remote peer a span names, or None: a peer name attribute, else a URL's host."""
    for key in PEER_NAME_ATTRIBUTES:
        value = attrs.get(key)
        if isinstance(value, str) and value.strip():
            return value
    for key in PEER_URL_ATTRIBUTES:
        value = attrs.get(key)
        if not isinstance(value, str):
            continue
        try:
            host = urlsplit(value.strip()).hostname
        except ValueError:
            # A malformed URL (an unclosed IPv6 bracket...) names no usable peer.
            continue
        if host:
            return host
    return None


def _template(path: str) -> str:
    """A low-cardinality template of a URL path: segments holding a digit become ``{}``."""
    return "/".join(
        "{}" if any(c.isdigit() for c in part) else part
        for part in path.split("?", 1)[0].split("/")
    )


def _url(attrs: Mapping[str, Any]) -> tuple[str, str]:
    """(path template, port) of the span's URL attribute, or empty strings."""
    for key in PEER_URL_ATTRIBUTES:
        value = attrs.get(key)
        if isinstance(value, str):
            try:
                parts = urlsplit(value.strip())
                port = parts.port
            except ValueError:
                continue
            return _template(parts.path), str(port) if port else ""
    return "", ""


def _first_string(attrs: Mapping[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        value = attrs.get(key)
        if isinstance(value, str):
            return value
    return ""


def operation(span: SpanRecord) -> str:
    """What a span does, finer than its name: the name, plus the route (``http.route``,
    ``url.template``, ``rpc.method``, else a template of the URL path), plus the peer
    ``host:port`` of a client span. Baselines are learned per (service, operation)."""
    attrs = span.attrs
    client = span.kind == CLIENT
    if attrs.keys().isdisjoint(_CLIENT_OPERATION_ATTRIBUTES if client else _OPERATION_ATTRIBUTES):
        return span.name  # the common case, kept cheap: it runs for every span
    if client and _PEER_NAMES.issuperset(attrs.keys() & _CLIENT_OPERATION_ATTRIBUTES):
        # A client span naming its peer and nothing of its route or port (gRPC and
        # messaging clients, telemetrygen): what the general path below gives it.
        host = peer_host(attrs)
        return f"{span.name}  @{host}" if host else span.name
    route = _first_string(attrs, ROUTE_ATTRIBUTES)
    port = next((str(v) for k in PORT_ATTRIBUTES if (v := attrs.get(k)) is not None), "")
    if not route:
        path = _first_string(attrs, PATH_ATTRIBUTES)
        if path:
            route = _template(path)
    if not route or not port:
        url_route, url_port = _url(attrs)
        route, port = route or url_route, port or url_port
    peer = ""
    if client:
        host = peer_host(attrs)
        if host:
            peer = f"{host}:{port}" if port else host
    if not route and not peer:
        return span.name
    return f"{span.name} {route} @{peer}" if peer else f"{span.name} {route}"


def operation_key(span: SpanRecord) -> tuple[str, str]:
    """``(service, operation)`` of a span, computed once (kept on the record)."""
    key = span.op_key
    if key is None:
        key = span.op_key = (span.service, operation(span))
    return key


def operation_of(span: SpanRecord) -> str:
    """:func:`operation`, computed once per span."""
    return operation_key(span)[1]


class TraceView:
    """One trace as the detectors read it. ``by_operation=False`` keys operations by span
    name alone (the behaviour before per-operation baselines, for benchmarks)."""

    def __init__(self, spans: Sequence[SpanRecord], by_operation: bool = True) -> None:
        self.spans = spans
        self.by_operation = by_operation
        self.by_id: dict[bytes, SpanRecord] = {s.span_id: s for s in spans}
        children: dict[bytes, list[SpanRecord]] = {}
        for s in spans:
            parent = s.parent_id
            if parent:
                kids = children.get(parent)
                if kids is None:
                    children[parent] = [s]
                else:
                    kids.append(s)
        self.children = children
        #: Span ids with a child span in the trace (see the catalog's ``peer`` signal).
        self.callers = frozenset(self.children)
        self.order = _post_order(spans, self.by_id, self.children)
        self.entry: SpanRecord | None = next(
            (s for s in reversed(self.order) if not s.parent_id),
            self.order[-1] if self.order else None,
        )
        self._op_counts: Counter[tuple[str, str]] | None = None

    def op(self, span: SpanRecord) -> str:
        """The span's operation (see :func:`operation`)."""
        return self.key(span)[1]

    def key(self, span: SpanRecord) -> tuple[str, str]:
        """``(service, operation)``: what baselines and detectors are kept per."""
        if not self.by_operation:
            return (span.service, span.name)
        return operation_key(span)

    @property
    def op_counts(self) -> Counter[tuple[str, str]]:
        """Spans per ``(service, operation)`` in the trace."""
        if self._op_counts is None:
            self._op_counts = Counter(self.key(s) for s in self.order)
        return self._op_counts

    def depths(self) -> dict[bytes, int]:
        """Each span's number of ancestors in the trace (a parent cycle stops the count)."""
        parent = {s.span_id: s.parent_id for s in self.spans}
        depths: dict[bytes, int] = {}
        for span_id in parent:
            depth, seen, cur = 0, {span_id}, parent[span_id]
            while cur in parent and cur not in seen:
                seen.add(cur)
                depth += 1
                cur = parent[cur]
            depths[span_id] = depth
        return depths


def _post_order(
    spans: Sequence[SpanRecord],
    by_id: Mapping[bytes, SpanRecord],
    children: Mapping[bytes, list[SpanRecord]],
) -> list[SpanRecord]:
    """Spans in post-order, children by start time: callees before their caller and
    earlier siblings before later ones. ``children``: spans by parent id."""
    roots = [
        s for s in spans if not s.parent_id or s.parent_id not in by_id or s.parent_id == s.span_id
    ]
    if len(roots) > 1:
        roots.sort(key=_start, reverse=True)
    if len(by_id) == len(spans):
        # Unique span ids (the usual trace): the post-order is the reverse of the pre-order
        # that takes each span's children latest first. Spans on a parent cycle are
        # reached from no root: such a trace takes the general walk below.
        pre: list[SpanRecord] = []
        todo = roots[::-1]
        while todo:
            span = todo.pop()
            pre.append(span)
            kids = children.get(span.span_id)
            if kids:
                if len(kids) > 1:
                    kids = sorted(kids, key=_start, reverse=True)
                todo.extend(k for k in reversed(kids) if k is not span)
        if len(pre) == len(spans):
            pre.reverse()
            return pre
    order: list[SpanRecord] = []
    seen: set[bytes] = set()
    stack: list[tuple[SpanRecord, bool]] = [(s, False) for s in roots]
    while True:
        if not stack:
            # Spans on a parent cycle are reachable from no root; walk them from
            # their earliest span so they are still evaluated.
            rest = [s for s in spans if s.span_id not in seen]
            if not rest:
                break
            stack.append((min(rest, key=_start), False))
        span, expanded = stack.pop()
        if expanded:
            order.append(span)
            continue
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        stack.append((span, True))
        kids = children.get(span.span_id)
        if kids:
            if len(kids) > 1:
                kids = sorted(kids, key=_start, reverse=True)
            # A span that names itself as parent is a root, never its own child.
            stack.extend((k, False) for k in kids if k is not span)
    return order


_start = attrgetter("start")

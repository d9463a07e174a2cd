"""Fault attribution: find the span, service and failure mode that caused a trace's fault.

:class:`Attributor` matches every span of a whole trace against the failure-mode
catalog, ranks the anomalous spans and returns a :class:`Decision`::

    attributor = Attributor(load_catalog(), min_baseline_samples=30)
    decision = attributor.decide(trace.spans)
    if decision.fault:
        print(decision.root.service, decision.mode.id, decision.score)

Algorithm (docs/collector.md has the long form):

1. Evidence. Each span is matched against every mode; a mode fires when all its
   ``where`` conditions hold and one ``detect`` condition does, with a strength in
   (0, 1] that grows with how far the signal is past its threshold. A span takes its
   most specific firing mode (modes with ``where`` conditions first), cause kinds
   before symptom kinds, then the strongest.
2. Symptom first (issue 17). Only a trace with a symptom gets a root cause: an error
   or an SLO-breaching latency at its entry span (the learned ``1 - fp_budget``
   quantile of its operation), or a ``dl.*`` signal. Errors count only when they reached
   the entry or are unusual for their operation; latency only when the entry is slow. A
   slow client span whose callee's server span is normal blames the callee's span as a
   slow *link* (``Decision.blame``), never the caller.
3. Data-flow order. The span tree is walked in post-order with children by start
   time: callees come before their caller and earlier siblings before later ones, so
   a span's *upstream* (the work whose output it consumed) is everything before it.
4. Ranking. An anomalous span with another anomalous span upstream is *explained*:
   its score is discounted: a symptom kind (low confidence, latency, error) strongly by
   any upstream anomaly, a cause kind mildly and only by an upstream cause kind.
   The highest score is the root cause (at equal scores a cause kind, then the
   earliest); the services of the ranked candidates form ``dl.fault.candidates``.
5. Learning. Baselines (DDSketch quantiles of ``above_baseline`` signals per service
   and operation: span name, route and peer, see :func:`operation`) learn only from
   spans that fired no mode, so faults never poison them. A ``changed`` value becomes
   established once seen ``min_baseline_samples`` times; the first value seen for a key
   is established at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ddsketch import DDSketch

from otel_dl import semconv

from .assemble import SpanRecord
from .catalog import SPAN_SIGNALS, Catalog, Condition, FailureMode

#: Kinds that usually show a fault rather than cause it; discounted when explained.
SYMPTOM_KINDS = frozenset(
    {semconv.FAULT_KIND_LOW_CONFIDENCE, semconv.FAULT_KIND_LATENCY, semconv.FAULT_KIND_ERROR}
)
_EXPLAINED_SYMPTOM = 0.3
_EXPLAINED_CAUSE = 0.7
_BASELINE_QUANTILE = 0.99
_MAX_BASELINE_KEYS = 20_000
_MAX_CANDIDATES = 5
_MAX_VALUES_PER_KEY = 1024
_REFRESH_SAMPLES = 32
_SPAN_KIND_NAMES = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_CLIENT = 3
_ERROR_SIGNALS = frozenset({"status.error", "exception"})
#: Baseline signal name of an entry span's duration, learned apart from ``duration``:
#: it sets the trace's latency symptom, so it learns from every trace given no fault.
_ENTRY_DURATION = "entry.duration"
#: DDSketch's relative accuracy (1 %) and a margin: a constant entry duration must not
#: breach its own learned quantile on rounding.
_SKETCH_SLACK = 1.02
#: Calls of an operation in its recent window, against which error bursts are judged.
_RECENT_CALLS = 20
#: Attributes naming the remote peer of a client span, in the order they are trusted.
#: Instrumentations differ: current semconv writes ``server.address`` (gRPC also
#: ``rpc.service``), the requests/urllib instrumentations in their default (old) semconv
#: mode write only ``http.url`` and sometimes ``net.peer.name`` or ``http.host``.
PEER_NAME_ATTRIBUTES = (
    "server.address",
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
_OPERATION_ATTRIBUTES = frozenset(
    {*ROUTE_ATTRIBUTES, *PATH_ATTRIBUTES, *PORT_ATTRIBUTES, *PEER_URL_ATTRIBUTES}
)
#: Span attributes read besides the catalog's own signals.
CORE_ATTRIBUTES = frozenset(
    {
        "error.type",
        *PEER_NAME_ATTRIBUTES,
        *PEER_URL_ATTRIBUTES,
        *ROUTE_ATTRIBUTES,
        *PATH_ATTRIBUTES,
        *PORT_ATTRIBUTES,
        semconv.DL_MODEL_NAME,
        semconv.DL_STAGE,
    }
)


@dataclass
class Evidence:
    """The mode a span fired and why."""

    mode: FailureMode
    strength: float
    reason: str
    #: The signal of the detect condition that fired (``duration``, ``status.error``...).
    signal: str = ""


@dataclass
class Decision:
    """The attribution of one trace. ``fault`` is False for a healthy trace."""

    trace_id: bytes
    fault: bool
    decided_at: float = field(default_factory=time.time)
    root: SpanRecord | None = None
    mode: FailureMode | None = None
    score: float = 0.0
    candidates: tuple[str, ...] = ()
    symptoms: tuple[SpanRecord, ...] = ()
    trace_root: SpanRecord | None = None
    evidence: str = ""
    ranked_spans: tuple[SpanRecord, ...] = ()
    #: What the root-cause span stands for, a ``semconv.FAULT_BLAME_*`` value.
    blame: str = semconv.FAULT_BLAME_SELF


def _strength_above(value: float, limit: float) -> float:
    if limit <= 0:
        return 0.8
    return min(1.0, 0.6 + 0.4 * (value - limit) / limit)


def _strength_below(value: float, limit: float) -> float:
    if limit <= 0:
        return 0.8
    return min(1.0, 0.6 + 0.4 * (limit - value) / limit)


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


def operation(span: SpanRecord) -> str:
    """What a span does, finer than its name: the name, plus the route (``http.route``,
    ``url.template``, ``rpc.method``, else a template of the URL path), plus the peer
    ``host:port`` of a client span. Baselines are learned per (service, operation)."""
    attrs = span.attrs
    if span.kind != _CLIENT and attrs.keys().isdisjoint(_OPERATION_ATTRIBUTES):
        return span.name  # the common case, kept cheap: it runs for every span
    route = next((v for k in ROUTE_ATTRIBUTES if isinstance(v := attrs.get(k), str)), "")
    port = next((str(v) for k in PORT_ATTRIBUTES if (v := attrs.get(k)) is not None), "")
    if not route:
        path = next((v for k in PATH_ATTRIBUTES if isinstance(v := attrs.get(k), str)), "")
        if path:
            route = _template(path)
    if not route or not port:
        url_route, url_port = _url(attrs)
        route, port = route or url_route, port or url_port
    peer = ""
    if span.kind == _CLIENT:
        host = peer_host(attrs)
        if host:
            peer = f"{host}:{port}" if port else host
    if not route and not peer:
        return span.name
    return f"{span.name} {route} @{peer}" if peer else f"{span.name} {route}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Baselines:
    """Learned quantiles and established values, per service and span name."""

    def __init__(self, min_samples: int) -> None:
        self.min_samples = min_samples
        self.sketches: dict[tuple[str, str, str], DDSketch] = {}
        self._quantiles: dict[tuple[str, str, str], tuple[float, float]] = {}
        self.values: dict[tuple[str, ...], tuple[dict[Any, int], set[Any]]] = {}
        #: Calls and errors per (service, operation): see :class:`Calls`.
        self.calls: dict[tuple[str, str], Calls] = {}

    def count_call(self, key: tuple[str, str], error: bool, budget: float) -> None:
        entry = self.calls.get(key)
        if entry is None:
            if len(self.calls) >= _MAX_BASELINE_KEYS:
                return
            entry = self.calls[key] = Calls()
        entry.add(error, self.min_samples, budget)

    def error_rate(self, key: tuple[str, str]) -> float | None:
        """The operation's usual error rate, or None before ``min_samples`` calls."""
        entry = self.calls.get(key)
        if entry is None or entry.calls < self.min_samples:
            return None
        return entry.errors / entry.calls

    def burst(self, key: tuple[str, str]) -> bool:
        """Whether the operation's recent calls fail far more than usual."""
        entry = self.calls.get(key)
        return entry is not None and entry.burst(self.min_samples)

    def quantile(self, key: tuple[str, str, str], q: float = _BASELINE_QUANTILE) -> float | None:
        sketch = self.sketches.get(key)
        if sketch is None or sketch.count < self.min_samples:
            return None
        # A quantile query walks the sketch's bins; refresh it only as samples accumulate.
        cached = self._quantiles.get(key)
        if cached is None or sketch.count - cached[0] >= _REFRESH_SAMPLES:
            value = sketch.get_quantile_value(q)
            if value is None:
                return None
            cached = self._quantiles[key] = (sketch.count, float(value))
        return cached[1]

    def learn(self, key: tuple[str, str, str], value: float) -> None:
        sketch = self.sketches.get(key)
        if sketch is None:
            if len(self.sketches) >= _MAX_BASELINE_KEYS:
                return
            sketch = self.sketches[key] = DDSketch()
        sketch.add(value)

    def is_new(self, key: tuple[str, ...], value: Any) -> bool:
        entry = self.values.get(key)
        return entry is not None and value not in entry[1]

    def observe(self, key: tuple[str, ...], value: Any) -> None:
        entry = self.values.get(key)
        if entry is None:
            if len(self.values) >= _MAX_BASELINE_KEYS:
                return
            # The first value seen for a key is the established one.
            self.values[key] = ({value: 1}, {value})
            return
        counts, established = entry
        if value not in counts and len(counts) >= _MAX_VALUES_PER_KEY:
            # Bound memory under a stream of one-off values: forget the unsettled ones.
            for stale in [v for v in counts if v not in established]:
                del counts[stale]
        counts[value] = counts.get(value, 0) + 1
        if counts[value] >= self.min_samples:
            established.add(value)


class Calls:
    """An operation's usual error rate and its last :data:`_RECENT_CALLS` calls.

    A call joins the usual rate unless the window is a burst, so an outage, once seen,
    does not teach its own errors as usual (the few calls before it is seen do). A burst is
    a window with more errors than the usual rate gives with probability ``budget``
    (binomial tail): one retried error is not one, an operation failing on every call
    is, and HotROD's redis failing every 5th call is neither.
    """

    __slots__ = ("_limit", "_limit_at", "calls", "errors", "recent", "recent_errors")

    def __init__(self) -> None:
        self.recent: deque[bool] = deque()
        self.recent_errors = 0
        self.calls = 0
        self.errors = 0
        self._limit = _RECENT_CALLS + 1
        self._limit_at = -1

    def burst(self, min_samples: int) -> bool:
        return self.calls >= min_samples and self.recent_errors >= self._limit

    def _refresh(self, budget: float, min_samples: int) -> None:
        # The binomial tail is recomputed only as the usual rate's sample grows, and once
        # the rate is learned (the limit from the first calls is only a placeholder).
        learned = self._limit_at < min_samples <= self.calls
        if self._limit_at >= 0 and self.calls - self._limit_at < _REFRESH_SAMPLES and not learned:
            return
        p = (self.errors + 1) / (self.calls + 2)  # Laplace: no 0 % rate from few calls
        n, tail = _RECENT_CALLS, 0.0
        limit = n + 1
        for k in range(n, 0, -1):
            tail += math.comb(n, k) * p**k * (1 - p) ** (n - k)
            if tail >= budget:
                break
            limit = k
        self._limit, self._limit_at = limit, self.calls

    def add(self, error: bool, min_samples: int, budget: float) -> None:
        if len(self.recent) == _RECENT_CALLS:
            self.recent_errors -= self.recent.popleft()
        self.recent.append(error)
        self.recent_errors += error
        if not self.burst(min_samples):
            self.calls += 1
            self.errors += error
            self._refresh(budget, min_samples)


def _changed_key(span: SpanRecord, signal: str) -> tuple[str, ...]:
    if signal == semconv.DL_MODEL_FINGERPRINT:
        model = span.attrs.get(semconv.DL_MODEL_NAME)
        if model:
            return ("model", str(model))
    return (span.service, span.name, signal)


class Attributor:
    """Matches whole traces against the catalog and learns baselines from healthy spans."""

    def __init__(
        self,
        catalog: Catalog,
        min_baseline_samples: int = 30,
        fp_budget: float = 0.001,
        symptom_first: bool = True,
    ) -> None:
        """``fp_budget``: share of healthy entry calls allowed over the entry's latency
        threshold, which is that learned quantile; also the usual error rate under which
        an operation's errors are unusual. ``symptom_first=False`` keeps the behaviour
        before issue 17 (any anomalous span makes a fault, slow links blame the caller,
        baselines by span name), for before/after benchmarks only."""
        self.catalog = catalog
        self.baselines = Baselines(min_baseline_samples)
        self.fp_budget = fp_budget
        self.symptom_first = symptom_first
        # Operation of each span of the trace being decided, computed once (see operation).
        self._ops: dict[int, str] = {}
        self.wanted_attributes = catalog.attributes | CORE_ATTRIBUTES
        self._baseline_signals = frozenset(
            c.signal for m in catalog.modes for c in m.detect if c.op == "above_baseline"
        )
        self._changed_signals = frozenset(
            c.signal for m in catalog.modes for c in m.detect if c.op == "changed"
        )
        # Span ids with a child span in the trace being decided (see the peer signal).
        self._callers: frozenset[bytes] = frozenset()
        # Specific modes first, cause kinds before symptom kinds: see the module docstring.
        modes = sorted(catalog.modes, key=lambda m: (not m.where, m.kind in SYMPTOM_KINDS))
        # A condition on a span attribute cannot fire on a span without that attribute,
        # so evidence() skips those without reading them: most spans carry few dl.* keys.
        self._plan = [
            (
                mode,
                (not mode.where, mode.kind in SYMPTOM_KINDS),
                frozenset(c.signal for c in mode.where if c.signal not in SPAN_SIGNALS),
                tuple((c, c.signal in SPAN_SIGNALS) for c in mode.detect),
            )
            for mode in modes
        ]

    # --- evidence -------------------------------------------------------------------------
    def _signal(self, span: SpanRecord, signal: str) -> Any:
        if signal == "duration":
            return span.duration
        if signal == "status.error":
            return span.status_error or "error.type" in span.attrs
        if signal == "exception":
            return span.exception
        if signal == "span.kind":
            return _SPAN_KIND_NAMES.get(span.kind, "unspecified")
        if signal == "peer":
            # A callee with spans in the trace is traced: its own spans show its fault.
            return peer_host(span.attrs) is not None and span.span_id not in self._callers
        return span.attrs.get(signal)

    def _fires(self, span: SpanRecord, cond: Condition) -> tuple[float, str] | None:
        value = self._signal(span, cond.signal)
        if value is None:
            return None
        op = cond.op
        if op == "equals":
            if value == cond.value and isinstance(value, bool) == isinstance(cond.value, bool):
                return 1.0, f"{cond.signal}={value}"
            return None
        if op == "changed":
            key = _changed_key(span, cond.signal)
            if self.baselines.is_new(key, value):
                return 0.9, f"{cond.signal} changed to {value}"
            return None
        number = _number(value)
        if number is None:
            return None
        if op == "above":
            if number > cond.value:
                return _strength_above(
                    number, cond.value
                ), f"{cond.signal}={number:.4g} > {cond.value}"
            return None
        if op == "below":
            if number < cond.value:
                return _strength_below(
                    number, cond.value
                ), f"{cond.signal}={number:.4g} < {cond.value}"
            return None
        # above_baseline
        p99 = self.baselines.quantile((span.service, self._op(span), cond.signal))
        if p99 is None:
            return None
        limit = p99 * cond.value
        if number > limit and number - p99 > cond.min_excess:
            return (
                _strength_above(number, limit),
                f"{cond.signal}={number:.4g} > {cond.value}x learned p99 {p99:.4g}",
            )
        return None

    def _op(self, span: SpanRecord) -> str:
        if not self.symptom_first:
            return span.name
        op = self._ops.get(id(span))
        if op is None:
            op = self._ops[id(span)] = operation(span)
        return op

    def evidence(self, span: SpanRecord) -> Evidence | None:
        """The mode ``span`` fires, or None when it looks healthy."""
        best: Evidence | None = None
        best_rank: tuple[bool, bool] | None = None
        attrs = span.attrs
        for mode, rank, where_attributes, detect in self._plan:
            if best_rank is not None and rank > best_rank:
                break
            if where_attributes and not where_attributes <= attrs.keys():
                continue
            if mode.where and not all(self._fires(span, c) for c in mode.where):
                continue
            for cond, builtin in detect:
                if not builtin and cond.signal not in attrs:
                    continue
                hit = self._fires(span, cond)
                if hit and (best is None or hit[0] > best.strength):
                    best, best_rank = Evidence(mode, hit[0], hit[1], cond.signal), rank
        return best

    # --- decision -------------------------------------------------------------------------
    @staticmethod
    def _post_order(spans: Sequence[SpanRecord]) -> list[SpanRecord]:
        by_id = {s.span_id: s for s in spans}
        children: dict[bytes, list[SpanRecord]] = {}
        roots: list[SpanRecord] = []
        for s in spans:
            if s.parent_id and s.parent_id in by_id and s.parent_id != s.span_id:
                children.setdefault(s.parent_id, []).append(s)
            else:
                roots.append(s)
        order: list[SpanRecord] = []
        seen: set[bytes] = set()
        stack: list[tuple[SpanRecord, bool]] = [
            (s, False) for s in sorted(roots, key=lambda r: r.start, reverse=True)
        ]
        while True:
            if not stack:
                # Spans on a parent cycle are reachable from no root; walk them from
                # their earliest span so they are still evaluated.
                rest = [s for s in spans if s.span_id not in seen]
                if not rest:
                    break
                stack.append((min(rest, key=lambda r: r.start), False))
            span, expanded = stack.pop()
            if expanded:
                order.append(span)
                continue
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            stack.append((span, True))
            kids = children.get(span.span_id, ())
            stack.extend((k, False) for k in sorted(kids, key=lambda r: r.start, reverse=True))
        return order

    @staticmethod
    def _depths(spans: Sequence[SpanRecord]) -> dict[bytes, int]:
        """Each span's number of ancestors in the trace (a parent cycle stops the count)."""
        parent = {s.span_id: s.parent_id for s in spans}
        depths: dict[bytes, int] = {}
        for span_id in parent:
            depth, seen, cur = 0, {span_id}, parent[span_id]
            while cur in parent and cur not in seen:
                seen.add(cur)
                depth += 1
                cur = parent[cur]
            depths[span_id] = depth
        return depths

    def _errored(self, span: SpanRecord) -> bool:
        return bool(self._signal(span, "status.error")) or span.exception

    def _entry_slow(self, entry: SpanRecord) -> bool:
        """The entry's latency breaches its SLO: the learned (1 - fp_budget) quantile of
        its operation's entry durations, so healthy traffic breaches it at that rate."""
        key = (entry.service, self._op(entry), _ENTRY_DURATION)
        limit = self.baselines.quantile(key, 1.0 - self.fp_budget)
        # The sketch's quantiles are within 1 % of the truth; past that is a breach.
        return limit is not None and entry.duration > limit * _SKETCH_SLACK

    def _on_error_chain(self, span: SpanRecord, by_id: Mapping[bytes, SpanRecord]) -> bool:
        """Whether the error reached the entry: every span from ``span`` up to the trace's
        top is in error. A retried error under a parent that succeeded stops the chain."""
        seen: set[bytes] = set()
        cur: SpanRecord | None = span
        while cur is not None and cur.span_id not in seen:
            if not self._errored(cur):
                return False
            seen.add(cur.span_id)
            cur = by_id.get(cur.parent_id) if cur.parent_id else None
        return True

    def _unusual_error(self, span: SpanRecord) -> bool:
        """An error above its operation's usual error rate: a rare error, a burst of
        them, or an operation not yet learned (one never seen before may be the fault)."""
        key = (span.service, self._op(span))
        rate = self.baselines.error_rate(key)
        return rate is None or rate <= self.fp_budget or self.baselines.burst(key)

    def _relevant(
        self,
        found: list[tuple[SpanRecord, Evidence]],
        by_id: Mapping[bytes, SpanRecord],
        entry: SpanRecord | None,
    ) -> list[tuple[SpanRecord, Evidence]]:
        """Symptom first: the evidence that may explain the trace's symptom, if it has
        one. A symptom is an error or an SLO-breaching latency at the entry span, an
        otel-dl signal past its catalog threshold (drift, quality, schema, freshness,
        model, confidence), or a burst of errors of one operation. Without one, nothing
        is a fault: a recovered error or a slow span that made nothing slow is noise."""
        failed = entry is not None and self._errored(entry)
        slow = entry is not None and self._entry_slow(entry)
        ml = any(ev.signal not in _ERROR_SIGNALS and ev.signal != "duration" for _, ev in found)
        # A burst of errors is a symptom although the entry succeeded: an outage of a
        # service whose caller falls back to a default degrades every answer.
        burst = any(
            ev.signal in _ERROR_SIGNALS and self.baselines.burst((s.service, self._op(s)))
            for s, ev in found
        )
        if not (failed or slow or ml or burst):
            return []
        kept = []
        for span, ev in found:
            if ev.signal in _ERROR_SIGNALS:
                # Errors count when they reached the entry, or when they are unusual for
                # their operation (an operation that always fails 2 % is background).
                if not (
                    (failed and self._on_error_chain(span, by_id)) or self._unusual_error(span)
                ):
                    continue
            elif ev.signal == "duration" and not slow:
                continue
            kept.append((span, ev))
        return kept

    def _blame_links(
        self,
        found: list[tuple[SpanRecord, Evidence]],
        spans: Sequence[SpanRecord],
    ) -> tuple[list[tuple[SpanRecord, Evidence]], dict[int, str], list[SpanRecord]]:
        """A slow client span whose callee's server span is normal is a slow link: the
        network or the callee's queue (a paused or starved process delays the server
        span's start, not its length). Blame moves to the callee's span; the caller's
        client span becomes a symptom. Returns the evidence, the blame of each span (by
        ``id``) and the client spans turned into symptoms."""
        flagged = {id(s) for s, _ in found}
        children: dict[bytes, list[SpanRecord]] = {}
        for s in spans:
            if s.parent_id:
                children.setdefault(s.parent_id, []).append(s)
        out: list[tuple[SpanRecord, Evidence]] = []
        blame: dict[int, str] = {}
        callers: list[SpanRecord] = []
        for span, ev in found:
            if any(c.signal == "peer" for c in ev.mode.where):
                blame[id(span)] = semconv.FAULT_BLAME_DEPENDENCY
            if ev.signal == "duration" and span.kind == _CLIENT:
                callees = [k for k in children.get(span.span_id, ()) if k.service != span.service]
                if callees and not any(id(k) in flagged for k in callees):
                    callee = max(callees, key=lambda k: k.duration)
                    reason = (
                        f"client span {span.service}/{span.name} {ev.reason}, while the "
                        f"callee's span took {callee.duration * 1e3:.4g} ms, within its "
                        "baseline: the link (network or the callee's queue)"
                    )
                    out.append((callee, Evidence(ev.mode, ev.strength, reason, ev.signal)))
                    blame[id(callee)] = semconv.FAULT_BLAME_LINK
                    callers.append(span)
                    continue
            out.append((span, ev))
        return out, blame, callers

    def decide(self, trace_id: bytes, spans: Sequence[SpanRecord]) -> Decision:
        """Attribute one whole trace and learn from its healthy spans."""
        order = self._post_order(spans)
        self._callers = frozenset(s.parent_id for s in spans if s.parent_id)
        self._ops = {}
        raw: list[tuple[SpanRecord, Evidence]] = []
        for span in order:
            ev = self.evidence(span)
            if ev is not None:
                raw.append((span, ev))
        trace_root = next(
            (s for s in reversed(order) if not s.parent_id), order[-1] if order else None
        )
        found = raw
        blame: dict[int, str] = {}
        link_callers: list[SpanRecord] = []
        if self.symptom_first:
            for span in order:
                self.baselines.count_call(
                    (span.service, self._op(span)), self._errored(span), self.fp_budget
                )
            by_id = {s.span_id: s for s in spans}
            found = self._relevant(raw, by_id, trace_root)
            found, blame, link_callers = self._blame_links(found, spans)
        self._learn(order, {id(s) for s, _ in raw}, trace_root, bool(found))
        if not found:
            return Decision(trace_id, fault=False, trace_root=trace_root)
        scored: list[tuple[float, int, SpanRecord, Evidence]] = []
        cause_upstream = False
        for position, (span, ev) in enumerate(found):
            score = ev.strength
            if ev.mode.kind in SYMPTOM_KINDS:
                if position > 0:
                    score *= _EXPLAINED_SYMPTOM
            else:
                # Only a cause explains a cause: an upstream latency blip or error (the
                # ASGI spans run before the handler) does not account for stale data.
                if cause_upstream:
                    score *= _EXPLAINED_CAUSE
                cause_upstream = True
            scored.append((score, position, span, ev))
        # At equal scores a cause kind is the better explanation of the trace's fault.
        scored.sort(key=lambda t: (-t[0], t[3].mode.kind in SYMPTOM_KINDS, t[1]))
        best_score, _, root, ev = scored[0]
        if not root.exception:
            # The ASGI ``http send`` span of a 5xx ends in error before its server span,
            # which carries the exception; the span that raised is the one to fix.
            raised = [
                t
                for t in scored
                if t[2].exception and t[2].service == root.service and t[3].mode is ev.mode
            ]
            if raised:
                depth = self._depths(spans)
                pick = max(raised, key=lambda t: (depth.get(t[2].span_id, 0), -t[1]))
                scored.remove(pick)
                scored.insert(0, (best_score, pick[1], pick[2], pick[3]))
                root, ev = pick[2], pick[3]
        total = sum(t[0] for t in scored)
        candidates: list[str] = []
        for _, _, span, _ in scored:
            if span.service not in candidates:
                candidates.append(span.service)
        symptoms = [s for _, _, s, _ in scored[1:]]
        symptoms.extend(s for s in link_callers if s is not root and s not in symptoms)
        if (
            trace_root is not None
            and trace_root is not root
            and all(s is not trace_root for s in symptoms)
            and (trace_root.status_error or trace_root.exception)
        ):
            symptoms.append(trace_root)
        return Decision(
            trace_id,
            fault=True,
            root=root,
            mode=ev.mode,
            score=round(ev.strength * best_score / total, 4),
            candidates=tuple(candidates[:_MAX_CANDIDATES]),
            symptoms=tuple(symptoms),
            trace_root=trace_root,
            evidence=f"{root.service}/{root.name}: {ev.reason}",
            ranked_spans=tuple(s for _, _, s, _ in scored),
            blame=blame.get(id(root), semconv.FAULT_BLAME_SELF),
        )

    def _learn(
        self,
        spans: Sequence[SpanRecord],
        anomalous: set[int],
        entry: SpanRecord | None,
        fault: bool,
    ) -> None:
        baselines = self.baselines
        for span in spans:
            # Established values count anomalous spans too, so an intended change
            # (a new model version) settles after min_baseline_samples traces.
            for signal in self._changed_signals:
                value = self._signal(span, signal)
                if value is not None:
                    baselines.observe(_changed_key(span, signal), value)
            if id(span) in anomalous:
                continue
            for signal in self._baseline_signals:
                number = _number(self._signal(span, signal))
                if number is not None and number >= 0:
                    baselines.learn((span.service, self._op(span), signal), number)
        if self.symptom_first and entry is not None and not fault:
            # Every entry given no fault teaches the SLO threshold, over it or not: one
            # that learned only from entries under it would creep down and flag more
            # than the budget.
            baselines.learn((entry.service, self._op(entry), _ENTRY_DURATION), entry.duration)

"""Fault attribution: find the span, service and failure mode that caused a trace's fault.

:class:`Attributor` matches every span of a whole trace against the failure-mode
catalog, keeps the evidence that explains the trace's symptom, ranks it and returns a
:class:`~.decision.Decision`::

    attributor = Attributor(load_catalog(), min_baseline_samples=30)
    decision = attributor.decide(trace.trace_id, trace.spans)
    if decision.fault:
        print(decision.root.service, decision.mode.id, decision.score)

The steps, each in its own module (docs/collector.md has the long form):

1. Evidence (here). Each span is matched against every mode; a mode fires when all its
   ``where`` conditions hold and one ``detect`` condition does, with a strength in
   (0, 1] that grows with how far the signal is past its threshold. A span takes its
   most specific firing mode (modes with ``where`` conditions first), cause kinds
   before symptom kinds, then the strongest.
2. Symptom first. Only a trace with a symptom gets a root cause: its entry failed or
   breached its latency SLO (detect_latency.py), a ``dl.*`` signal fired that is no
   blip (detect_signals.py), or an operation's errors came in a burst
   (detect_errors.py). Each detector family then keeps only the evidence that can
   explain the symptom; a slow client span whose callee is normal blames the callee or
   the link, never the caller (detect_latency.py).
3. Ranking (rank.py), in data-flow order (spans.py): callees before their caller,
   earlier siblings before later ones; explained anomalies are discounted.
4. Learning (baselines.py). Quantiles of ``above_baseline`` signals per service and
   operation (span name, route and peer, see :func:`~.spans.operation`) learn only from
   spans that fired no mode, so faults never poison them; error rates count every call
   outside a burst; a ``changed`` value becomes established once seen
   ``min_baseline_samples`` times (the first value seen for a key at once).

A decision round goes through :meth:`Attributor.decide_many`, which learns from its
routine traces (those that fire nothing) together, with the decisions and learned values
of deciding them one at a time (routine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .baselines import Baselines, changed_key
from .catalog import SPAN_SIGNALS, Catalog, Condition, FailureMode
from .decision import ERROR_SIGNALS, SYMPTOM_KINDS, Decision, Evidence, from_ml_signal
from .decode import SpanRecord
from .detect_errors import ErrorRules, error_status
from .detect_latency import LatencyRules
from .detect_signals import SignalRules
from .rank import rank
from .routine import RoutineRun
from .spans import CORE_ATTRIBUTES, TraceView, peer_host

_SPAN_KIND_NAMES = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}

Found = list[tuple[SpanRecord, Evidence]]
#: A compiled condition: ``(strength, reason)`` when it fires on the span, else None.
Check = Callable[[SpanRecord, TraceView], tuple[float, str] | None]
_PEER_HIT = (1.0, "peer=True")
#: One mode of a span's plan: its rank, ``where`` checks and ``(check, signal)`` of each
#: ``detect`` condition that can fire on the span (see :meth:`Attributor._plan_for`).
_Step = tuple[FailureMode, tuple[bool, bool], tuple[Check, ...], tuple[tuple[Check, str], ...]]
#: Plans kept, one per attribute names a span carries (see Attributor._plan_for).
_PLANS_KEPT = 1024
#: The span's own boolean signals.
_FLAGS: dict[str, Callable[[SpanRecord], bool]] = {
    "status.error": error_status,
    "exception": lambda span: span.exception,
}


def _strength_above(value: float, limit: float) -> float:
    if limit <= 0:
        return 0.8
    return min(1.0, 0.6 + 0.4 * (value - limit) / limit)


def _strength_below(value: float, limit: float) -> float:
    if limit <= 0:
        return 0.8
    return min(1.0, 0.6 + 0.4 * (limit - value) / limit)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _all_fire(checks: tuple[Check, ...], span: SpanRecord, view: TraceView) -> bool:
    # A loop, not all() over a generator: it runs for every span of every trace.
    for check in checks:  # noqa: SIM110
        if not check(span, view):
            return False
    return True


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
        before symptom-first attribution (any anomalous span makes a fault, slow links
        blame the caller, baselines by span name), for before/after benchmarks only."""
        self.catalog = catalog
        self.baselines = Baselines(min_baseline_samples)
        self.fp_budget = fp_budget
        self.symptom_first = symptom_first
        self.errors = ErrorRules(self.baselines, fp_budget)
        self.latency = LatencyRules(self.baselines, fp_budget)
        self.signals = SignalRules(catalog, self.baselines, fp_budget)
        self.wanted_attributes = catalog.attributes | CORE_ATTRIBUTES
        self._baseline_signals = frozenset(
            c.signal for m in catalog.modes for c in m.detect if c.op == "above_baseline"
        )
        self._changed_signals = frozenset(
            c.signal for m in catalog.modes for c in m.detect if c.op == "changed"
        )
        # The mode a slow entry's explaining span is put under: a latency mode that any
        # span may fire (no `where`) on its duration above its baseline.
        self._slow_mode = next(
            (
                (m, c)
                for m in catalog.modes
                if not m.where
                for c in m.detect
                if c.signal == "duration" and c.op == "above_baseline"
            ),
            None,
        )
        # Specific modes first, cause kinds before symptom kinds: see the module docstring.
        modes = sorted(catalog.modes, key=lambda m: (not m.where, m.kind in SYMPTOM_KINDS))
        # A condition on a span attribute cannot fire on a span without that attribute,
        # so evidence() skips those without reading them: most spans carry few dl.* keys.
        # Each condition is compiled once into a check (see _check).
        self._plan = [
            (
                mode,
                (not mode.where, mode.kind in SYMPTOM_KINDS),
                frozenset(c.signal for c in mode.where if c.signal not in SPAN_SIGNALS),
                tuple(self._check(c) for c in mode.where),
                tuple(
                    (self._check(c), None if c.signal in SPAN_SIGNALS else c.signal, c.signal)
                    for c in mode.detect
                ),
            )
            for mode in modes
        ]
        # The plan for a plain span, with no error, no exception event and none of the
        # catalog's attributes: only what can fire on such a span (see evidence()).
        self._detect_attributes = frozenset(
            c.signal for m in modes for c in (*m.where, *m.detect) if c.signal not in SPAN_SIGNALS
        )
        self._plain_plan: list[_Step] = []
        self._plans: dict[tuple[str, ...], list[_Step]] = {}
        plain_checks: list[Condition] = []
        for (mode, rank_, where_attributes, where, detect), conds in zip(
            self._plan, ([*m.detect] for m in modes), strict=True
        ):
            plain_steps = [
                (step, cond)
                for step, cond in zip(detect, conds, strict=True)
                if cond.signal in SPAN_SIGNALS
                and not (cond.op == "equals" and cond.value is True and cond.signal in _FLAGS)
            ]
            if plain_steps and not where_attributes:
                plain = tuple((check, signal) for (check, _, signal), _ in plain_steps)
                self._plain_plan.append((mode, rank_, where, plain))
                plain_checks.extend(cond for _, cond in plain_steps)
        # When every plain-span check is a duration above its baseline, a plain span within
        # the smallest factor of its p99 fires nothing, and evidence() says so from one
        # quantile lookup (most spans of most traces).
        self._plain_factor: float | None = (
            min(c.value for c in plain_checks)
            if plain_checks
            and all(
                c.op == "above_baseline" and c.signal == "duration" and c.value > 0
                for c in plain_checks
            )
            else None
        )
        self._learned = tuple(
            (signal, signal in SPAN_SIGNALS) for signal in sorted(self._baseline_signals)
        )
        self._observed = tuple(
            (signal, signal in SPAN_SIGNALS) for signal in sorted(self._changed_signals)
        )
        # Spans carrying none of these attributes (and with no built-in observed signal)
        # have nothing for _learn to observe.
        self._observed_attributes = (
            None
            if any(builtin for _, builtin in self._observed)
            else frozenset(signal for signal, _ in self._observed)
        )
        # Routine traces are decided together (routine.py) when every check a plain span can
        # fire is a duration above its baseline, and a plain span teaches only its
        # duration: no built-in signal is observed or learned besides.
        self._routine = (
            symptom_first
            and self._plain_factor is not None
            and self._observed_attributes is not None
            and all(signal == "duration" for signal, builtin in self._learned if builtin)
        )

    # --- evidence -------------------------------------------------------------------------
    @staticmethod
    def _signal(span: SpanRecord, signal: str, view: TraceView) -> Any:
        if signal == "duration":
            return span.duration
        if signal == "status.error":
            return error_status(span)
        if signal == "exception":
            return span.exception
        if signal == "span.kind":
            return _SPAN_KIND_NAMES.get(span.kind, "unspecified")
        if signal == "peer":
            # A callee with spans in the trace is traced: its own spans show its fault.
            return peer_host(span.attrs) is not None and span.span_id not in view.callers
        return span.attrs.get(signal)

    def _check(self, cond: Condition) -> Check:
        """``cond`` as a function of ``(span, view)``: what :meth:`_fires` returns.

        An ``equals`` test on a span's own error status, exception event or kind is
        decided without the general path, for it runs on every span of every trace.
        """
        value = cond.value
        if cond.op == "equals" and isinstance(value, bool) and cond.signal in _FLAGS:
            flag = _FLAGS[cond.signal]
            hit = (1.0, f"{cond.signal}={value}")
            if value:
                return lambda span, view: hit if flag(span) else None
            return lambda span, view: None if flag(span) else hit
        if cond.op == "equals" and cond.signal == "peer" and value is True:
            # The cheap half first: a callee with spans in the trace is traced.
            return lambda span, view: (
                _PEER_HIT
                if span.span_id not in view.callers and peer_host(span.attrs) is not None
                else None
            )
        if cond.op == "above_baseline" and cond.signal == "duration":
            return lambda span, view: self._past_baseline(span, cond, view, span.duration)
        if cond.op == "equals" and cond.signal == "span.kind" and value != "unspecified":
            kinds = frozenset(k for k, name in _SPAN_KIND_NAMES.items() if name == value)
            hit = (1.0, f"span.kind={value}")
            return lambda span, view: hit if span.kind in kinds else None
        return lambda span, view: self._fires(span, cond, view)

    def _fires(
        self, span: SpanRecord, cond: Condition, view: TraceView
    ) -> tuple[float, str] | None:
        value = self._signal(span, cond.signal, view)
        if value is None:
            return None
        op = cond.op
        if op == "equals":
            if value == cond.value and isinstance(value, bool) == isinstance(cond.value, bool):
                return 1.0, f"{cond.signal}={value}"
            return None
        if op == "changed":
            key = changed_key(span, cond.signal)
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
        return self._past_baseline(span, cond, view, number)

    def _past_baseline(
        self, span: SpanRecord, cond: Condition, view: TraceView, number: float
    ) -> tuple[float, str] | None:
        """The ``above_baseline`` test of ``number``, the span's value of the signal."""
        key = (*view.key(span), cond.signal)
        p99 = self.baselines.quantile(key)
        if p99 is None:
            return None
        limit = p99 * cond.value
        if number <= limit:
            return None
        reason = f"{cond.signal}={number:.4g} > {cond.value}x learned p99 {p99:.4g}"
        if number - p99 > cond.min_excess:
            self.latency.past(key[:2])
            return _strength_above(number, limit), reason
        if self.symptom_first and self.latency.past_own_floor(key, number - p99, cond.min_excess):
            return _strength_above(number, limit), f"{reason}, here and in its previous trace"
        return None

    def evidence(self, span: SpanRecord, view: TraceView) -> Evidence | None:
        """The mode ``span`` fires, or None when it looks healthy."""
        best: Evidence | None = None
        best_rank: tuple[bool, bool] | None = None
        attrs = span.attrs
        plain = (
            not span.exception
            and not error_status(span)
            and self._detect_attributes.isdisjoint(attrs)
        )
        if plain and self._plain_factor is not None:
            # Each plain check is `duration above p99 × factor`: within the smallest factor
            # (or before p99 is learned) none fires, and none has a side effect.
            p99 = self.baselines.quantile((*view.key(span), "duration"))
            if p99 is None or span.duration <= p99 * self._plain_factor:
                return None
        for mode, rank_, where, detect in self._plain_plan if plain else self._plan_for(attrs):
            if best_rank is not None and rank_ > best_rank:
                break
            if where and not _all_fire(where, span, view):
                continue
            for check, signal in detect:
                hit = check(span, view)
                if hit and (best is None or hit[0] > best.strength):
                    best, best_rank = Evidence(mode, hit[0], hit[1], signal), rank_
        return best

    def _plan_for(self, attrs: Mapping[str, Any]) -> list[_Step]:
        """The plan for a span carrying ``attrs``: the modes whose ``where`` attributes it
        carries, each with the ``detect`` conditions it can fire (those on a span signal
        or on an attribute it carries); a mode left with neither a condition nor a
        ``where`` check is left out. Kept per attribute names in the span's order (spans
        of one operation share them), for up to :data:`_PLANS_KEPT` of them."""
        names = tuple(attrs)
        plan = self._plans.get(names)
        if plan is None:
            keys = attrs.keys()
            plan = [
                (mode, rank_, where, steps)
                for mode, rank_, where_attributes, where, detect in self._plan
                if not where_attributes or where_attributes <= keys
                for steps in [
                    tuple((check, signal) for check, attribute, signal in detect
                          if attribute is None or attribute in keys)
                ]
                if steps or where
            ]  # fmt: skip
            if len(self._plans) < _PLANS_KEPT:
                self._plans[names] = plan
        return plan

    # --- decision -------------------------------------------------------------------------
    def _relevant(self, found: Found, view: TraceView) -> Found:
        """Symptom first: the evidence that may explain the trace's symptom, if it has
        one (see the module docstring). Without one, nothing is a fault."""
        if not found:
            # No span fired: only a slow entry that a span's own excess explains is one.
            return self._explained(view) if self.latency.entry_slow(view) else []
        entry = view.entry
        failed = entry is not None and self.errors.errored(entry)
        slow = self.latency.entry_slow(view)
        found = self.signals.drop_background(self.signals.drop_isolated(found, view), view)
        ml = any(from_ml_signal(ev) for _, ev in found)
        # A burst of errors is a symptom although the entry succeeded: an outage of a
        # service whose caller falls back to a default degrades every answer.
        burst = any(ev.signal in ERROR_SIGNALS and self.errors.burst(s, view) for s, ev in found)
        if not (failed or slow or ml or burst):
            return []
        kept: Found = []
        for span, ev in found:
            if ev.signal in ERROR_SIGNALS:
                judged = self.errors.judge(span, ev, view, failed)
                if judged is not None:
                    kept.append((span, judged))
            elif ev.signal != "duration" or slow:
                kept.append((span, ev))
        if slow and not kept:
            kept = self._explained(view)
        return kept

    def _explained(self, view: TraceView) -> Found:
        """The span that explains a slow entry no span's rule explains, if one does."""
        if self._slow_mode is None:
            return []
        mode, condition = self._slow_mode
        explained = self.latency.explain(view, mode, condition.min_excess)
        return [] if explained is None else [explained]

    def decide_many(
        self,
        traces: Sequence[tuple[bytes, Sequence[SpanRecord]]],
        decide: Callable[[bytes, Sequence[SpanRecord]], Decision] | None = None,
    ) -> list[Decision]:
        """Decide a round of ``(trace id, spans)`` in order, as :meth:`decide` each
        (or ``decide``, a wrapper of it), except that runs of routine traces are decided
        together (see routine.py)."""
        decide = decide or self.decide
        if not self._routine or self._plain_factor is None:
            return [decide(trace_id, spans) for trace_id, spans in traces]
        out: list[Decision | None] = [None] * len(traces)
        run = RoutineRun(
            self.baselines,
            self.latency,
            self.signals,
            self._detect_attributes,
            self._plain_factor,
            self.fp_budget,
        )
        for i, (trace_id, spans) in enumerate(traces):
            if not run.take(i, trace_id, spans):
                run.close(out)
                out[i] = decide(trace_id, spans)
        run.close(out)
        return out  # type: ignore[return-value]

    def decide(self, trace_id: bytes, spans: Sequence[SpanRecord]) -> Decision:
        """Attribute one whole trace and learn from its healthy spans."""
        view = TraceView(spans, by_operation=self.symptom_first)
        raw: Found = []
        for span in view.order:
            ev = self.evidence(span, view)
            if ev is not None:
                raw.append((span, ev))
        found = raw
        blame: dict[int, str] = {}
        link_callers: list[SpanRecord] = []
        anomalous: tuple[str, ...] = ()
        if self.symptom_first:
            self.errors.count(view)
            self.signals.count(raw, view)
            found = self._relevant(raw, view)
            self.signals.remember(raw, view)
            self.latency.remember(view)
            if found:
                found, blame, link_callers = self.latency.blame_links(found, view)
            if raw:
                linked = self.latency.blame_links(raw, view)[0]
                anomalous = tuple(dict.fromkeys(s.service for s, _ in linked))
        flagged = {id(s) for s, _ in (*raw, *found)} if raw or found else set()
        self._learn(view, flagged, bool(found))
        if not found:
            return Decision(trace_id, fault=False, trace_root=view.entry, anomalous=anomalous)
        return rank(trace_id, found, view, blame, link_callers, anomalous)

    def _learn(self, view: TraceView, anomalous: set[int], fault: bool) -> None:
        baselines = self.baselines
        observed_attributes = self._observed_attributes
        for span in view.order:
            attrs = span.attrs
            # Established values count anomalous spans too, so an intended change
            # (a new model version) settles after min_baseline_samples traces.
            if observed_attributes is None or not observed_attributes.isdisjoint(attrs):
                for signal, builtin in self._observed:
                    value = self._signal(span, signal, view) if builtin else attrs.get(signal)
                    if value is not None:
                        baselines.observe(changed_key(span, signal), value)
            if anomalous and id(span) in anomalous:
                continue
            service, operation = view.key(span)
            for signal, builtin in self._learned:
                if signal == "duration":
                    number: float | None = span.duration
                else:
                    value = self._signal(span, signal, view) if builtin else attrs.get(signal)
                    if value is None:
                        continue
                    number = _number(value)
                if number is not None and number >= 0:
                    baselines.learn((service, operation, signal), number)
        if self.symptom_first and not fault:
            self.latency.learn_entry(view)

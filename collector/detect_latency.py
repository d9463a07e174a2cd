"""Latency detection: when a trace is slow, and which slow span or broken link made it so.

- **The symptom** (:meth:`LatencyRules.entry_slow`): the entry span's duration breaches
  the SLO threshold of its operation, the learned ``1 - fp_budget`` quantile of the
  durations of entries given no fault, so healthy traffic breaches it at about
  ``fp_budget``. Slow spans count only in such a trace: one that made nothing slow is
  not a fault.
- **The operation's own floor** (:meth:`LatencyRules.past_own_floor`): an
  ``above_baseline`` value must also be past the condition's ``min_excess`` (10 ms for
  ``duration`` by default). For an operation too short for that floor, a value past its
  own floor (:meth:`~.baselines.Baselines.floor`: half its median, or 3 robust standard
  deviations, and at least :data:`FLOOR_MIN` of ``min_excess``) fires when the operation
  was past it in its previous trace too: a callee whose 1.1 ms spans double under CPU
  contention, not one jitter spike.
- **The span that explains a slow entry** (:meth:`LatencyRules.explain`): when the entry
  breached its SLO and no span fired a rule of its own (each stayed under twice its p99),
  the span whose own excess over its p99 makes up at least half the entry's excess.
- **Slow links** (:meth:`LatencyRules.blame_links`): a slow client span whose callee's
  server span is normal is the link (the network, or the callee's queue: a paused or
  starved process delays its server span's start, not its length). The blame moves to
  the callee's span (``dl.fault.blame = link``), never the caller. So does a client span
  that failed (other than with a 4xx) while its callee's span ended without error: the
  answer was lost on the link (a reset or a timeout after the callee answered).
- **Broken links** (also :meth:`LatencyRules.blame_links`): a client span that failed or
  was slow with no span of its callee at all (a connection reset or refused, a link that
  timed out before the request got through) looks like an untraced dependency. When a
  traced service answered the same client operation in earlier traces
  (:meth:`~.baselines.Baselines.callee`, learned in :meth:`LatencyRules.remember`), it
  is the link into that service: the client span is the root-cause span, standing for the
  callee (its service is the callee's, ``dl.fault.blame = link``), never the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from otel_dl import semconv

from .baselines import MAX_KEYS, Baselines
from .catalog import FailureMode
from .decision import ERROR_SIGNALS, Evidence
from .decode import SpanRecord
from .detect_errors import client_mistake, error_status
from .spans import CLIENT, TraceView

#: Baseline signal name of an entry span's duration, learned apart from ``duration``:
#: it sets the trace's latency symptom, so it learns from every trace given no fault.
ENTRY_DURATION = "entry.duration"
#: DDSketch's relative accuracy (1 %) and a margin: a constant entry duration must not
#: breach its own learned quantile on rounding.
_SKETCH_SLACK = 1.02
#: A slow entry no span's rule explains is put down to the span whose own excess makes up
#: at least this share of the entry's (:meth:`LatencyRules.explain`), with this strength.
EXPLAIN_SHARE = 0.5
EXPLAIN_STRENGTH = 0.6
#: The operation's own floor is never under this share of the condition's ``min_excess``:
#: tens of microseconds of scheduler jitter on a microsecond span are no fault.
FLOOR_MIN = 0.05

Blame = dict[int, str]


class LatencyRules:
    """The entry's SLO, the operations' own floors, and slow-link blame."""

    def __init__(self, baselines: Baselines, fp_budget: float) -> None:
        self.baselines = baselines
        self.fp_budget = fp_budget
        # Operations past their own floor in the trace being decided, and in their last
        # trace (by (service, operation)).
        self._now: set[tuple[str, str]] = set()
        self._before: set[tuple[str, str]] = set()

    def entry_slow(self, view: TraceView) -> bool:
        """The entry's latency breaches its SLO: the learned (1 - fp_budget) quantile of
        its operation, so healthy traffic breaches it at that rate."""
        entry = view.entry
        if entry is None:
            return False
        limit = self.slo(view.key(entry))
        return limit is not None and entry.duration > limit

    def slo(self, key: tuple[str, str]) -> float | None:
        """The duration over which an entry of operation ``key`` breaches its SLO, or None
        before it is learned."""
        limit = self.baselines.quantile((*key, ENTRY_DURATION), 1.0 - self.fp_budget)
        # The sketch's quantiles are within 1 % of the truth; past that is a breach.
        return None if limit is None else limit * _SKETCH_SLACK

    def past(self, key: tuple[str, str]) -> None:
        """Record that an operation was past its baseline in the trace being decided."""
        self._now.add(key)

    def past_own_floor(
        self, key: tuple[str, str, str], excess: float, min_excess: float
    ) -> bool | None:
        """For a value past ``factor × p99`` by ``excess`` but not by ``min_excess``:
        None when the excess is within the operation's own floor, else whether it counts
        (the operation was past its floor in its previous trace too)."""
        own = self.baselines.floor(key)
        if own is None or excess <= max(FLOOR_MIN * min_excess, own):
            return None
        self._now.add(key[:2])
        return key[:2] in self._before

    def remember(self, view: TraceView) -> None:
        """End of a trace: its operations past their floor are the 'previous trace'; each
        client operation answered by a span of another service has that service as its
        callee."""
        for span in view.order:
            if span.kind == CLIENT:
                for child in view.children.get(span.span_id, ()):
                    if child.service != span.service:
                        self.baselines.learn_callee(view.key(span), child.service)
                        break
        if not self._now and not self._before:
            return  # no operation past its floor, now or in its last trace
        for key in view.op_counts:
            if key in self._now:
                if len(self._before) < MAX_KEYS:
                    self._before.add(key)
            else:
                self._before.discard(key)
        self._now = set()

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """:meth:`remember` of traces in which none of the operations ``keys`` was past
        its floor."""
        if self._before:
            self._before.difference_update(keys)

    def explain(
        self, view: TraceView, mode: FailureMode | None, min_excess: float
    ) -> tuple[SpanRecord, Evidence] | None:
        """Why a slow entry is slow when no span's own rule says: the span whose excess
        over its learned p99, less what its children's excesses account for, makes up at
        least :data:`EXPLAIN_SHARE` of the entry's excess over its own p99, and at least
        ``min_excess`` (the duration rule's, 10 ms: jitter explains nothing), in a trace
        whose entry breached its SLO by ``min_excess`` or more. A 200 ms delay
        on a 300 ms call stays under twice its p99, yet it is why the request breached its
        SLO. A client span so chosen whose callee's span is normal is a slow link
        (:meth:`blame_links`)."""
        entry = view.entry
        if entry is None or mode is None:
            return None
        # A breach by less than min_excess is the SLO quantile's own estimation noise.
        limit = self.baselines.quantile((*view.key(entry), ENTRY_DURATION), 1.0 - self.fp_budget)
        if limit is None or entry.duration - limit * _SKETCH_SLACK < min_excess:
            return None

        def excess(span: SpanRecord) -> float:
            p99 = self.baselines.quantile((*view.key(span), "duration"))
            return 0.0 if p99 is None else max(0.0, span.duration - p99)

        total = excess(entry)
        if total <= 0:
            return None
        best, best_own = None, 0.0
        for span in view.order:
            if span is entry:
                continue
            own = excess(span)
            if own <= best_own:
                continue
            own -= sum(excess(child) for child in view.children.get(span.span_id, ()))
            if own > best_own:
                best, best_own = span, own
        if best is None or best_own < max(EXPLAIN_SHARE * total, min_excess):
            return None
        reason = (
            f"duration={best.duration:.4g} is {best_own:.4g} s over its learned p99 beyond"
            f" its children's, {best_own / total:.0%} of the slow entry's excess"
        )
        return best, Evidence(mode, EXPLAIN_STRENGTH, reason, "duration")

    def learn_entry(self, view: TraceView) -> None:
        """Teach the entry's SLO threshold from a trace given no fault, over it or not:
        one that learned only from entries under it would creep down and flag more than
        the budget."""
        if view.entry is not None:
            key = (*view.key(view.entry), ENTRY_DURATION)
            self.baselines.learn(key, view.entry.duration)

    def blame_links(
        self, found: list[tuple[SpanRecord, Evidence]], view: TraceView
    ) -> tuple[list[tuple[SpanRecord, Evidence]], Blame, list[SpanRecord]]:
        """A slow client span whose callee's server span is normal is a slow link: blame
        moves to the callee's span; the caller's client span becomes a symptom. A failed
        or slow client span with no callee span, whose operation a traced service answers
        in other traces, is a broken link: it stands for that service. Returns the
        evidence, the blame of each span (by ``id``; a client span into an untraced peer
        is a ``dependency``) and the client spans turned into symptoms."""
        flagged = {id(s) for s, _ in found}
        out: list[tuple[SpanRecord, Evidence]] = []
        blame: Blame = {}
        callers: list[SpanRecord] = []
        for span, ev in found:
            if span.kind == CLIENT and span.span_id not in view.callers:
                callee_service = self.baselines.callee(view.key(span))
                if callee_service is not None and callee_service != span.service:
                    link = _standing_for(span, callee_service)
                    reason = (
                        f"client span {span.service}/{span.name} {ev.reason}, with no span "
                        f"of {callee_service}, which answers this call in other traces: the "
                        f"link into {callee_service} (reset, refused or timed out)"
                    )
                    out.append((link, Evidence(ev.mode, ev.strength, reason, ev.signal, ev.weak)))
                    blame[id(link)] = semconv.FAULT_BLAME_LINK
                    continue
            if any(c.signal == "peer" for c in ev.mode.where):
                blame[id(span)] = semconv.FAULT_BLAME_DEPENDENCY
            slow = ev.signal == "duration"
            # A failed call whose callee answered without error: the answer was lost on
            # the link (reset or timed out). A 4xx is the caller's own bad request.
            failed = ev.signal in ERROR_SIGNALS and not client_mistake(span)
            if span.kind == CLIENT and (slow or failed):
                callees = [
                    k for k in view.children.get(span.span_id, ()) if k.service != span.service
                ]
                if (
                    callees
                    and not any(id(k) in flagged for k in callees)
                    and (slow or not any(error_status(k) or k.exception for k in callees))
                ):
                    callee = max(callees, key=lambda k: k.duration)
                    reason = (
                        f"client span {span.service}/{span.name} {ev.reason}, while the "
                        f"callee's span took {callee.duration * 1e3:.4g} ms, within its "
                        "baseline"
                        + (
                            ": the link (network or the callee's queue)"
                            if slow
                            else " and without error: the link (its answer reset or timed out)"
                        )
                    )
                    out.append((callee, Evidence(ev.mode, ev.strength, reason, ev.signal)))
                    blame[id(callee)] = semconv.FAULT_BLAME_LINK
                    callers.append(span)
                    continue
            out.append((span, ev))
        return out, blame, callers


def _standing_for(span: SpanRecord, service: str) -> SpanRecord:
    """The client span of a broken link as the root cause: the same span (attributes are
    written on it), standing for the service it could not reach."""
    link = copy.copy(span)
    link.service = service
    link.op_key = None
    return link

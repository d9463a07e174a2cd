"""Latency detection: when a trace is slow, and which slow span or link made it so.

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
- **Slow links** (:meth:`LatencyRules.blame_links`): a slow client span whose callee's
  server span is normal is the link (the network, or the callee's queue: a paused or
  starved process delays its server span's start, not its length). The blame moves to
  the callee's span (``dl.fault.blame = link``), never the caller.
"""

from __future__ import annotations

from otel_dl import semconv

from .assemble import SpanRecord
from .baselines import MAX_KEYS, Baselines
from .decision import Evidence
from .spans import CLIENT, TraceView

#: Baseline signal name of an entry span's duration, learned apart from ``duration``:
#: it sets the trace's latency symptom, so it learns from every trace given no fault.
ENTRY_DURATION = "entry.duration"
#: DDSketch's relative accuracy (1 %) and a margin: a constant entry duration must not
#: breach its own learned quantile on rounding.
_SKETCH_SLACK = 1.02
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
        limit = self.baselines.quantile((*view.key(entry), ENTRY_DURATION), 1.0 - self.fp_budget)
        # The sketch's quantiles are within 1 % of the truth; past that is a breach.
        return limit is not None and entry.duration > limit * _SKETCH_SLACK

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
        """End of a trace: its operations past their floor are the 'previous trace'."""
        for key in view.op_counts:
            if key in self._now:
                if len(self._before) < MAX_KEYS:
                    self._before.add(key)
            else:
                self._before.discard(key)
        self._now = set()

    def learn_entry(self, view: TraceView) -> None:
        """Teach the entry's SLO threshold from a trace given no fault, over it or not:
        one that learned only from entries under it would creep down and flag more than
        the budget."""
        if view.entry is not None:
            key = (*view.key(view.entry), ENTRY_DURATION)
            self.baselines.learn(key, view.entry.duration)

    @staticmethod
    def blame_links(
        found: list[tuple[SpanRecord, Evidence]], view: TraceView
    ) -> tuple[list[tuple[SpanRecord, Evidence]], Blame, list[SpanRecord]]:
        """A slow client span whose callee's server span is normal is a slow link: blame
        moves to the callee's span; the caller's client span becomes a symptom. Returns
        the evidence, the blame of each span (by ``id``; a client span into an untraced
        peer is a ``dependency``) and the client spans turned into symptoms."""
        flagged = {id(s) for s, _ in found}
        out: list[tuple[SpanRecord, Evidence]] = []
        blame: Blame = {}
        callers: list[SpanRecord] = []
        for span, ev in found:
            if any(c.signal == "peer" for c in ev.mode.where):
                blame[id(span)] = semconv.FAULT_BLAME_DEPENDENCY
            if ev.signal == "duration" and span.kind == CLIENT:
                callees = [
                    k for k in view.children.get(span.span_id, ()) if k.service != span.service
                ]
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

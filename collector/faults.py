"""The fault processor: attribute → enrich → store, for every trace the buffer hands over.

:class:`FaultProcessor` is the one stage between assembly and export. It attributes each
whole trace, writes the attribution onto its spans, remembers the decision for spans
that arrive late, counts it in the metrics and records it in the store; ``pipeline.py``
only wires it::

    processor = FaultProcessor(attributor, DecisionCache(100_000), metrics, store, notifier)
    spans = processor.process(traces, late_spans)   # enriched, ready for the export queue

A faulty trace is also handed to the webhook notifier (``collector/notify.py``), when one
is configured: it posts once per incident, off this thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from .assemble import DecisionCache, Trace
from .attribute import Attributor, Decision
from .decode import SpanRecord
from .enrich import enrich, enrich_late
from .metrics import CollectorMetrics
from .notify import Notifier, fault_from_decision
from .store import FaultStore

_log = logging.getLogger(__name__)
#: The decision cache's entry of a healthy trace: late spans get nothing.
HEALTHY = ("", "")


class FaultProcessor:
    """Attributes, enriches and records whole traces. Not thread-safe: the collector's one
    decision thread calls it."""

    def __init__(
        self,
        attributor: Attributor,
        decisions: DecisionCache,
        metrics: CollectorMetrics,
        store: FaultStore | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.attributor = attributor
        self.decisions = decisions
        self.metrics = metrics
        self.store = store
        self.notifier = notifier

    def process(self, traces: Sequence[Trace], late: Sequence[SpanRecord]) -> list[SpanRecord]:
        """Decide ``traces`` and give ``late`` spans their trace's recorded decision; return
        every span, enriched, in order."""
        out: list[SpanRecord] = []
        stored: list[tuple[Decision, list[SpanRecord]]] = []
        took: list[float] = []
        for trace, decision in zip(traces, self._decide_all(traces, took), strict=True):
            if decision.fault and decision.root is not None and decision.mode is not None:
                self.decisions.put(
                    trace.trace_id, (decision.root.service, decision.root.span_id.hex())
                )
                self.metrics.count_fault(
                    decision.root.service, decision.mode.kind, decision.mode.id
                )
                if self.notifier is not None:
                    self.notifier.notify(fault_from_decision(decision), trace.trace_id.hex())
            else:
                self.decisions.put(trace.trace_id, HEALTHY)
            # Healthy traces are stored too: their edges, signals and spectrum.
            stored.append((decision, trace.spans))
            out.extend(trace.spans)
        self.metrics.traces_assembled.inc(len(traces))
        seconds = self.metrics.attribution_seconds
        with seconds.lock:
            for value in took:
                seconds.observe((), value)
        for rec in late:
            cause = self.decisions.get(rec.trace_id)
            if cause and cause != HEALTHY:
                enrich_late(rec, cause)
        self.metrics.spans_late.inc(len(late))
        out.extend(late)
        self.metrics.observe_signals(out)
        if self.store is not None and stored:
            try:
                self.store.record(stored)
            except Exception:
                _log.exception("could not write faults to the store %s", self.store.path)
        return out

    def _decide_all(self, traces: Sequence[Trace], took: list[float]) -> list[Decision]:
        """Attribute and enrich ``traces``; append the seconds each took to ``took``.

        The routine traces the attributor decides together (collector/routine.py) are each
        timed at their share of the round's time outside the other traces."""

        def decide(trace_id: bytes, spans: Sequence[SpanRecord]) -> Decision:
            started = time.perf_counter()
            try:
                decision = self.attributor.decide(trace_id, spans)
                if decision.fault:
                    enrich(decision, spans)
            except Exception as exc:
                # Forward the trace unattributed rather than lose it; log no values.
                self.metrics.decision_errors.inc()
                _log.error(
                    "could not attribute trace %s (%s); forwarding it unattributed",
                    trace_id.hex(),
                    type(exc).__name__,
                )
                decision = Decision(trace_id, fault=False)
            took.append(time.perf_counter() - started)
            return decision

        started = time.perf_counter()
        try:
            decisions = self.attributor.decide_many(
                [(trace.trace_id, trace.spans) for trace in traces], decide
            )
        except Exception as exc:
            # Only learning from routine traces can get here: forward the round unattributed.
            self.metrics.decision_errors.inc()
            _log.error(
                "could not attribute a round of %d traces (%s); forwarding them unattributed",
                len(traces),
                type(exc).__name__,
            )
            return [Decision(trace.trace_id, fault=False) for trace in traces]
        routine = len(traces) - len(took)
        if routine > 0:
            share = max(0.0, time.perf_counter() - started - sum(took)) / routine
            took.extend([share] * routine)
        return decisions

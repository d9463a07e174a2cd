"""otel-dl signal detection: when a ``dl.*`` mode that fired is a symptom, not a blip.

A ``dl.*`` mode (drift, quality, schema, freshness, model change, confidence) that fired
is a symptom of its trace, except:

- a transient one (:meth:`SignalRules.drop_isolated`): a mode that fired on a single
  span of an operation run at least :data:`ISOLATED_AMONG` times in the trace (one batch
  of many), and not in that operation's previous trace. A drifted source shows on batch
  after batch or trace after trace; one drift ``alert`` on one batch is a blip;
- an operation's background (:meth:`SignalRules.drop_background`), for the mode kinds in
  :data:`RATE_KINDS`: any model is unsure of some predictions (a random forest trained on
  scikit-learn's digits, 98 % accurate, of about 14 % of single rows), so a
  low-confidence call is a fault only when its confidence lies below its operation's
  usual spread (the median less :data:`SPREADS` robust standard deviations, the
  interquartile range / 1.349, of the confidences of its calls outside bursts), when
  that spread is not yet learned (``min_baseline_samples`` calls), or when such calls
  come in a burst: more in the operation's last 20 calls than their usual rate gives
  with probability ``fp_budget``, as errors are judged (:class:`~.baselines.Calls`). A
  call counts when its span carries a signal such a mode reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from otel_dl import semconv

from .baselines import MAX_KEYS, Baselines
from .catalog import SPAN_SIGNALS, Catalog
from .decision import Evidence, from_ml_signal
from .decode import SpanRecord
from .spans import TraceView

#: Spans of one operation in a trace from which a mode fired on one of them only is a blip.
ISOLATED_AMONG = 3
#: Mode kinds whose single firings can be an operation's background, each with the
#: signal whose usual spread says which of them are.
RATE_KINDS: dict[str, str] = {semconv.FAULT_KIND_LOW_CONFIDENCE: semconv.DL_CONFIDENCE_MEAN}
#: Robust standard deviations below its operation's median confidence that make a
#: low-confidence call unusual.
SPREADS = 3.0

Found = list[tuple[SpanRecord, Evidence]]


class SignalRules:
    """Remembers which ``dl.*`` modes each operation fired in its last trace, and, for
    the :data:`RATE_KINDS` modes, how often they fire on its calls and how the signal
    they read usually spreads."""

    def __init__(self, catalog: Catalog, baselines: Baselines, fp_budget: float) -> None:
        self._fired_before: dict[tuple[str, str], frozenset[str]] = {}
        self.baselines = baselines
        self.fp_budget = fp_budget
        #: Per rate kind the catalog has, the span attributes its modes' detect conditions
        #: read.
        self._rate_signals = {
            kind: signals
            for kind in RATE_KINDS
            if (
                signals := frozenset(
                    c.signal
                    for m in catalog.modes
                    if m.kind == kind
                    for c in m.detect
                    if c.signal not in SPAN_SIGNALS
                )
            )
        }
        # The lower fence of the usual spread before the trace being judged, per
        # (service, operation, kind) that fired in it; None while not learned.
        self._fences: dict[tuple[str, str, str], float | None] = {}

    def count(self, raw: Found, view: TraceView) -> None:
        """Count the trace's calls that could fire a :data:`RATE_KINDS` mode into their
        operation's rate and usual spread, before it is judged (as ``ErrorRules.count``
        counts errors): a firing is judged against what came before it."""
        self._fences = {}
        if not self._rate_signals:
            return
        fired = {(id(span), ev.mode.kind) for span, ev in raw}
        baselines = self.baselines
        for kind, signals in self._rate_signals.items():
            spread_signal = RATE_KINDS[kind]
            for span in view.order:
                attrs = span.attrs
                if not attrs or signals.isdisjoint(attrs):
                    continue
                key = (*view.key(span), kind)
                hit = (id(span), kind) in fired
                if hit and key not in self._fences:
                    self._fences[key] = self._fence(key)
                burst = baselines.count_signal(key, hit, self.fp_budget)
                value = attrs.get(spread_signal)
                if not burst and isinstance(value, float) and math.isfinite(value):
                    baselines.learn_later(key, value)

    def _fence(self, key: tuple[str, str, str]) -> float | None:
        """The median less :data:`SPREADS` robust standard deviations of the values
        learned for ``key``, or None before ``min_baseline_samples`` of them."""
        centre = self.baselines.centre(key)
        if centre is None:
            return None
        median, spread = centre
        return median - SPREADS * spread

    def drop_background(self, found: Found, view: TraceView) -> Found:
        """``found`` without the :data:`RATE_KINDS` evidence that is its operation's
        background: within its usual spread, and not in a burst."""
        if not self._fences:
            return found
        kept: Found = []
        for span, ev in found:
            kind = ev.mode.kind
            if kind in self._rate_signals:
                key = (*view.key(span), kind)
                fence = self._fences.get(key)
                value = span.attrs.get(RATE_KINDS[kind])
                usual = fence is not None and isinstance(value, float) and value >= fence
                if usual and not self.baselines.signal_burst(key):
                    continue
            kept.append((span, ev))
        return kept

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """:meth:`remember` of traces in which the operations ``keys`` fired nothing."""
        if self._fired_before:
            for key in keys:
                self._fired_before.pop(key, None)

    def drop_isolated(self, found: Found, view: TraceView) -> Found:
        """``found`` without its transient ``dl.*`` evidence."""
        if not found:
            return found
        fired: dict[tuple[str, str, str], list[int]] = {}
        for i, (span, ev) in enumerate(found):
            if from_ml_signal(ev):
                fired.setdefault((*view.key(span), ev.mode.id), []).append(i)
        drop = {
            where[0]
            for (service, op, mode), where in fired.items()
            if len(where) == 1
            and view.op_counts[(service, op)] >= ISOLATED_AMONG
            and mode not in self._fired_before.get((service, op), ())
        }
        if not drop:
            return found
        return [item for i, item in enumerate(found) if i not in drop]

    def remember(self, raw: Found, view: TraceView) -> None:
        """End of a trace: the modes its operations fired, transient or not."""
        if not raw and not self._fired_before:
            return  # nothing fired, before or now: the common healthy trace
        fired: dict[tuple[str, str], set[str]] = {}
        for span, ev in raw:
            if from_ml_signal(ev):
                fired.setdefault(view.key(span), set()).add(ev.mode.id)
        for key in view.op_counts:
            modes = fired.get(key)
            if not modes:
                self._fired_before.pop(key, None)
            elif key in self._fired_before or len(self._fired_before) < MAX_KEYS:
                self._fired_before[key] = frozenset(modes)

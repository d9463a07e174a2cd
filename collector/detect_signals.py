"""otel-dl signal detection: when a ``dl.*`` mode that fired is a symptom, not a blip.

A ``dl.*`` mode (drift, quality, schema, freshness, model change, confidence) that fired
is a symptom of its trace, except a transient one (:meth:`SignalRules.drop_isolated`):
a mode that fired on a single span of an operation run at least :data:`ISOLATED_AMONG`
times in the trace (one batch of many), and not in that operation's previous trace. A
drifted source shows on batch after batch or trace after trace; one drift ``alert`` on
one batch is a blip.
"""

from __future__ import annotations

from collections.abc import Iterable

from .baselines import MAX_KEYS
from .decision import Evidence, from_ml_signal
from .decode import SpanRecord
from .spans import TraceView

#: Spans of one operation in a trace from which a mode fired on one of them only is a blip.
ISOLATED_AMONG = 3

Found = list[tuple[SpanRecord, Evidence]]


class SignalRules:
    """Remembers which ``dl.*`` modes each operation fired in its last trace."""

    def __init__(self) -> None:
        self._fired_before: dict[tuple[str, str], frozenset[str]] = {}

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

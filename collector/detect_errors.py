"""Error detection: which errors of a trace are a fault, and which are noise.

An error is a span in error status, with a string ``error.type``, or with an exception
event; a span other than a client span that answered HTTP 4xx is not in error (a bad
request is its client's mistake, as OpenTelemetry's HTTP conventions say). Of the errors
the catalog's modes fired on, :meth:`ErrorRules.judge` keeps:

- those of an operation whose errors come in a *burst* (see
  :class:`~.baselines.Calls`), whether or not the entry failed: an outage behind a
  fallback fails no entry;
- in a trace whose entry failed, an error no retry recovered (a later call of the same
  operation under the same parent that succeeded) that reached the entry (it and every
  span above it are in error) or is unusual for its operation (usual error rate at most
  ``fp_budget``, judged on the rate before this trace). An error off that chain, and a
  4xx answer on a client span, are *weak*: kept at :data:`OFF_CHAIN` of their strength,
  and they neither explain nor outrank full evidence.

Everything else (a retried error, an error in a trace whose entry succeeded, an
operation's background rate) is noise, whatever else the trace shows.
"""

from __future__ import annotations

from .baselines import Baselines
from .decision import Evidence
from .decode import SpanRecord
from .spans import CLIENT, HTTP_STATUS_ATTRIBUTES, TraceView

#: Strength of weak error evidence, against that of an error on the failure's path.
OFF_CHAIN = 0.3


def client_mistake(span: SpanRecord) -> bool:
    """Whether the span answered with an HTTP 4xx (a bad request, a missing resource)."""
    code = next((v for k in HTTP_STATUS_ATTRIBUTES if (v := span.attrs.get(k)) is not None), None)
    return isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500


def error_status(span: SpanRecord) -> bool:
    """The catalog's ``status.error`` signal: error status or a string ``error.type``."""
    return span.status_error or "error.type" in span.attrs


class ErrorRules:
    """Judges error evidence against the operation's usual error rate and the trace."""

    def __init__(self, baselines: Baselines, fp_budget: float) -> None:
        self.baselines = baselines
        self.fp_budget = fp_budget
        # Usual error rates before the trace being judged, of its operations in error.
        self._rates_before: dict[tuple[str, str], float | None] = {}

    def errored(self, span: SpanRecord) -> bool:
        if not (error_status(span) or span.exception):
            return False
        # A span that answered 4xx is not in error: it is its client's mistake.
        return span.kind == CLIENT or not client_mistake(span)

    def burst(self, span: SpanRecord, view: TraceView) -> bool:
        """Whether the span's operation fails far more than usual in its recent calls."""
        return self.baselines.burst(view.key(span))

    def judge(
        self, span: SpanRecord, ev: Evidence, view: TraceView, failed: bool
    ) -> Evidence | None:
        """The evidence to keep for an error, weakened, or None for noise."""
        if self.burst(span, view):
            return ev
        if not failed or self._retried(span, view):
            return None
        on_chain = self._on_error_chain(span, view)
        if not (on_chain or self._unusual(span, view)):
            return None  # the operation's background rate, off the failure's path
        if not on_chain or client_mistake(span):
            return Evidence(ev.mode, ev.strength * OFF_CHAIN, ev.reason, ev.signal, True)
        return ev

    def count(self, view: TraceView) -> None:
        """Count the trace's calls into their operations' error rates and recent windows,
        before it is judged: a burst is judged with this trace's calls, an error's
        usualness on the rate before them, not a rate it already raised."""
        self._rates_before = {}
        for span in view.order:
            key = view.key(span)
            errored = self.errored(span)
            if errored and key not in self._rates_before:
                self._rates_before[key] = self.baselines.error_rate(key)
            self.baselines.count_call(key, errored, self.fp_budget)

    def _on_error_chain(self, span: SpanRecord, view: TraceView) -> bool:
        """Whether the error reached the entry: every span from ``span`` up to the trace's
        top is in error. A retried error under a parent that succeeded stops the chain."""
        seen: set[bytes] = set()
        cur: SpanRecord | None = span
        while cur is not None and cur.span_id not in seen:
            if not self.errored(cur):
                return False
            seen.add(cur.span_id)
            cur = view.by_id.get(cur.parent_id) if cur.parent_id else None
        return True

    def _unusual(self, span: SpanRecord, view: TraceView) -> bool:
        """An error above its operation's usual error rate: a rare error, a burst of
        them, or an operation not yet learned (one never seen before may be the fault)."""
        key = view.key(span)
        rate = self._rates_before.get(key, self.baselines.error_rate(key))
        return rate is None or rate <= self.fp_budget or self.baselines.burst(key)

    def _retried(self, span: SpanRecord, view: TraceView) -> bool:
        """Whether a later call of the same operation under the same parent succeeded."""
        op = view.op(span)
        return any(
            s is not span
            and s.start >= span.start
            and s.service == span.service
            and view.op(s) == op
            and not self.errored(s)
            for s in view.children.get(span.parent_id, ())
        )

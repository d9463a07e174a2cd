"""What attribution produces: the evidence a span gave, and the decision on a trace.

An :class:`Evidence` is the failure mode one span fired and why; a :class:`Decision` is
the attribution of one whole trace (see attribute.py), which enrich.py writes onto its
spans and store.py records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from otel_dl import semconv

from .catalog import FailureMode
from .decode import SpanRecord

#: Kinds that usually show a fault rather than cause it; discounted when explained.
SYMPTOM_KINDS = frozenset(
    {semconv.FAULT_KIND_LOW_CONFIDENCE, semconv.FAULT_KIND_LATENCY, semconv.FAULT_KIND_ERROR}
)
ERROR_SIGNALS = frozenset({"status.error", "exception"})


@dataclass
class Evidence:
    """The mode a span fired and why."""

    mode: FailureMode
    strength: float
    reason: str
    #: The signal of the detect condition that fired (``duration``, ``status.error``...).
    signal: str = ""
    #: Kept, but weaker than the evidence on the failure's path (see detect_errors.py): it
    #: neither explains the anomalies after it nor outranks them.
    weak: bool = False


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
    #: Services with an anomalous span in the trace, symptom or not (a slow link counted
    #: on its callee): the spectrum incidents are ranked on (see incidents.py).
    anomalous: tuple[str, ...] = ()

    @property
    def implicated(self) -> tuple[str, ...]:
        """The services of the ranked spans, then those of the symptom spans."""
        out = dict.fromkeys(s.service for s in self.ranked_spans)
        out.update(dict.fromkeys(s.service for s in self.symptoms))
        return tuple(out)


def from_ml_signal(ev: Evidence) -> bool:
    """Whether the evidence comes from an otel-dl signal (drift, quality, schema, freshness,
    model, confidence) rather than an error or a duration."""
    return ev.signal not in ERROR_SIGNALS and ev.signal != "duration"

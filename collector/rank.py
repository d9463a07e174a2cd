"""Ranking within one trace: which of the kept evidence is the root cause.

The evidence comes in data-flow order (see :class:`~.spans.TraceView`): everything
before a span is its *upstream*. An anomalous span with other anomalous work upstream is
*explained* and its score discounted: a symptom kind (low confidence, latency, error)
by :data:`EXPLAINED_SYMPTOM` for any upstream anomaly, a cause kind by
:data:`EXPLAINED_CAUSE` and only for an upstream cause kind. Weak evidence (see
detect_errors.py) explains nothing. The highest score is the root cause (at equal
scores full evidence, then a cause kind, then the earliest); when the root span has no
exception event but deeper spans of its service fired the same mode with one, the
deepest is the root instead. The services of the ranked spans are the candidates.

Ranking across many traces, for incidents, is in incidents.py.
"""

from __future__ import annotations

from otel_dl import semconv

from .decision import SYMPTOM_KINDS, Decision, Evidence
from .decode import SpanRecord
from .spans import TraceView

EXPLAINED_SYMPTOM = 0.3
EXPLAINED_CAUSE = 0.7
MAX_CANDIDATES = 5


def rank(
    trace_id: bytes,
    found: list[tuple[SpanRecord, Evidence]],
    view: TraceView,
    blame: dict[int, str],
    link_callers: list[SpanRecord],
    anomalous: tuple[str, ...] = (),
) -> Decision:
    """The faulty decision of a trace from its kept evidence (at least one item)."""
    scored: list[tuple[float, int, SpanRecord, Evidence]] = []
    upstream = cause_upstream = False
    for position, (span, ev) in enumerate(found):
        score = ev.strength
        if ev.mode.kind in SYMPTOM_KINDS:
            if upstream:
                score *= EXPLAINED_SYMPTOM
        # Only a cause explains a cause: an upstream latency blip or error (the ASGI
        # spans run before the handler) does not account for stale data.
        elif cause_upstream:
            score *= EXPLAINED_CAUSE
        if not ev.weak:
            upstream = True
            cause_upstream = cause_upstream or ev.mode.kind not in SYMPTOM_KINDS
        scored.append((score, position, span, ev))
    scored.sort(key=lambda t: (-t[0], t[3].weak, t[3].mode.kind in SYMPTOM_KINDS, t[1]))
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
            depth = view.depths()
            pick = max(raised, key=lambda t: (depth.get(t[2].span_id, 0), -t[1]))
            scored.remove(pick)
            scored.insert(0, (best_score, pick[1], pick[2], pick[3]))
            root, ev = pick[2], pick[3]
    total = sum(t[0] for t in scored)
    candidates = list(dict.fromkeys(span.service for _, _, span, _ in scored))
    symptoms = [s for _, _, s, _ in scored[1:]]
    symptoms.extend(s for s in link_callers if s is not root and s not in symptoms)
    entry = view.entry
    if (
        entry is not None
        and entry is not root
        and all(s is not entry for s in symptoms)
        and (entry.status_error or entry.exception)
    ):
        symptoms.append(entry)
    return Decision(
        trace_id,
        fault=True,
        root=root,
        mode=ev.mode,
        score=round(ev.strength * best_score / total, 4),
        candidates=tuple(candidates[:MAX_CANDIDATES]),
        symptoms=tuple(symptoms),
        trace_root=entry,
        evidence=f"{root.service}/{root.name}: {ev.reason}",
        ranked_spans=tuple(s for _, _, s, _ in scored),
        blame=blame.get(id(root), semconv.FAULT_BLAME_SELF),
        anomalous=anomalous,
    )

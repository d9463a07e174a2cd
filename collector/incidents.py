"""Incidents: attributed traces grouped in time, with services ranked over many traces.

A real fault spans many traces over minutes, and one trace can point at the wrong
service (noise, a stalled exporter). :func:`query_incidents` reads the fault store and
groups faulty traces whose starts lie less than ``gap`` seconds apart into one
:class:`Incident`, then ranks the services over all of its traces against the healthy
traffic of the window and of the ``baseline`` seconds before it::

    for incident in query_incidents(Path("otel-dl.sqlite"), since=time.time() - 3600):
        print(incident.start, incident.faulty, [r.service for r in incident.ranking[:3]])

The ranking is spectrum-based fault localisation, the step TraceRCA and MicroRank share
and that RCAEval keeps among its simple strong baselines, scored with Ochiai: a service
ranks high when it is implicated in the incident's faulty traces (as a ranked candidate
or as a symptom, see ``Decision.implicated``) and seldom anomalous in healthy traces::

    score(s) = ef_w(s) / sqrt(F × (ef(s) + ep(s)))

where ``F`` is the incident's faulty traces, ``ef`` those implicating ``s``, ``ef_w`` the
same weighted by 1 / (position of ``s`` in each trace's ranking), and ``ep`` the healthy
traces of the window and its baseline in which a span of ``s`` was anomalous anyway (a
service that fails in the background, a span that is often slow without harm). A
service first in every faulty trace and never anomalous otherwise scores 1.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .store import FaultRow, query_faults, query_spectrum

#: Seconds between two faulty traces that still belong to one incident.
DEFAULT_GAP = 60.0
#: Seconds of healthy traffic before an incident its ranking is compared with.
DEFAULT_BASELINE = 3600.0
_LATEST = 5


@dataclass(frozen=True)
class ServiceRank:
    """One ranked service of an incident."""

    service: str
    score: float
    #: Faulty traces of the incident that implicate the service.
    faulty: int
    #: Healthy traces of the window and baseline where the service was anomalous anyway.
    background: int

    def as_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class Incident:
    """Faulty traces close in time, and the services most likely to have caused them."""

    start: float
    end: float
    faulty: int
    #: Healthy traces that started within ``[start, end]`` (widened to 10 s buckets).
    healthy: int = 0
    ranking: tuple[ServiceRank, ...] = ()
    kinds: dict[str, int] = field(default_factory=dict)
    blames: dict[str, int] = field(default_factory=dict)
    latest_traces: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            "start": self.start,
            "end": self.end,
            "faulty": self.faulty,
            "healthy": self.healthy,
            "ranking": [r.as_json() for r in self.ranking],
            "kinds": self.kinds,
            "blames": self.blames,
            "latest_traces": list(self.latest_traces),
        }


def group(faults: list[FaultRow], gap: float = DEFAULT_GAP) -> list[list[FaultRow]]:
    """Faults split where two consecutive trace starts lie ``gap`` seconds or more apart,
    oldest group first."""
    groups: list[list[FaultRow]] = []
    for row in sorted(faults, key=lambda r: r.trace_time):
        if groups and row.trace_time - groups[-1][-1].trace_time < gap:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def rank(faults: list[FaultRow], background: dict[str, tuple[int, int]]) -> list[ServiceRank]:
    """Services ranked by Ochiai over ``faults`` against ``background`` (healthy traces
    per service, as :func:`~.store.query_spectrum` returns): best first, ties by name."""
    weighted: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for row in faults:
        for position, service in enumerate(row.implicated or row.candidates, start=1):
            weighted[service] = weighted.get(service, 0.0) + 1.0 / position
            counts[service] += 1
    total = len(faults)
    ranked = []
    for service, ef_w in weighted.items():
        ep = background.get(service, (0, 0))[1]
        score = ef_w / math.sqrt(total * (counts[service] + ep))
        ranked.append(ServiceRank(service, round(score, 4), counts[service], ep))
    ranked.sort(key=lambda r: (-r.score, r.service))
    return ranked


def query_incidents(
    path: Path,
    since: float = 0.0,
    until: float | None = None,
    gap: float = DEFAULT_GAP,
    baseline: float = DEFAULT_BASELINE,
    limit: int = 100_000,
) -> list[Incident]:
    """Incidents of the faulty traces that started in ``[since, until]``, newest first."""
    faults = query_faults(path, since, until, limit=limit, by_trace_time=True)
    incidents = []
    for rows in group(faults, gap):
        start, end = rows[0].trace_time, rows[-1].trace_time
        window = query_spectrum(path, start, end)
        incidents.append(
            Incident(
                start=start,
                end=end,
                faulty=len(rows),
                healthy=window.get("", (0, 0))[0],
                ranking=tuple(rank(rows, query_spectrum(path, start - baseline, end))),
                kinds=dict(Counter(r.kind for r in rows).most_common()),
                blames=dict(Counter(r.blame for r in rows).most_common()),
                latest_traces=tuple(r.trace_id for r in reversed(rows[-_LATEST:])),
            )
        )
    incidents.reverse()
    return incidents

"""The embedded SQLite store: attributed faults, plus what the HTML report draws.

The collector writes through :class:`FaultStore`; the report CLI and the API read
through :func:`query_faults` and friends, each opening its own connection::

    store = FaultStore(Path("otel-dl.sqlite"))
    store.record(decisions, traces)        # one transaction per decision batch
    rows = query_faults(Path("otel-dl.sqlite"), since=time.time() - 3600)

Tables:

- ``faults``: one row per attributed trace: trace id, time, root-cause service, span
  id and name, kind, mode, origin, score, severity, owner, runbook, evidence summary and
  candidate services (JSON).
- ``signals``: drift score and mean confidence samples per service over time, at most
  one per service, signal and second, for the report's timelines.
- ``edges``: caller service → callee service span counts, for the service graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from otel_dl import semconv

from .assemble import SpanRecord
from .attribute import Decision

_SCHEMA = """
CREATE TABLE IF NOT EXISTS faults (
    id INTEGER PRIMARY KEY,
    trace_id TEXT NOT NULL,
    time REAL NOT NULL,
    service TEXT NOT NULL,
    span_id TEXT NOT NULL,
    span_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode TEXT NOT NULL,
    origin TEXT NOT NULL,
    score REAL NOT NULL,
    severity TEXT NOT NULL,
    owner TEXT NOT NULL,
    runbook TEXT NOT NULL,
    evidence TEXT NOT NULL,
    candidates TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS faults_time ON faults (time);
CREATE INDEX IF NOT EXISTS faults_service_time ON faults (service, time);
CREATE INDEX IF NOT EXISTS faults_kind_time ON faults (kind, time);
CREATE TABLE IF NOT EXISTS signals (
    time REAL NOT NULL,
    service TEXT NOT NULL,
    signal TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS signals_time ON signals (time);
CREATE TABLE IF NOT EXISTS edges (
    caller TEXT NOT NULL,
    callee TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (caller, callee)
);
"""
_TIMELINE_SIGNALS = (semconv.DL_DRIFT_SCORE, semconv.DL_CONFIDENCE_MEAN)


@dataclass(frozen=True)
class FaultRow:
    """One attributed fault as stored."""

    trace_id: str
    time: float
    service: str
    span_id: str
    span_name: str
    kind: str
    mode: str
    origin: str
    score: float
    severity: str
    owner: str
    runbook: str
    evidence: str
    candidates: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {**self.__dict__, "candidates": list(self.candidates)}


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    return conn


def _create_private(path: Path) -> None:
    """Create ``path`` readable by its owner only (SQLite gives its -wal and -shm files
    the same mode), and tighten a store left by an older version."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class FaultStore:
    """Writer side of the store, used by the collector's decision loop.

    The file is created with mode 0600: it names services, spans and owners.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        _create_private(path)
        self._conn = _connect(path)
        self._lock = threading.Lock()
        self._last_sample: dict[tuple[str, str], int] = {}

    def record(self, batch: Iterable[tuple[Decision, Sequence[SpanRecord]]]) -> None:
        """Store each faulty decision, signal samples and service edges of a batch."""
        faults = []
        samples = []
        edges: dict[tuple[str, str], int] = {}
        for decision, spans in batch:
            by_id = {s.span_id: s for s in spans}
            for span in spans:
                parent = by_id.get(span.parent_id)
                if parent is not None and parent.service != span.service:
                    key = (parent.service, span.service)
                    edges[key] = edges.get(key, 0) + 1
                for signal in _TIMELINE_SIGNALS:
                    value = span.attrs.get(signal)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        second = int(span.end / 1e9)
                        if self._last_sample.get((span.service, signal)) != second:
                            self._last_sample[(span.service, signal)] = second
                            samples.append((span.end / 1e9, span.service, signal, float(value)))
            if decision.fault and decision.root is not None and decision.mode is not None:
                root, mode = decision.root, decision.mode
                faults.append(
                    (
                        decision.trace_id.hex(),
                        decision.decided_at,
                        root.service,
                        root.span_id.hex(),
                        root.name,
                        mode.kind,
                        mode.id,
                        mode.origin,
                        decision.score,
                        mode.severity,
                        mode.owner,
                        mode.runbook,
                        decision.evidence,
                        json.dumps(list(decision.candidates)),
                    )
                )
        if not (faults or samples or edges):
            return
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO faults (trace_id, time, service, span_id, span_name, kind, mode, "
                "origin, score, severity, owner, runbook, evidence, candidates) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                faults,
            )
            self._conn.executemany(
                "INSERT INTO signals (time, service, signal, value) VALUES (?, ?, ?, ?)", samples
            )
            self._conn.executemany(
                "INSERT INTO edges (caller, callee, count) VALUES (?, ?, ?) "
                "ON CONFLICT (caller, callee) DO UPDATE SET count = count + excluded.count",
                [(a, b, n) for (a, b), n in edges.items()],
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _open_read(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(
            f"no fault store at {path}; run the collector with --store {path} first"
        )
    return _connect(path)


def query_faults(
    path: Path,
    since: float = 0.0,
    until: float | None = None,
    limit: int = 1000,
    service: str | None = None,
    kind: str | None = None,
) -> list[FaultRow]:
    """Faults in ``[since, until]``, newest first, of ``service`` and ``kind`` if given.

    The filters are in the query, so ``limit`` counts matching rows: filtering the newest
    ``limit`` rows afterwards returned nothing for a service whose faults were older.
    """
    # Only these fixed clauses are joined into the SQL; every value is a parameter.
    where = ["time >= ?", "time <= ?"]
    params: list[object] = [since, until if until is not None else float("inf")]
    if service is not None:
        where.append("service = ?")
        params.append(service)
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    conn = _open_read(path)
    try:
        rows = conn.execute(
            "SELECT trace_id, time, service, span_id, span_name, kind, mode, origin, score, "
            "severity, owner, runbook, evidence, candidates FROM faults "
            f"WHERE {' AND '.join(where)} ORDER BY time DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
    finally:
        conn.close()
    names = [f.name for f in dataclasses.fields(FaultRow)]
    return [
        FaultRow(**{**dict(zip(names, r, strict=True)), "candidates": tuple(json.loads(r[13]))})
        for r in rows
    ]


def query_signals(path: Path, since: float = 0.0) -> list[tuple[float, str, str, float]]:
    """Signal samples ``(time, service, signal, value)`` since ``since``, oldest first."""
    conn = _open_read(path)
    try:
        return conn.execute(
            "SELECT time, service, signal, value FROM signals WHERE time >= ? ORDER BY time",
            (since,),
        ).fetchall()
    finally:
        conn.close()


def query_edges(path: Path) -> list[tuple[str, str, int]]:
    """Service call edges ``(caller, callee, spans)``."""
    conn = _open_read(path)
    try:
        return conn.execute("SELECT caller, callee, count FROM edges").fetchall()
    finally:
        conn.close()

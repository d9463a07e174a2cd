"""The embedded SQLite store: attributed faults, plus what the HTML report draws.

The collector writes through :class:`FaultStore`; the report CLI and the API read
through :func:`query_faults` and friends, each opening its own connection::

    store = FaultStore(Path("otel-dl.sqlite"))
    store.record(decisions, traces)        # one transaction per decision batch
    rows = query_faults(Path("otel-dl.sqlite"), since=time.time() - 3600)

Tables:

- ``faults``: one row per attributed trace: trace id, time (of the decision), root-cause
  service, span id and name, kind, mode, origin, score, severity, owner, runbook,
  evidence summary, candidate services (JSON), blame (``dl.fault.blame``), the trace's
  start (``trace_time``) and the implicated services (candidates, then the services of
  the symptom spans; JSON).
- ``spectrum``: per 10 s of trace start time and service, the healthy traces the service
  took part in and those where one of its spans was anomalous anyway (service ``""``:
  all healthy traces), the baseline incidents are ranked against (see incidents.py).
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

from .decision import Decision
from .decode import SpanRecord

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
    candidates TEXT NOT NULL,
    blame TEXT NOT NULL DEFAULT 'self',
    trace_time REAL NOT NULL DEFAULT 0,
    implicated TEXT NOT NULL DEFAULT '[]'
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
CREATE TABLE IF NOT EXISTS spectrum (
    bucket INTEGER NOT NULL,
    service TEXT NOT NULL,
    traces INTEGER NOT NULL,
    anomalous INTEGER NOT NULL,
    PRIMARY KEY (bucket, service)
);
CREATE TABLE IF NOT EXISTS edges (
    caller TEXT NOT NULL,
    callee TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (caller, callee)
);
"""
_TIMELINE_SIGNALS = (semconv.DL_DRIFT_SCORE, semconv.DL_CONFIDENCE_MEAN)
#: Columns added to ``faults`` after its first release, added to an older store on open.
_ADDED_COLUMNS = (
    ("blame", "TEXT NOT NULL DEFAULT 'self'"),
    ("trace_time", "REAL NOT NULL DEFAULT 0"),
    ("implicated", "TEXT NOT NULL DEFAULT '[]'"),
)
#: Seconds of trace start time per ``spectrum`` row.
SPECTRUM_BUCKET = 10
_FAULT_COLUMNS = (
    "trace_id, time, service, span_id, span_name, kind, mode, origin, score, severity, "
    "owner, runbook, evidence, candidates, blame, trace_time, implicated"
)


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
    blame: str = semconv.FAULT_BLAME_SELF
    #: Start of the trace's entry span, unix seconds (0 in a store older than the column).
    trace_time: float = 0.0
    implicated: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            **self.__dict__,
            "candidates": list(self.candidates),
            "implicated": list(self.implicated),
        }


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(faults)")}
    for name, spec in _ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE faults ADD COLUMN {name} {spec}")
    conn.execute("CREATE INDEX IF NOT EXISTS faults_trace_time ON faults (trace_time)")
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
        spectrum: dict[tuple[int, str], list[int]] = {}
        for decision, spans in batch:
            by_id = {s.span_id: s for s in spans}
            trace_time = _trace_time(decision, spans)
            if not decision.fault:
                bucket = int(trace_time // SPECTRUM_BUCKET)
                anomalous = set(decision.anomalous)
                for service in {"", *(s.service for s in spans)}:
                    row = spectrum.setdefault((bucket, service), [0, 0])
                    row[0] += 1
                    row[1] += service in anomalous
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
                        decision.blame,
                        trace_time,
                        json.dumps(list(decision.implicated)),
                    )
                )
        if not (faults or samples or edges or spectrum):
            return
        with self._lock, self._conn:
            self._conn.executemany(
                f"INSERT INTO faults ({_FAULT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                faults,
            )
            self._conn.executemany(
                "INSERT INTO spectrum (bucket, service, traces, anomalous) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (bucket, service) DO UPDATE SET traces = traces + excluded.traces, "
                "anomalous = anomalous + excluded.anomalous",
                [(b, svc, n, a) for (b, svc), (n, a) in spectrum.items()],
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


def _trace_time(decision: Decision, spans: Sequence[SpanRecord]) -> float:
    """When the trace started, unix seconds: its entry span's start, else its first span's."""
    if decision.trace_root is not None:
        return decision.trace_root.start / 1e9
    return min((s.start for s in spans), default=0) / 1e9


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
    by_trace_time: bool = False,
) -> list[FaultRow]:
    """Faults in ``[since, until]``, newest first, of ``service`` and ``kind`` if given.

    The window is on the decision's time, or with ``by_trace_time`` on the trace's start.
    The filters are in the query, so ``limit`` counts matching rows: filtering the newest
    ``limit`` rows afterwards returned nothing for a service whose faults were older.
    """
    column = "trace_time" if by_trace_time else "time"
    # Only these fixed clauses are joined into the SQL; every value is a parameter.
    where = [f"{column} >= ?", f"{column} <= ?"]
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
            f"SELECT {_FAULT_COLUMNS} FROM faults "
            f"WHERE {' AND '.join(where)} ORDER BY {column} DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
    finally:
        conn.close()
    names = [f.name for f in dataclasses.fields(FaultRow)]
    out = []
    for r in rows:
        row = dict(zip(names, r, strict=True))
        row["candidates"] = tuple(json.loads(row["candidates"]))
        row["implicated"] = tuple(json.loads(row["implicated"]))
        out.append(FaultRow(**row))
    return out


def query_spectrum(path: Path, since: float, until: float) -> dict[str, tuple[int, int]]:
    """Healthy traces started in ``[since, until]``, per service: ``(traces it took part
    in, traces where it was anomalous)``; service ``""``: ``(all healthy traces, 0)``.
    The window is widened to whole :data:`SPECTRUM_BUCKET` s buckets."""
    conn = _open_read(path)
    try:
        rows = conn.execute(
            "SELECT service, SUM(traces), SUM(anomalous) FROM spectrum "
            "WHERE bucket >= ? AND bucket <= ? GROUP BY service",
            (int(since // SPECTRUM_BUCKET), int(until // SPECTRUM_BUCKET)),
        ).fetchall()
    finally:
        conn.close()
    return {service: (int(n), int(a)) for service, n, a in rows}


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

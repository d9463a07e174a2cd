"""The collector's HTTP API: attributed faults as JSON and its own Prometheus metrics.

Served on ``--api-port`` by :func:`api_routes`:

- ``GET /api/faults``: faults from the store, newest first, as
  ``{"faults": [{trace_id, time, service, span_id, span_name, kind, mode, origin,
  score, severity, owner, runbook, evidence, candidates, blame, trace_time,
  implicated}, ...]}``. Query parameters: ``since`` and ``until`` (unix seconds, or
  ``since=15m`` / ``2h`` / ``1d`` back from now), ``limit`` (default 100, at most
  10000), ``service`` and ``kind`` filters.
- ``GET /api/incidents``: faulty traces grouped into incidents, newest first, each with
  its services ranked over all its traces against the healthy traffic before it (see
  incidents.py), as ``{"incidents": [{start, end, faulty, healthy, ranking: [{service,
  score, faulty, background}, ...], kinds, blames, latest_traces}, ...]}``. Query
  parameters: ``since`` and ``until`` (trace start times, as above), ``gap`` (seconds
  between two faulty traces of one incident, default 60) and ``baseline`` (seconds of
  healthy traffic before an incident to compare with, default 3600).
- ``GET /metrics``: the Prometheus text exposition of :class:`~.metrics.CollectorMetrics`.

With ``auth_token`` set, both need ``Authorization: Bearer <token>`` (401 otherwise).
Faults carry names and aggregates only (services, spans, modes, scores), never
attribute values a sender put on its spans.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .incidents import DEFAULT_BASELINE, DEFAULT_GAP, query_incidents
from .metrics import CollectorMetrics
from .security import UNAUTHENTICATED_MESSAGE, BearerAuth
from .store import query_faults

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_MAX_SPAN_SECONDS = 10 * 365 * 86400.0


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds from ``text``: a number, or a duration back from now (``15m``, ``2h``)."""
    text = text.strip()
    now = time.time() if now is None else now
    if text and text[-1] in _UNITS:
        return now - float(text[:-1]) * _UNITS[text[-1]]
    return float(text)


def api_routes(
    app: web.Application,
    store: Path | None,
    metrics: CollectorMetrics,
    auth: BearerAuth | None = None,
) -> None:
    """Add ``/api/faults``, ``/api/incidents`` and ``/metrics`` to an aiohttp application."""
    if auth is not None and auth.enabled:
        checker = auth

        @web.middleware
        async def require_token(request: web.Request, handler):  # type: ignore[no-untyped-def]
            if not checker.allows(request.headers.get("Authorization")):
                return web.json_response(
                    {"error": UNAUTHENTICATED_MESSAGE},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)

        app.middlewares.append(require_token)

    def no_store() -> web.Response:
        return web.json_response(
            {"error": "the fault store is disabled; start the collector with --store PATH"},
            status=404,
        )

    def window(q: Mapping[str, str]) -> tuple[float, float | None]:
        """(since, until) of a query; ValueError when either cannot be read."""
        return parse_since(q.get("since", "0")), parse_since(q["until"]) if "until" in q else None

    async def faults(request: web.Request) -> web.Response:
        if store is None:
            return no_store()
        q = request.query
        try:
            since, until = window(q)
            limit = min(10_000, max(1, int(q.get("limit", "100"))))
        except ValueError:
            return web.json_response(
                {"error": "since/until must be unix seconds or like 15m, 2h, 1d; limit an integer"},
                status=400,
            )
        service, kind = q.get("service"), q.get("kind")
        rows = await asyncio.get_running_loop().run_in_executor(
            None, lambda: query_faults(store, since, until, limit, service, kind)
        )
        return web.json_response({"faults": [r.as_json() for r in rows]})

    async def incidents(request: web.Request) -> web.Response:
        if store is None:
            return no_store()
        q = request.query
        try:
            since, until = window(q)
            gap = float(q.get("gap", DEFAULT_GAP))
            baseline = float(q.get("baseline", DEFAULT_BASELINE))
            # At most ten years: a window past that (or inf) does not fit the store's
            # integer nanoseconds.
            if not (0 < gap <= _MAX_SPAN_SECONDS and 0 <= baseline <= _MAX_SPAN_SECONDS):
                raise ValueError("gap, baseline")
        except ValueError:
            return web.json_response(
                {
                    "error": "since/until must be unix seconds or like 15m, 2h, 1d; gap a "
                    "number of seconds > 0, baseline a number of seconds >= 0, both at most "
                    f"{_MAX_SPAN_SECONDS:.0f} (ten years)"
                },
                status=400,
            )
        found = await asyncio.get_running_loop().run_in_executor(
            None, lambda: query_incidents(store, since, until, gap, baseline)
        )
        return web.json_response({"incidents": [i.as_json() for i in found]})

    async def prometheus(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/api/faults", faults)
    app.router.add_get("/api/incidents", incidents)
    app.router.add_get("/metrics", prometheus)

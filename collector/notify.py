"""Webhook notifications of attributed faults, to the owner, off the pipeline's path.

Off unless the ``webhook_url`` option is set. :meth:`Notifier.notify` takes one fault
(the fields of the fault store's rows, see :func:`fault_from_decision`) and returns at
once: it checks the incident and the rate limit, puts the JSON payload on a bounded
queue and leaves delivery to the notifier's own thread::

    notifier = Notifier.from_config(config, metrics)        # None without webhook_url
    if notifier is not None:
        notifier.notify(fault_from_decision(decision), decision.trace_id.hex())
    ...
    notifier.close()

- **One notification per incident.** An incident is a (mode, service) pair; it stays
  open while its faults keep coming less than ``webhook_dedupe_window`` seconds apart,
  and its later faults are counted as ``duplicate``. An incident whose notification was
  lost is reopened by its next fault.
- **Rate limit.** At most ``webhook_max_per_minute`` notifications in any minute (a
  token bucket); the rest are dropped and counted as ``rate_limited``.
- **Retries.** A connection error, a timeout, HTTP 408, 429 or 5xx is retried
  ``webhook_retries`` times with exponential backoff (0.5 s doubling, at most 30 s, or
  the receiver's ``Retry-After``); any other status is final.
- **Never blocking.** A full queue drops the notification (``queue_full``); a receiver
  that stays down loses what was queued (``failed``). Every outcome is counted in
  ``otel_dl_collector_notifications_total{outcome}`` (metrics.py); losses are also
  logged, at most one line a minute.

The payload (``Content-Type: application/json``)::

    {"text": "[high] batch-scorer: data-drift (data_drift), owner data-platform ...",
     "kind": "data_drift", "mode": "data-drift", "origin": "internal",
     "service": "batch-scorer", "span_id": "...", "span_name": "dataloader.batch",
     "owner": "data-platform", "severity": "high", "mitigation": "...",
     "runbook": "file:///.../docs/runbooks/data-drift.md", "trace_id": "...",
     "trace_link": "http://jaeger:16686/trace/...", "score": 0.93,
     "evidence": "...", "candidates": ["batch-scorer"], "time": 1765000000.0}

``text`` makes it readable as it is by chat webhooks that show a ``text`` field;
``trace_link`` is null without a ``trace_link_template``.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import requests

from .config import CollectorConfig
from .metrics import CollectorMetrics
from .tracelink import render_trace_link

if TYPE_CHECKING:
    from .decision import Decision

_log = logging.getLogger(__name__)

#: Outcomes of ``otel_dl_collector_notifications_total``; the last two are losses.
OUTCOMES = ("sent", "duplicate", "rate_limited", "queue_full", "failed")
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_FIRST_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
#: Pending notifications before new ones are dropped.
DEFAULT_QUEUE_SIZE = 256
DEFAULT_TIMEOUT = 5.0
_LOG_INTERVAL = 60.0


def fault_from_decision(decision: Decision) -> dict[str, Any]:
    """The fault a faulty ``decision`` names, as :meth:`Notifier.notify` takes it."""
    root, mode = decision.root, decision.mode
    if root is None or mode is None:
        raise ValueError("a healthy decision names no fault")
    return {
        "kind": mode.kind,
        "mode": mode.id,
        "origin": mode.origin,
        "service": root.service,
        "span_id": root.span_id.hex(),
        "span_name": root.name,
        "owner": mode.owner,
        "severity": mode.severity,
        "mitigation": mode.mitigation,
        "runbook": mode.runbook,
        "score": float(decision.score),
        "evidence": decision.evidence,
        "candidates": list(decision.candidates),
        "time": decision.decided_at,
    }


def build_payload(
    fault: Mapping[str, Any], trace_id: str, trace_link_template: str | None = None
) -> dict[str, Any]:
    """The JSON body of one notification."""
    service, mode = str(fault.get("service", "")), str(fault.get("mode", ""))
    kind, owner = str(fault.get("kind", "")), str(fault.get("owner", ""))
    severity, runbook = str(fault.get("severity", "")), str(fault.get("runbook", ""))
    span_id = str(fault.get("span_id", ""))
    link = render_trace_link(trace_link_template, trace_id, span_id, service)
    text = f"[{severity}] {service}: {mode} ({kind}), owner {owner}. Runbook: {runbook}"
    if link is not None:
        text += f" Trace: {link}"
    return {
        "text": text,
        "kind": kind,
        "mode": mode,
        "origin": str(fault.get("origin", "")),
        "service": service,
        "span_id": span_id,
        "span_name": str(fault.get("span_name", "")),
        "owner": owner,
        "severity": severity,
        "mitigation": str(fault.get("mitigation", "")),
        "runbook": runbook,
        "trace_id": trace_id,
        "trace_link": link,
        "score": fault.get("score"),
        "evidence": str(fault.get("evidence", "")),
        "candidates": list(fault.get("candidates", ())),
        "time": fault.get("time", time.time()),
    }


class Notifier:
    """Posts one JSON notification per incident to a webhook, from its own thread."""

    def __init__(
        self,
        url: str,
        metrics: CollectorMetrics,
        *,
        trace_link_template: str | None = None,
        dedupe_window: float = 300.0,
        max_per_minute: int = 30,
        retries: int = 3,
        timeout: float = DEFAULT_TIMEOUT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> None:
        self.url = url
        self.trace_link_template = trace_link_template
        self.dedupe_window = dedupe_window
        self.max_per_minute = max_per_minute
        self.retries = retries
        self.timeout = timeout
        self._counter = metrics.notifications
        self._queue: queue.Queue[tuple[tuple[str, str], dict[str, Any]]] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        # (mode, service) -> monotonic time of the incident's latest fault, oldest first.
        self._incidents: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._tokens = float(max_per_minute)
        self._refilled = time.monotonic()
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._session = requests.Session()
        self._logged_at, self._lost_unlogged = -math.inf, 0
        self._thread = threading.Thread(target=self._run, name="otel-dl-notifier", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: CollectorConfig, metrics: CollectorMetrics) -> Notifier | None:
        """The notifier ``config`` asks for, or None when no ``webhook_url`` is set."""
        if config.webhook_url is None:
            return None
        return cls(
            config.webhook_url,
            metrics,
            trace_link_template=config.trace_link_template,
            dedupe_window=config.webhook_dedupe_window,
            max_per_minute=config.webhook_max_per_minute,
            retries=config.webhook_retries,
        )

    # --- the pipeline's side: never blocks, never raises ------------------------------------
    def notify(self, fault: Mapping[str, Any], trace_id: str) -> bool:
        """Queue a notification of ``fault`` in trace ``trace_id`` (hex); True if queued.

        False when the fault's incident was already notified, the rate limit is spent,
        the queue is full or the notifier is closed.
        """
        if self._closing.is_set():
            return False
        try:
            return self._admit(fault, trace_id)
        except Exception:
            _log.exception("fault notification of trace %s not queued", trace_id)
            self._count("failed")
            return False

    def _admit(self, fault: Mapping[str, Any], trace_id: str) -> bool:
        key = (str(fault.get("mode", "")), str(fault.get("service", "")))
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            if key in self._incidents:
                self._incidents[key] = now
                self._incidents.move_to_end(key)
                outcome = "duplicate"
            elif not self._take_token(now):
                outcome = "rate_limited"
            else:
                try:
                    self._queue.put_nowait(
                        (key, build_payload(fault, trace_id, self.trace_link_template))
                    )
                except queue.Full:
                    self._tokens += 1
                    outcome = "queue_full"
                else:
                    self._incidents[key] = now
                    return True
        self._count(outcome)
        return False

    def _expire(self, now: float) -> None:
        while self._incidents:
            key, last = next(iter(self._incidents.items()))
            if now - last < self.dedupe_window:
                break
            del self._incidents[key]

    def _take_token(self, now: float) -> bool:
        rate = self.max_per_minute / 60.0
        self._tokens = min(float(self.max_per_minute), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    # --- the notifier's thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                key, payload = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if self._stop.is_set():
                problem: str | None = "the collector stopped first"
            else:
                try:
                    problem = self._deliver(payload)
                except Exception as exc:  # never let the thread die: later ones would pile up
                    problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                self._count("sent")
                continue
            self._count("failed")
            with self._lock:
                # Reopen the incident, so that its next fault tries again.
                self._incidents.pop(key, None)
            self._log_loss(payload, problem)

    def _deliver(self, payload: dict[str, Any]) -> str | None:
        """POST ``payload`` with retries; None once delivered, else the last problem."""
        problem = "not sent"
        for attempt in range(self.retries + 1):
            delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2**attempt) * random.uniform(0.8, 1.2)
            try:
                response = self._session.post(self.url, json=payload, timeout=self.timeout)
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    return None
                problem = f"HTTP {response.status_code}"
                if response.status_code not in _RETRY_STATUSES:
                    break
                delay = _retry_after(response, delay)
            if attempt == self.retries or self._stop.wait(delay):
                break
        return problem

    def _log_loss(self, payload: dict[str, Any], problem: str) -> None:
        """Log a lost notification; at most one line a minute while the webhook is down."""
        self._lost_unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < _LOG_INTERVAL:
            return
        _log.warning(
            "fault notification of %s/%s lost (%d lost since the last such warning): %s",
            payload["service"],
            payload["mode"],
            self._lost_unlogged,
            problem,
        )
        self._logged_at, self._lost_unlogged = now, 0

    def _count(self, outcome: str) -> None:
        self._counter.labels(outcome).inc()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking notifications, deliver what is queued for up to ``timeout``
        seconds, then drop (and count as failed) the rest."""
        self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            # At most one request in flight still runs to its own timeout.
            self._thread.join(self.timeout + 1.0)
        self._session.close()


def _retry_after(response: requests.Response, default: float) -> float:
    """The receiver's ``Retry-After`` in seconds (capped), else ``default``."""
    value = response.headers.get("Retry-After", "")
    try:
        return min(_MAX_BACKOFF, max(0.0, float(value)))
    except ValueError:
        return default

"""The guard that keeps otel-dl from ever raising into the host application.

Every wrapper does three things in this order:

1. ``instrumentation_enabled()`` first: when instrumentation is suppressed (OpenTelemetry's
   suppression key), call straight through.
2. Run otel-dl's own code (span start, signal extraction, hooks) inside
   ``capture_internal_exceptions(site)``, or call ``report_internal_error(site)`` from an
   ``except`` block on hot paths. The exception is swallowed, logged once per site with
   its traceback, and counted in the ``otel_dl.internal.errors`` metric.
3. Re-raise the user's own exception unchanged (the wrappers never wrap or replace it).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context, metrics

from otel_dl import semconv

logger = logging.getLogger("otel_dl")

# Both keys are the ones opentelemetry-instrumentation's suppress_instrumentation() sets;
# reading them here keeps the core free of that optional dependency.
_SUPPRESS_KEY = context._SUPPRESS_INSTRUMENTATION_KEY
_SUPPRESS_KEY_PLAIN = "suppress_instrumentation"

_lock = threading.Lock()
_logged_sites: set[str] = set()
_counts: Counter[str] = Counter()
_counter: metrics.Counter | None = None


def instrumentation_enabled() -> bool:
    """False inside OpenTelemetry's ``suppress_instrumentation()``."""
    return not (context.get_value(_SUPPRESS_KEY) or context.get_value(_SUPPRESS_KEY_PLAIN))


def report_internal_error(site: str) -> None:
    """Record the exception being handled as an otel-dl bug at ``site``; never raises.

    Call it only from an ``except`` block.
    """
    global _counter
    try:
        with _lock:
            _counts[site] += 1
            first = site not in _logged_sites
            _logged_sites.add(site)
        if first:
            logger.warning(
                "otel-dl instrumentation error at %s; the application is unaffected and "
                "further errors at this site are only counted",
                site,
                exc_info=True,
            )
        if _counter is None:
            _counter = metrics.get_meter("otel_dl").create_counter(
                semconv.METRIC_INTERNAL_ERRORS,
                unit=semconv.METRICS[semconv.METRIC_INTERNAL_ERRORS].unit,
                description=semconv.METRICS[semconv.METRIC_INTERNAL_ERRORS].brief,
            )
        _counter.add(1, {"site": site})
    except Exception:
        pass


@contextmanager
def capture_internal_exceptions(site: str) -> Iterator[None]:
    """Swallow, log once and count any exception raised by otel-dl code in the block."""
    try:
        yield
    except Exception:
        report_internal_error(site)


def internal_error_counts() -> dict[str, int]:
    """Internal errors swallowed so far, per site (also exported as a metric)."""
    with _lock:
        return dict(_counts)

"""Admission: whether the collector takes a request now or answers with back-pressure.

:meth:`~.pipeline.Collector.admit` refuses a request, before it is decoded, when

- the disk budget (``queue_max_bytes``) shared by the journal and the export queue is
  spent;
- the collector's resident memory is above the soft limit, 80 % of
  ``memory_limit_mib`` (:class:`MemoryGuard` samples it every 0.1 s in a thread); the
  other 20 % is room for the requests already being decoded, so RSS stays under the
  limit itself;
- the request waited longer than ``max_request_wait`` for a worker thread
  (:class:`TimedExecutor` measures it): the collector is taking in more than it can
  process, and answering late would only make senders time out and send again.

A refusal raises :class:`~.diskqueue.QueueFull`, which the receivers answer with
gRPC ``RESOURCE_EXHAUSTED`` and a ``RetryInfo``, or HTTP 429 with ``Retry-After``.
A refused request costs no decoding and no disk write::

    guard = MemoryGuard(limit_bytes=512 << 20)
    guard.start()
    if guard.over:
        ...                                  # refuse
    pool = TimedExecutor(max_workers=8)
    pool.submit(lambda: waited())            # seconds this task waited for a worker
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SOFT_LIMIT_FRACTION = 0.8
_SAMPLE_SECONDS = 0.1
_TRIM_SECONDS = 1.0
_LOG_SECONDS = 10.0
_local = threading.local()


def rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (Linux)."""
    return int(_STATM.read_text().split()[1]) * _PAGE


def rss_supported() -> bool:
    try:
        rss_bytes()
    except (OSError, ValueError, IndexError):
        return False
    return True


def _malloc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)``, which hands freed heap pages back to the system."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class MemoryGuard:
    """Samples RSS in a thread; ``over`` is true while it is above the soft limit.

    While over, it also asks the C allocator to give freed pages back (at most once a
    second), so RSS falls once the data held in memory has been handed on.
    """

    def __init__(self, limit_bytes: int, on_sample: Callable[[int], None] | None = None):
        self.limit = limit_bytes
        self.soft_limit = int(limit_bytes * SOFT_LIMIT_FRACTION)
        self.rss = rss_bytes()
        self.over = False
        self._on_sample = on_sample
        self._trim = _malloc_trim()
        self._trimmed_at = 0.0
        self._logged_at = -_LOG_SECONDS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otel-dl-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self) -> bool:
        """Read RSS now; return (and set) whether it is above the soft limit."""
        rss = rss_bytes()
        trim_due = time.monotonic() - self._trimmed_at >= _TRIM_SECONDS
        if rss > self.soft_limit and self._trim is not None and trim_due:
            self._trimmed_at = time.monotonic()
            self._trim()
            rss = rss_bytes()
        over = rss > self.soft_limit
        now = time.monotonic()
        if over and not self.over and now - self._logged_at >= _LOG_SECONDS:
            self._logged_at = now  # at most one line per 10 s while RSS hovers at the limit
            _log.warning(
                "resident memory %d MiB is above the soft limit of %d MiB (80 %% of "
                "memory_limit_mib); refusing new data with back-pressure until it falls",
                rss >> 20,
                self.soft_limit >> 20,
            )
        self.rss, self.over = rss, over
        if self._on_sample is not None:
            self._on_sample(rss)
        return over

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            try:
                self.sample()
            except Exception:  # never let the guard die silently with `over` stuck
                self.over = False
                _log.exception("could not sample resident memory")


class TimedExecutor(ThreadPoolExecutor):
    """A thread pool whose tasks can ask how long they waited for a worker (:func:`waited`)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return super().submit(_timed, time.monotonic(), fn, args, kwargs)


def _timed(queued_at: float, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    _local.waited = time.monotonic() - queued_at
    try:
        return fn(*args, **kwargs)
    finally:
        _local.waited = 0.0


def waited() -> float:
    """Seconds the running :class:`TimedExecutor` task waited for a worker (0 elsewhere)."""
    return float(getattr(_local, "waited", 0.0))

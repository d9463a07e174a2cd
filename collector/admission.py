"""Admission: whether the collector takes a request now or answers with back-pressure.

:meth:`~.pipeline.Collector.admit` refuses a request, before it is decoded, when

- the disk budget (``queue_max_bytes``) shared by the journal and the export queue is
  spent;
- the collector's memory in use is above the soft limit, 80 % of ``memory_limit_mib``
  (:class:`MemoryGuard` samples it every 0.1 s in a thread); the other 20 % is room for
  the requests already being decoded, so RSS stays under the limit itself. Memory in
  use is the resident set less what CPython's small-object allocator holds free for
  reuse (:func:`python_free_bytes`): that allocator hardly ever returns memory to the
  system, so after a burst RSS stays near its peak although the data was handed on,
  and judged on RSS alone the collector went on refusing data it had room for;
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
import re
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


class _PythonAllocatorStats:
    """Reads how much memory CPython's small-object allocator (pymalloc) holds free.

    pymalloc serves every object of up to 512 bytes from 1 MiB arenas and returns an
    arena to the system only once every object in it is freed; one long-lived object
    (a decision-cache key, a metric label) keeps an arena. After the collector handed on
    a burst of spans, its arenas stay resident, free for new objects: measured after a
    3x overload, 62 MiB of the collector's 160 MiB RSS was free in pymalloc's 87 arenas,
    which held no more live bytes than its 28 arenas at start. CPython's only interface
    to these figures is ``_PyObject_DebugMallocStats`` (what ``sys._debugmallocstats()``
    prints); it writes into a memory stream (``open_memstream``), which is parsed:
    about 50 µs a call.
    """

    _AVAILABLE = re.compile(rb"# bytes in available blocks\s*=\s*([\d,]+)")
    _UNUSED_POOLS = re.compile(rb"unused pools \* \d+ bytes\s*=\s*([\d,]+)")

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._open = libc.open_memstream
        self._open.restype = ctypes.c_void_p
        self._open.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
        self._close = libc.fclose
        self._close.argtypes = [ctypes.c_void_p]
        self._free = libc.free
        self._free.argtypes = [ctypes.c_void_p]
        # ctypes.pythonapi keeps the GIL during the call: pymalloc's state needs it.
        self._stats = ctypes.pythonapi._PyObject_DebugMallocStats
        self._stats.argtypes = [ctypes.c_void_p]
        self._stats.restype = ctypes.c_int

    def free_bytes(self) -> int | None:
        """Free bytes in pymalloc's arenas, or None when pymalloc is not in use."""
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        stream = self._open(ctypes.byref(buf), ctypes.byref(size))
        if not stream:
            return None
        try:
            printed = self._stats(stream)
        finally:
            self._close(stream)  # flushes into buf and size
        try:
            text = ctypes.string_at(buf.value, size.value) if buf.value else b""
        finally:
            self._free(buf)
        available = self._AVAILABLE.search(text)
        unused = self._UNUSED_POOLS.search(text)
        if not printed or available is None or unused is None:
            return None
        return int(available.group(1).replace(b",", b"")) + int(unused.group(1).replace(b",", b""))


def _python_allocator_stats() -> _PythonAllocatorStats | None:
    try:
        stats = _PythonAllocatorStats()
        stats.free_bytes()
    except (OSError, AttributeError, ValueError):
        return None
    return stats


_ALLOCATOR = _python_allocator_stats()


def python_free_bytes() -> int:
    """Bytes CPython's small-object allocator holds free for reuse: resident, but taken
    by new objects before it asks the system for more. 0 where it cannot be read
    (another allocator, another interpreter, no ``open_memstream``)."""
    if _ALLOCATOR is None:
        return 0
    return _ALLOCATOR.free_bytes() or 0


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
    """Samples memory in a thread; ``over`` is true while the memory in use (RSS less the
    free memory Python's allocator keeps for reuse) is above the soft limit.

    While RSS is over the soft limit, it also asks the C allocator to give freed pages
    back (at most once a second), so RSS falls once the data held in memory has been
    handed on. ``on_sample(rss, in_use)`` gets every sample.
    """

    def __init__(
        self, limit_bytes: int, on_sample: Callable[[int, int], None] | None = None
    ) -> None:
        self.limit = limit_bytes
        self.soft_limit = int(limit_bytes * SOFT_LIMIT_FRACTION)
        self.rss = rss_bytes()
        self.in_use = self.rss
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
        """Read memory now; return (and set) whether the memory in use is over the soft
        limit."""
        rss = rss_bytes()
        trim_due = time.monotonic() - self._trimmed_at >= _TRIM_SECONDS
        if rss > self.soft_limit and self._trim is not None and trim_due:
            self._trimmed_at = time.monotonic()
            self._trim()
            rss = rss_bytes()
        # Memory pymalloc keeps free is taken by new spans before RSS grows; counting it
        # as used kept the collector refusing after every burst (RSS stays at its peak).
        in_use = max(0, rss - python_free_bytes())
        over = in_use > self.soft_limit
        now = time.monotonic()
        if over and not self.over and now - self._logged_at >= _LOG_SECONDS:
            self._logged_at = now  # at most one line per 10 s while memory hovers at the limit
            _log.warning(
                "memory in use %d MiB (resident %d MiB, less what Python's allocator holds "
                "free for reuse) is above the soft limit of %d MiB (80 %% of "
                "memory_limit_mib); refusing new data with back-pressure until it falls",
                in_use >> 20,
                rss >> 20,
                self.soft_limit >> 20,
            )
        self.rss, self.in_use, self.over = rss, in_use, over
        if self._on_sample is not None:
            self._on_sample(rss, in_use)
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

"""Admission: whether the collector takes a request now, holds it back, or answers with
back-pressure.

:meth:`~.pipeline.Collector.admit` refuses a request, before it is decoded, when

- the disk budget (``queue_max_bytes``) shared by the journal and the export queue is
  spent;
- :class:`MemoryGuard` says memory is over (``over``): the collector's memory in use is
  above the soft limit, 80 % of ``memory_limit_mib``, or has stayed above the pace
  limit, 75 %, for :data:`PRESS_SECONDS`. The guard samples memory every 0.05 s in a
  thread; the other 20 % is room for the requests already being decoded, so RSS stays
  under the limit itself. Memory in use is the resident set less what CPython's
  small-object allocator holds free for reuse (:func:`python_free_bytes`): that
  allocator hardly ever returns memory to the system, so after a burst RSS stays near
  its peak although the data was handed on, and judged on RSS alone the collector went
  on refusing data it had room for;
- the request would wait, or waited, longer than ``max_request_wait`` for a worker
  thread (:class:`TimedExecutor` measures both): the collector is taking in more than
  it can process, and answering late would only make senders time out and send again.

Between the pace and the soft limit (:func:`memory_pressing`), the receivers hold a
request back on its worker thread until memory falls (:func:`wait_for_memory_sample`):
spans wait in memory for their decision, and the receivers can take them faster than
the decision thread hands them on, so without it a burst fills memory to the limit
before the first trace is decided. Meanwhile one more request may wait for a busy
worker (:attr:`TimedExecutor.backlog`); one arriving while a request waits is refused
for memory as it arrives, since queued requests keep their bodies in memory and holding
them does not bring memory down.

A refusal raises :class:`~.diskqueue.QueueFull`, which the receivers answer with
gRPC ``RESOURCE_EXHAUSTED`` and a ``RetryInfo``, or HTTP 429 with ``Retry-After``.
A refused request costs no decoding and no disk write; one refused as it arrives is
not even read::

    guard = MemoryGuard(limit_bytes=512 << 20)
    guard.start()
    if guard.over:
        ...                                  # refuse
    while memory_pressing():
        wait_for_memory_sample(0.1)          # hold back
    pool = TimedExecutor(max_workers=8)
    pool.expected_wait()                     # seconds a task submitted now would wait
    pool.submit(lambda: waited())            # seconds this task waited for a worker
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
SOFT_LIMIT_FRACTION = 0.8
PACE_FRACTION = 0.75
PRESS_SECONDS = 1.5
TRIM_FRACTION = 0.5
_SAMPLE_SECONDS = 0.05
_LOG_SECONDS = 10.0
# TimedExecutor's pace: the time constant over which it averages the gaps between starts.
_PACE_SECONDS = 1.0
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
    """Samples memory in a thread and says whether new data should wait or be refused.

    Memory in use is RSS less the free memory Python's allocator keeps for reuse.
    ``pressing`` is true while it is above the pace limit (:data:`PACE_FRACTION` of the
    limit): the receivers hold new requests back until it falls. ``over`` is true once it
    is above the soft limit (:data:`SOFT_LIMIT_FRACTION`), or has stayed above the pace
    limit for :data:`PRESS_SECONDS` (holding requests back did not let the data in memory
    be handed on), and stays true until it falls below the pace limit: new data is
    refused. The gap between the two limits keeps ``over`` from flapping with every
    request taken or handed on.

    While RSS is over half the limit, it also asks the C allocator to give freed pages
    back (at most once a second), so RSS falls once the data held in memory has been
    handed on. ``on_sample(rss, in_use)`` gets every sample. A started guard counts in
    :func:`memory_pressing` until it is stopped.
    """

    def __init__(
        self, limit_bytes: int, on_sample: Callable[[int, int], None] | None = None
    ) -> None:
        self.limit = limit_bytes
        self.soft_limit = int(limit_bytes * SOFT_LIMIT_FRACTION)
        self.pace_limit = int(limit_bytes * PACE_FRACTION)
        self.trim_limit = int(limit_bytes * TRIM_FRACTION)
        self.rss = rss_bytes()
        self.in_use = self.rss
        self.over = False
        self.pressing = False
        self._pressing_since = 0.0
        self._on_sample = on_sample
        self._trim = _malloc_trim()
        self._trimmed_at = 0.0
        self._logged_at = -_LOG_SECONDS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otel-dl-memory", daemon=True)

    def start(self) -> None:
        global _running
        with _sampled:
            _running = (*_running, self)
        self._thread.start()

    def stop(self) -> None:
        global _running
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with _sampled:
            _running = tuple(g for g in _running if g is not self)
            self.pressing = False
            _sampled.notify_all()

    def sample(self) -> bool:
        """Read memory now; return (and set) whether new data should be refused."""
        now = time.monotonic()
        rss = rss_bytes()
        if rss > self.trim_limit and self._trim is not None and now - self._trimmed_at >= 1.0:
            self._trimmed_at = now
            self._trim()
            rss = rss_bytes()
        # Memory pymalloc keeps free is taken by new spans before RSS grows; counting it
        # as used kept the collector refusing after every burst (RSS stays at its peak).
        in_use = max(0, rss - python_free_bytes())
        pressing = in_use > self.pace_limit
        if pressing and not self.pressing:
            self._pressing_since = now
        if not pressing:
            over = False
        elif in_use > self.soft_limit or now - self._pressing_since >= PRESS_SECONDS:
            over = True
        else:
            over = self.over  # between the limits: as it was
        if over and not self.over and now - self._logged_at >= _LOG_SECONDS:
            self._logged_at = now  # at most one line per 10 s while memory hovers at the limit
            _log.warning(
                "memory in use %d MiB (resident %d MiB, less what Python's allocator holds "
                "free for reuse) is %s; refusing new data with back-pressure until it falls "
                "under %d MiB (75 %% of memory_limit_mib)",
                in_use >> 20,
                rss >> 20,
                f"above the soft limit of {self.soft_limit >> 20} MiB (80 % of memory_limit_mib)"
                if in_use > self.soft_limit
                else f"still above {self.pace_limit >> 20} MiB after requests were held back "
                f"for {PRESS_SECONDS:g} s",
                self.pace_limit >> 20,
            )
        self.rss, self.in_use, self.over = rss, in_use, over
        with _sampled:
            self.pressing = pressing
            _sampled.notify_all()
        if self._on_sample is not None:
            self._on_sample(rss, in_use)
        return over

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            try:
                self.sample()
            except Exception:  # never let the guard die silently with `over` stuck
                self.over = self.pressing = False
                _log.exception("could not sample resident memory")


# Started guards, and a condition notified after each of their samples.
_running: tuple[MemoryGuard, ...] = ()
_sampled = threading.Condition()


def memory_pressing() -> bool:
    """Whether a started :class:`MemoryGuard` of this process has its memory in use above
    its pace limit: new work should wait for the data in memory to be handed on."""
    return any(guard.pressing for guard in _running)


def wait_for_memory_sample(timeout: float) -> None:
    """Wait for the next sample of a started :class:`MemoryGuard`, at most ``timeout``."""
    with _sampled:
        _sampled.wait(timeout)


class _Waiting:
    """A task submitted to a :class:`TimedExecutor` and not started yet."""

    __slots__ = ("done", "since")

    def __init__(self, since: float) -> None:
        self.since = since
        self.done = False  # started, or cancelled before it could start


class TimedExecutor(ThreadPoolExecutor):
    """A thread pool that knows how long its tasks wait for a worker.

    A running task can ask how long it waited (:func:`waited`); anyone can ask how long
    a task submitted now would wait (:meth:`expected_wait`), so a receiver can refuse a
    request as it arrives, before reading it, instead of queueing it to refuse it later.
    """

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix)
        self._times_lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()  # oldest first; done ones leave from the front
        self._queued = 0
        self._running = 0
        # The pace at which tasks start while others queue: starts and seconds, both
        # decaying with a time constant of _PACE_SECONDS, so their ratio is the mean
        # gap between starts over about the last second of backlog.
        self._backlogged = False  # whether tasks still queued at the last start
        self._last_start = 0.0
        self._starts = 0.0
        self._seconds = 0.0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        task = _Waiting(time.monotonic())
        with self._times_lock:
            self._waiting.append(task)
            self._queued += 1
        try:
            future = super().submit(_timed, self, task, fn, args, kwargs)
        except BaseException:
            self._leave(task)
            raise
        # A task cancelled before it started (asyncio cancels the futures of requests
        # whose client went away) never runs: it must not stay in the queue's figures.
        future.add_done_callback(lambda _future: self._leave(task))
        return future

    def _leave(self, task: _Waiting, now: float | None = None) -> None:
        with self._times_lock:
            if task.done:
                return
            task.done = True
            self._queued -= 1
            waiting = self._waiting
            while waiting and waiting[0].done:
                waiting.popleft()
            if now is None:
                return
            self._running += 1  # started: leaves the queue for a worker
            if self._backlogged:  # tasks queued since the last start: this gap is the pace
                gap = now - self._last_start
                keep = math.exp(-gap / _PACE_SECONDS)
                self._starts = self._starts * keep + 1.0
                self._seconds = self._seconds * keep + gap
            self._backlogged = self._queued > 0
            self._last_start = now

    @property
    def queued(self) -> int:
        """Tasks submitted and not started yet."""
        return self._queued

    @property
    def backlog(self) -> int:
        """Tasks that wait because every worker is busy: those submitted and not started,
        less the workers free to start them (a task just submitted waits a moment for
        an idle worker to wake)."""
        return max(0, self._queued - (self._max_workers - self._running))

    def expected_wait(self) -> float:
        """Seconds a task submitted now would wait for a worker: the longer of how long
        the oldest waiting task has waited and the queue's length at the pace tasks
        started while tasks queued. 0 when no task waits."""
        with self._times_lock:
            if not self._waiting:
                return 0.0
            oldest = time.monotonic() - self._waiting[0].since
            if not self._starts:
                return oldest
            return max(oldest, self._queued * self._seconds / self._starts)


def _timed(
    pool: TimedExecutor, task: _Waiting, fn: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    now = time.monotonic()
    pool._leave(task, now)
    _local.waited = now - task.since
    try:
        return fn(*args, **kwargs)
    finally:
        _local.waited = 0.0
        with pool._times_lock:
            pool._running -= 1


def waited() -> float:
    """Seconds the running :class:`TimedExecutor` task waited for a worker (0 elsewhere)."""
    return float(getattr(_local, "waited", 0.0))

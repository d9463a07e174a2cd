"""Calls' signals, computed a burst at a time, off the caller's path.

A model served one request at a time pays numpy's fixed cost per call dozens of times
for a handful of values: profiling one row costs more than the span. And right after a
forward, numpy's code and data are cold: profiling a 256-row batch there costs about
twice what it costs among other batches. So a call whose inputs hold at most
:data:`~otel_dl.monitor.BURST_MAX_VALUES` feature values (or another numeric input of at
most :data:`~otel_dl.monitor.BURST_COPY_MAX_BYTES`) does only constant work when it
ends: its extractors return a :class:`~otel_dl.monitor.Later` holding private copies of
its inputs and of the score rows its confidence covers, and :func:`submit` parks its
span here, open, with its end time.

A DataLoader batch goes the same way with its span not even started: the instrumentor
keeps the context current at ``next()`` and the call's times
(:meth:`~otel_dl._span.DlSpan.defer_start`), and the burst makes the span whole, with
every attribute. A model called with that very batch takes the batch's
profile when the burst has made it (``Later.source``): its span ends once both its own
burst and the batch's have run.

The parked calls of one monitor are profiled together by
:meth:`~otel_dl.monitor.FeatureMonitor.profile_burst` (one vectorised pass per signal
over all their rows), then each span gets its own attributes and ends at its call's end
time. That happens when a burst is full, on the thread of the call that fills it: at
:data:`BURST_CALLS` parked calls that hold :data:`BURST_VALUES` input and score values
between them, else at :data:`BURST_MAX_CALLS` calls. Batches of 2,048 values or more
fill a burst in 16 calls; smaller calls (a request of a few rows), whose burst costs
numpy's fixed price per pass more than their rows do, share one among up to 64: 8 to
14 % less per one-row call than bursts of 16 (alternating blocks, one process, one
core). A burst also runs when the oldest call has waited ``signals_delay_ms`` (on a
background thread), and on :func:`drain`, which ``Instrumentation.force_flush`` and
``shutdown`` call, as does interpreter exit; it also waits for a burst another thread is
profiling, so a flush exports every span parked before it (without that wait, a burst
the background thread had just taken ended its spans after the flush, and after
``shutdown`` they were lost). Spans so reach the exporter at most
``signals_delay_ms`` later; their timestamps are the calls' own. A tracer provider's own
``force_flush`` does not know of parked spans: flush through the handle
``otel_dl.instrument()`` returns.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from otel_dl import monitor as monitor_module
from otel_dl._config import get_config
from otel_dl._guard import report_internal_error
from otel_dl.monitor import FeatureMonitor, Later

if TYPE_CHECKING:
    from otel_dl._span import DlSpan

DRAIN_WAIT_SECONDS = 5.0
"""How long :func:`drain` waits at most for bursts other threads are profiling."""
BURST_CALLS = 16
"""Parked calls of one monitor that start a burst at once when they hold at least
:data:`BURST_VALUES` values (their input and score copies)."""
BURST_VALUES = 32_768
"""Values that make :data:`BURST_CALLS` parked calls a full burst."""
BURST_MAX_CALLS = 64
"""Parked calls of one monitor that start a burst whatever they hold: calls of a few
values each (one request) wait for up to 64 of them, and past the 16th call a burst
starts as soon as the parked calls hold :data:`BURST_VALUES` values."""

_SITE = "signals.burst"
_POLL_SECONDS = 0.05


@dataclass(slots=True)
class _Parked:
    call: DlSpan
    later: Later
    end_ns: int


class _Bursts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: dict[FeatureMonitor, list[_Parked]] = {}
        self._since: dict[FeatureMonitor, float] = {}
        self._inputs: dict[FeatureMonitor, int] = {}  # parked calls with inputs, per monitor
        self._values: dict[FeatureMonitor, int] = {}  # values parked, per monitor
        self._thread: threading.Thread | None = None
        self._exit_hooked = False
        # Bursts taken off the parked lists and not yet profiled, and a condition on the
        # lock for drain() to wait for those other threads are profiling.
        self._profiling = 0
        self._done = threading.Condition(self._lock)
        self._local = threading.local()

    def submit(self, call: DlSpan, later: Later, end_ns: int) -> None:
        monitor = later.monitor
        full: list[_Parked] | None = None
        with self._lock:
            parked = self._parked.setdefault(monitor, [])
            if not parked:
                self._since[monitor] = time.monotonic()
            parked.append(_Parked(call, later, end_ns))
            if later.inputs is not None:
                self._inputs[monitor] = self._inputs.get(monitor, 0) + 1
            values = self._values.get(monitor, 0) + later.parked_values
            self._values[monitor] = values
            calls = len(parked)
            if calls >= BURST_MAX_CALLS or (calls >= BURST_CALLS and values >= BURST_VALUES):
                full = self._take(monitor)
            elif self._thread is None:
                self._start()
        if full is not None:
            self._profile_taken(monitor, full)

    def pending(self) -> int:
        with self._lock:
            return sum(len(parked) for parked in self._parked.values())

    def parks_inputs(self, monitor: FeatureMonitor) -> bool:
        return monitor in self._inputs

    def flush(self, monitor: FeatureMonitor) -> None:
        """Profile the calls ``monitor`` has parked, now, on this thread."""
        with self._lock:
            parked = self._take(monitor) if monitor in self._parked else None
        if parked:
            self._profile_taken(monitor, parked)

    def drain(self, timeout: float = DRAIN_WAIT_SECONDS) -> bool:
        """Profile every parked call now, and wait (at most ``timeout`` seconds) for the
        bursts other threads are profiling: when it returns True, every span parked
        before the call has ended. A thread inside a burst of its own does not wait."""
        with self._lock:
            taken = [(monitor, self._take(monitor)) for monitor in list(self._parked)]
        for monitor, parked in taken:
            self._profile_taken(monitor, parked)
        if getattr(self._local, "profiling", False):
            return True
        with self._lock:
            return self._done.wait_for(lambda: not self._profiling, timeout)

    def _take(self, monitor: FeatureMonitor) -> list[_Parked]:
        """Take ``monitor``'s parked calls for profiling (under the lock); the taker then
        calls :meth:`_profile_taken`."""
        self._since.pop(monitor, None)
        self._inputs.pop(monitor, None)
        self._values.pop(monitor, None)
        self._profiling += 1
        return self._parked.pop(monitor)

    def _profile_taken(self, monitor: FeatureMonitor, parked: list[_Parked]) -> None:
        local = self._local
        outer = getattr(local, "profiling", False)
        local.profiling = True
        try:
            _profile(monitor, parked)
        finally:
            local.profiling = outer
            with self._lock:
                self._profiling -= 1
                if not self._profiling:
                    self._done.notify_all()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="otel-dl-signals", daemon=True)
        self._thread.start()
        if not self._exit_hooked:
            # Registered now, after the application made its tracer provider: exit hooks
            # run last-registered first, so parked spans end before the provider shuts down.
            self._exit_hooked = True
            atexit.register(self.drain)

    def _run(self) -> None:
        while True:
            delay = max(get_config().signals_delay_ms, 1) / 1000
            # At most _POLL_SECONDS: a shorter delay set later (another instrument() call)
            # holds from the next wake, not after half of a long one.
            time.sleep(min(delay / 2, _POLL_SECONDS))
            now = time.monotonic()
            with self._lock:
                due = [
                    (monitor, self._take(monitor))
                    for monitor, since in list(self._since.items())
                    if now - since >= delay
                ]
            for monitor, parked in due:
                self._profile_taken(monitor, parked)

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's parked spans and thread are not this process's."""
        self._lock = threading.Lock()
        self._parked, self._since, self._inputs, self._values = {}, {}, {}, {}
        self._thread = None
        self._profiling = 0
        self._done = threading.Condition(self._lock)
        self._local = threading.local()


def _profile(monitor: FeatureMonitor, parked: list[_Parked]) -> None:
    """Give each parked call its signals and end its span; a failure costs the signals
    of this burst, never the spans. A call's input profile also goes to the calls that
    share it (a model given the DataLoader's batch), which end once they have it."""
    try:
        found = monitor.profile_burst(
            [p.later.inputs for p in parked],
            [p.later.scores for p in parked],
            [p.later.predictions for p in parked],
            [p.later.kind for p in parked],
        )
    except Exception:
        report_internal_error(_SITE)
        found = [{} for _ in parked]
    for item, attributes in zip(parked, found, strict=True):
        try:
            if item.later._batch is not None:  # shared (see otel_dl.monitor.share)
                item.later.profiled(attributes)
        except Exception:
            report_internal_error(_SITE)
        item.call.settle(attributes)


_bursts = _Bursts()
os.register_at_fork(after_in_child=_bursts.reset_after_fork)
# A consumer that cannot wait for a parked profile (a GPU call, a stage) profiles its
# burst now; a batch observed at once first lets the batches parked before it feed drift.
monitor_module._flush_parked = _bursts.flush
monitor_module._parks_inputs = _bursts.parks_inputs


def submit(call: DlSpan, later: Later, end_ns: int) -> None:
    """Park ``call`` (open, detached) until ``later``'s signals are computed in a burst."""
    _bursts.submit(call, later, end_ns)


def pending_spans() -> int:
    """Spans parked for a burst."""
    return _bursts.pending()


def drain(timeout: float = DRAIN_WAIT_SECONDS) -> bool:
    """Profile every parked call now and end its span; wait at most ``timeout`` seconds
    for the bursts other threads are profiling (False if they were not done by then)."""
    return _bursts.drain(timeout)

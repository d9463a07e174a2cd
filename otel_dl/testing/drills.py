"""Run every failure mode of the catalog as a drill on the user's own pipeline.

:func:`run_drills` runs the pipeline healthy (the baseline), then once per catalog mode
with that mode's fault injected (see :mod:`otel_dl.testing.faults`), and checks:

- *drilled*: the pipeline passed the part the mode's fault needs through ``faults``;
- *detected*: a span of the faulty runs matches the mode as the collector reads the
  catalog (every ``where`` condition holds, a ``detect`` condition fires: thresholds,
  ``above_baseline`` against the healthy runs' p99, ``changed`` against their values),
  and no span of the healthy runs did;
- *attributed* (with ``collector=True``): the real otel-dl collector, run in-process on
  loopback and sent the drill's spans over OTLP/gRPC, names the mode's kind and the
  service the fault was injected into as the root cause of a faulty trace.

The result is a :class:`DrillReport`; ``report.table()`` is the coverage table of the
catalog, ``report.assert_detected()`` fails a CI job on a mode its monitoring misses.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import StatusCode

from otel_dl import _burst, semconv
from otel_dl.collector.catalog import Catalog, Condition, FailureMode, load_catalog
from otel_dl.collector.decode import FALLBACKS
from otel_dl.collector.spans import peer_host
from otel_dl.testing.faults import Fault, Faults

Pipeline = Callable[[Faults], Any]

#: Which fault drills each kind of failure mode (``dl.fault.kind``).
FAULT_FOR_KIND: Final = {
    semconv.FAULT_KIND_DATA_DRIFT: Fault("batches", "drift"),
    semconv.FAULT_KIND_DATA_QUALITY: Fault("batches", "nan"),
    semconv.FAULT_KIND_SCHEMA_MISMATCH: Fault("batches", "schema"),
    semconv.FAULT_KIND_STALE_FEATURES: Fault("feature_store", "stale"),
    semconv.FAULT_KIND_MODEL_CHANGE: Fault("model", "swap"),
    semconv.FAULT_KIND_LOW_CONFIDENCE: Fault("model", "unsure"),
    semconv.FAULT_KIND_LATENCY: Fault("model", "slow"),
    semconv.FAULT_KIND_ERROR: Fault("model", "fail"),
}


class DrillError(RuntimeError):
    """The drill cannot run; the message names the cause and the fix."""


def fault_for(mode: FailureMode) -> Fault | None:
    """The fault that drills ``mode``: by its kind, and for a dependency outage by what
    it detects (a slow call or a failing one). None: no injector for that kind."""
    if mode.kind == semconv.FAULT_KIND_DEPENDENCY_OUTAGE:
        slow = any(c.signal == "duration" for c in mode.detect)
        return Fault("http", "slow" if slow else "fail")
    return FAULT_FOR_KIND.get(mode.kind)


# --- results ----------------------------------------------------------------------------------


@dataclass
class DrillResult:
    """One catalog mode's drill."""

    mode: FailureMode
    fault: Fault | None
    drilled: bool = False
    detected: bool = False
    attributed: bool | None = None  # None: no collector in this drill
    evidence: str = ""
    attribution: str = ""
    note: str = ""
    service: str = ""


@dataclass
class DrillReport:
    """Every mode's drill, and the coverage table of the catalog."""

    results: list[DrillResult]
    baseline_runs: int
    fault_runs: int
    baseline_faults: int | None = None  # faults the collector named on healthy traces
    #: Each of those: its mode, root-cause service and span, and the evidence.
    baseline_fault_notes: list[str] = field(default_factory=list)

    def by_mode(self, mode_id: str) -> DrillResult:
        for result in self.results:
            if result.mode.id == mode_id:
                return result
        raise KeyError(f"no mode {mode_id!r} in this drill")

    def table(self) -> str:
        """The coverage table (Markdown): each mode drilled, detected, attributed, or not."""
        collector = any(r.attributed is not None for r in self.results)
        count = len(self.results)
        drilled_count = sum(r.drilled for r in self.results)
        detected_count = sum(r.detected for r in self.results)
        lines = [
            f"Fault drills: {count} catalog modes, {drilled_count} drilled, "
            f"{detected_count} detected"
            + (
                f", {sum(bool(r.attributed) for r in self.results)} attributed"
                if collector
                else " (no collector: attribution not checked)"
            )
            + f" ({self.baseline_runs} healthy runs, {self.fault_runs} faulty runs per mode)",
            "",
            "| mode | kind | fault injected | drilled | detected | attributed |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            fault = f"{r.fault.target}: {r.fault.action}" if r.fault else "—"
            drilled = "yes" if r.drilled else f"no: {r.note}"
            if not r.drilled:
                detected = attributed = "—"
            else:
                detected = f"yes: {r.evidence}" if r.detected else f"no{_note(r.evidence)}"
                if r.attributed is None:
                    attributed = "—"
                else:
                    attributed = ("yes: " if r.attributed else "no: ") + (
                        r.attribution or "no fault named"
                    )
            lines.append(
                f"| {r.mode.id} | {r.mode.kind} | {fault} | {drilled} | {detected} | {attributed} |"
            )
        if self.baseline_faults is not None:
            lines += ["", f"Faults the collector named on healthy traces: {self.baseline_faults}"]
            lines += [f"- {note}" for note in self.baseline_fault_notes]
        return "\n".join(lines)

    def missed(self, attribution: bool = False) -> list[DrillResult]:
        """Drilled modes not detected (or, with ``attribution``, not attributed)."""
        return [
            r
            for r in self.results
            if r.drilled and (not r.detected or (attribution and r.attributed is False))
        ]

    def assert_detected(self, attribution: bool = False) -> None:
        """Fail with the table when a drilled mode went undetected (or unattributed)."""
        missed = self.missed(attribution)
        if missed:
            names = ", ".join(r.mode.id for r in missed)
            raise AssertionError(
                f"fault drills missed {names}; the monitoring would not catch these modes\n"
                + self.table()
            )


def _note(text: str) -> str:
    return f": {text}" if text else ""


# --- capturing the pipeline's spans -----------------------------------------------------------


class _Capture(SpanProcessor):
    """Collects the spans that end while a run is being recorded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sink: list[ReadableSpan] | None = None

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink.append(span)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[ReadableSpan]]:
        spans: list[ReadableSpan] = []
        with self._lock:
            self._sink = spans
        try:
            yield spans
        finally:
            with self._lock:
                self._sink = None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_captures: dict[int, tuple[object, _Capture]] = {}


def _capture() -> _Capture:
    provider = trace.get_tracer_provider()
    if not hasattr(provider, "add_span_processor"):
        raise DrillError(
            "fault drills read the spans of the OpenTelemetry SDK, and no SDK TracerProvider "
            "is set; call otel_dl.instrument() (traces_exporter='none' will do) before "
            "run_drills()"
        )
    entry = _captures.get(id(provider))
    if entry is None or entry[0] is not provider:
        capture = _Capture()
        provider.add_span_processor(capture)
        entry = _captures[id(provider)] = (provider, capture)
    return entry[1]


# --- reading the catalog's conditions on SDK spans --------------------------------------------


def _service(span: ReadableSpan) -> str:
    return str(span.resource.attributes.get("service.name", "")) if span.resource else ""


def _signal(span: ReadableSpan, name: str) -> Any:
    attrs: Mapping[str, Any] = span.attributes or {}
    if name == "duration":
        if span.start_time is None or span.end_time is None:
            return None
        return (span.end_time - span.start_time) / 1e9
    if name == "status.error":
        return span.status.status_code is StatusCode.ERROR
    if name == "exception":
        return any(event.name == "exception" for event in span.events)
    if name == "span.kind":
        return span.kind.name.lower()
    if name == "peer":
        return peer_host(attrs) is not None
    value = attrs.get(name)
    if value is None and name in FALLBACKS:  # read as the collector reads it
        return attrs.get(FALLBACKS[name])
    return value


def _key(span: ReadableSpan, signal: str) -> tuple[str, ...]:
    attrs = span.attributes or {}
    if signal == semconv.DL_MODEL_FINGERPRINT and semconv.DL_MODEL_NAME in attrs:
        return ("model", str(attrs[semconv.DL_MODEL_NAME]))
    return (_service(span), span.name)


class _Baseline:
    """What the healthy runs showed, per signal and (service, span name)."""

    def __init__(self, spans: Sequence[ReadableSpan], signals: set[str]) -> None:
        self.values: dict[tuple[str, tuple[str, ...]], list[Any]] = {}
        for span in spans:
            for signal in signals:
                value = _signal(span, signal)
                if value is not None:
                    self.values.setdefault((signal, _key(span, signal)), []).append(value)

    def p99(self, span: ReadableSpan, signal: str) -> float | None:
        found = self.values.get((signal, _key(span, signal)))
        numbers = [float(v) for v in found or () if isinstance(v, int | float)]
        return float(np.quantile(numbers, 0.99)) if numbers else None

    def seen(self, span: ReadableSpan, signal: str) -> list[Any] | None:
        return self.values.get((signal, _key(span, signal)))


def _holds(cond: Condition, span: ReadableSpan, baseline: _Baseline) -> str | None:
    """Why ``cond`` holds on ``span`` (a short reason), or None."""
    value = _signal(span, cond.signal)
    if value is None:
        return None
    number = float(value) if isinstance(value, int | float) else None
    shown = f"{cond.signal}={_show(value)}"
    if cond.op == "above":
        return shown if number is not None and number > float(cond.value) else None
    if cond.op == "below":
        return shown if number is not None and number < float(cond.value) else None
    if cond.op == "equals":
        same = (
            value == cond.value if isinstance(cond.value, bool) else str(value) == str(cond.value)
        )
        return shown if same else None
    if cond.op == "above_baseline":
        p99 = baseline.p99(span, cond.signal)
        if number is None or p99 is None:
            return None
        fires = number > float(cond.value) * p99 and number - p99 > cond.min_excess
        return f"{shown} vs healthy p99 {_show(p99)}" if fires else None
    if cond.op == "changed":
        seen = baseline.seen(span, cond.signal)
        return f"{cond.signal} changed" if seen and value not in seen else None
    return None


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def match(mode: FailureMode, span: ReadableSpan, baseline: _Baseline) -> str | None:
    """The evidence that ``span`` shows ``mode``, or None."""
    if not all(_holds(c, span, baseline) for c in mode.where):
        return None
    for cond in mode.detect:
        reason = _holds(cond, span, baseline)
        if reason:
            return f"{span.name} {reason}"
    return None


# --- the collector, in-process ----------------------------------------------------------------


class _Collector:
    """The real otel-dl collector on loopback ports, with its fault store in a temp dir."""

    def __init__(self, catalog: Catalog, min_baseline_samples: int) -> None:
        from otel_dl.collector.config import load_config
        from otel_dl.collector.pipeline import Collector

        self._dir = tempfile.TemporaryDirectory(prefix="otel-dl-drill-")
        self.store = Path(self._dir.name) / "faults.sqlite"
        self.decision_wait = 0.2
        config = load_config(
            flags={
                "host": "127.0.0.1",
                "grpc_port": 0,
                "http_port": 0,
                "api_port": 0,
                "decision_wait": self.decision_wait,
                "early_grace": 0.05,
                "store": str(self.store),
                "queue_dir": str(Path(self._dir.name) / "queue"),
                "min_baseline_samples": min_baseline_samples,
            }
        )
        self.collector = Collector(config, catalog=catalog)
        self.collector.start()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        self.exporter = OTLPSpanExporter(
            endpoint=f"127.0.0.1:{self.collector.grpc_port}", insecure=True
        )

    def send(self, spans: Sequence[ReadableSpan]) -> None:
        """Send ``spans`` over OTLP/gRPC and wait until the collector decided them."""
        for start in range(0, len(spans), 512):
            self.exporter.export(list(spans[start : start + 512]))
        quiet = 0
        deadline = time.monotonic() + 30.0
        while quiet < 2 and time.monotonic() < deadline:
            time.sleep(self.decision_wait + 0.05)
            quiet = quiet + 1 if self.collector.decide_now() == 0 else 0

    def faults(self, trace_ids: set[str]) -> list[Any]:
        from otel_dl.collector.store import query_faults

        if not self.store.exists():
            return []
        return [row for row in query_faults(self.store) if row.trace_id in trace_ids]

    def close(self) -> None:
        self.exporter.shutdown()
        self.collector.stop()
        self._dir.cleanup()


def _trace_ids(spans: Sequence[ReadableSpan]) -> set[str]:
    return {f"{span.context.trace_id:032x}" for span in spans if span.context is not None}


# --- the drill --------------------------------------------------------------------------------


@dataclass
class _Run:
    spans: list[ReadableSpan] = field(default_factory=list)
    offered: set[str] = field(default_factory=set)
    applied: bool = False
    error: BaseException | None = None


def _run(pipeline: Pipeline, capture: _Capture, fault: Fault | None, runs: int) -> _Run:
    out = _Run()
    for _ in range(runs):
        faults = Faults(fault)
        with capture.recording() as spans:
            try:
                pipeline(faults)
            except Exception as exc:
                if fault is None:
                    raise DrillError(
                        f"the pipeline raised {type(exc).__name__} on a healthy run: {exc}; "
                        "a drill needs a pipeline that runs clean without faults"
                    ) from exc
                out.error = exc  # a failing fault run is what some drills are about
            finally:
                faults.close()
                _burst.drain()  # calls whose signals wait for a burst end their spans now
        out.spans.extend(spans)
        out.offered |= faults.offered
        out.applied = out.applied or faults.applied
    return out


def run_drills(
    pipeline: Pipeline,
    *,
    catalog: Catalog | None = None,
    modes: Sequence[str] | None = None,
    baseline_runs: int = 6,
    fault_runs: int = 2,
    recovery_runs: int = 2,
    collector: bool = False,
) -> DrillReport:
    """Drill ``pipeline`` with every mode of ``catalog`` (the collector's default catalog
    when None; only the ids in ``modes`` if given) and return the report.

    ``pipeline(faults)`` runs one pass of the user's pipeline, passing its parts through
    ``faults`` (:class:`otel_dl.testing.Faults`). It runs ``baseline_runs`` times healthy,
    then per mode ``fault_runs`` times with the fault and ``recovery_runs`` times healthy
    again (so windowed signals such as drift settle before the next mode). With
    ``collector``, the real collector attributes the runs' traces. Needs an SDK
    TracerProvider (``otel_dl.instrument()``) and the ``collector`` extra. While it runs,
    the objects that existed when it started are frozen out of Python's full garbage
    collections (see :func:`_short_collections`), so that a collection's pause does not
    make a healthy run look slow.
    """
    if baseline_runs < 1 or fault_runs < 1 or recovery_runs < 0:
        raise ValueError(
            "run_drills needs baseline_runs >= 1, fault_runs >= 1 and recovery_runs >= 0"
        )
    catalog = catalog or load_catalog()
    chosen = [m for m in catalog.modes if modes is None or m.id in modes]
    if modes is not None:
        unknown = set(modes) - {m.id for m in catalog.modes}
        if unknown:
            raise DrillError(
                f"no mode {sorted(unknown)} in the catalog; its modes are "
                + ", ".join(m.id for m in catalog.modes)
            )
    with _short_collections():
        return _drill_all(
            pipeline, catalog, chosen, baseline_runs, fault_runs, recovery_runs, collector
        )


@contextlib.contextmanager
def _short_collections() -> Iterator[None]:
    """Keep Python's full garbage collections short while the drill runs.

    A full collection walks every object the process holds: with torch, Feast and a test
    session loaded, a quarter of a second or more. One that lands in a healthy run makes
    that run's span look many times its usual duration, and the otel-dl collector rightly
    calls it slow. So the objects that exist when the drill starts are frozen
    (``gc.freeze()``), and handed back to Python's garbage collector afterwards
    (``gc.unfreeze()``). A process that froze objects itself keeps its own setting."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _drill_all(
    pipeline: Pipeline,
    catalog: Catalog,
    chosen: list[FailureMode],
    baseline_runs: int,
    fault_runs: int,
    recovery_runs: int,
    collector: bool,
) -> DrillReport:
    capture = _capture()
    healthy = _run(pipeline, capture, None, baseline_runs)
    signals = {c.signal for m in chosen for c in (*m.detect, *m.where)}
    baseline = _Baseline(healthy.spans, signals)
    sink = _Collector(catalog, min_baseline_samples=min(5, baseline_runs)) if collector else None
    report = DrillReport([], baseline_runs, fault_runs)
    try:
        if sink is not None:
            sink.send(healthy.spans)
            named = sink.faults(_trace_ids(healthy.spans))
            report.baseline_faults = len(named)
            report.baseline_fault_notes = [
                f"{row.mode} on {row.service}/{row.span_name}: {row.evidence}" for row in named
            ]
        for mode in chosen:
            report.results.append(
                _drill(pipeline, capture, mode, healthy, baseline, sink, fault_runs, recovery_runs)
            )
    finally:
        if sink is not None:
            sink.close()
    return report


def _drill(
    pipeline: Pipeline,
    capture: _Capture,
    mode: FailureMode,
    healthy: _Run,
    baseline: _Baseline,
    sink: _Collector | None,
    fault_runs: int,
    recovery_runs: int,
) -> DrillResult:
    fault = fault_for(mode)
    result = DrillResult(mode, fault)
    if fault is None:
        result.note = f"no injector for kind {mode.kind}"
        return result
    if fault.target not in healthy.offered:
        result.note = f"the pipeline passes no {fault.target} through faults.{fault.target}()"
        return result
    faulty = _run(pipeline, capture, fault, fault_runs)
    if not faulty.applied:
        result.note = f"{fault.action} does not apply to the pipeline's {fault.target}"
        return result
    result.drilled = True
    if faulty.error is not None:
        result.note = f"the pipeline raised {type(faulty.error).__name__}"
    already = next((e for s in healthy.spans if (e := match(mode, s, baseline))), None)
    found = [(s, e) for s in faulty.spans if (e := match(mode, s, baseline))]
    if already:
        result.evidence = f"already fires on healthy runs ({already})"
    elif found:
        result.detected = True
        result.evidence = found[0][1]
    result.service = _service(found[0][0]) if found else _service_of(faulty.spans)
    recovery = _run(pipeline, capture, None, recovery_runs) if recovery_runs else _Run()
    if sink is not None:
        sink.send(faulty.spans)
        rows = sink.faults(_trace_ids(faulty.spans))
        right = [r for r in rows if r.kind == mode.kind and r.service == result.service]
        result.attributed = bool(right)
        shown = (right or rows)[:1]
        if shown:
            row = shown[0]
            result.attribution = f"{row.service} {row.kind} ({row.mode}, {row.span_name})"
        sink.send(recovery.spans)
    return result


def _service_of(spans: Sequence[ReadableSpan]) -> str:
    return next((_service(s) for s in spans if _service(s)), "")

"""``otel_dl.instrument()``: the one call an application makes at startup.

It resolves the configuration (argument > environment > default), sets up the
OpenTelemetry providers when the application has not, and enables every installed
otel-dl instrumentor found under the ``opentelemetry_instrumentor`` entry-point group.
It is idempotent: a second call returns the same handle and instruments nothing twice;
its options are still checked, and any that differ from the active ones are named in a
warning, since they are not applied.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from multiprocessing import util as _mp_util
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from otel_dl import _burst, semconv
from otel_dl import _gpu as gpu
from otel_dl._config import Config, resolve_config, set_config
from otel_dl._propagation import ImportedFastAPI
from otel_dl._span import Hooks, RequestHook, ResponseHook
from otel_dl.provenance import code_version
from otel_dl.sampling import SignalAwareSpanProcessor

logger = logging.getLogger("otel_dl")

ENTRY_POINT_GROUP = "opentelemetry_instrumentor"
NAME_PREFIX = "otel_dl_"
# The standard OpenTelemetry instrumentations of the transports services call each other
# over. When one is installed (the `http` extra brings the common ones) and
# `propagation` is on, instrument() enables it, so a request from one instrumented
# service to another joins one trace with no further setup.
PROPAGATION_INSTRUMENTATIONS = (
    "requests",
    "httpx",
    "urllib3",
    "aiohttp_client",
    "aiohttp_server",
    "fastapi",
    "starlette",
    "flask",
    "django",
    "grpc_client",
    "grpc_server",
    "grpc_aio_client",
    "grpc_aio_server",
)


def _span_exporter(config: Config) -> SpanExporter | None:
    if config.traces_exporter == "none":
        return None
    if config.traces_exporter == "console":
        return ConsoleSpanExporter()
    kwargs: dict[str, Any] = {}
    fast = config.exporter_encoder == "fast"
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from otel_dl.export import FastOTLPHTTPSpanExporter

        if config.endpoint:
            kwargs["endpoint"] = config.endpoint.rstrip("/") + "/v1/traces"
        return FastOTLPHTTPSpanExporter(**kwargs) if fast else OTLPSpanExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpanExporter,
    )

    from otel_dl.export import FastOTLPSpanExporter

    if config.endpoint:
        kwargs["endpoint"] = config.endpoint
    return FastOTLPSpanExporter(**kwargs) if fast else GrpcSpanExporter(**kwargs)


def _metric_reader(config: Config) -> MetricReader | None:
    if config.metrics_exporter == "none":
        return None
    if config.metrics_exporter == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    kwargs: dict[str, Any] = {}
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        if config.endpoint:
            kwargs["endpoint"] = config.endpoint.rstrip("/") + "/v1/metrics"
        return PeriodicExportingMetricReader(OTLPMetricExporter(**kwargs))
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcMetricExporter,
    )

    if config.endpoint:
        kwargs["endpoint"] = config.endpoint
    return PeriodicExportingMetricReader(GrpcMetricExporter(**kwargs))


def _tracer_provider_is_set() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _meter_provider_is_set() -> bool:
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    return not isinstance(metrics.get_meter_provider(), _ProxyMeterProvider)


def _resource(config: Config) -> Resource:
    attributes: dict[str, str] = {SERVICE_NAME: config.service_name} if config.service_name else {}
    # One value per process: on the Resource it travels once per export batch, not per span.
    version = code_version(config.code_version)
    if version is not None:
        attributes[semconv.DL_CODE_VERSION] = version
    return Resource.create(attributes)


SHUTDOWN_TIMEOUT_MILLIS = 10_000
"""How long ``Instrumentation.shutdown()`` (and so the exit of the application) may wait
for a backend that is down or does not answer: one OTLP exporter timeout."""


def _bounded(work: Callable[[], Any], timeout_s: float) -> bool:
    """Run ``work`` on a daemon thread and wait at most ``timeout_s`` for it.

    The SDK's batch processor ignores the timeout of ``force_flush`` and its shutdown may
    wait for several export attempts, each as long as the exporter's timeout; behind a
    dead or hanging backend that made an application's exit take over a minute. Work
    still running at the deadline is left to finish (or die with the process) on its own
    thread. True when ``work`` finished in time.
    """
    done = threading.Event()

    def run() -> None:
        try:
            work()
        except Exception:
            logger.warning("otel-dl: flushing or shutting down telemetry failed", exc_info=True)
        finally:
            done.set()

    try:
        threading.Thread(target=run, name="otel-dl-flush", daemon=True).start()
    except RuntimeError:  # no new threads at interpreter shutdown: run it here
        run()
    return done.wait(max(timeout_s, 0.0))


@dataclass
class Instrumentation:
    """The handle ``instrument()`` returns.

    ``instrumented`` names the instrumentors it enabled; ``skipped`` maps the others to
    the reason. ``shutdown()`` flushes, uninstruments, and shuts down the providers
    ``instrument()`` created (never the application's own), within its timeout.
    """

    config: Config
    instrumented: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    _instrumentors: list[Any] = field(default_factory=list, repr=False)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every finished span and metric now, waiting at most ``timeout_millis``.

        False when the providers said the flush failed or it did not finish in time.
        """
        deadline = time.monotonic() + timeout_millis / 1000
        results: list[bool] = []

        def flush() -> None:
            # Spans still waiting for their GPU work or a burst of small calls' signals end
            # first, so the flush exports them.
            _burst.drain(max(deadline - time.monotonic(), 0.0))
            gpu.drain(deadline)
            tp = self.tracer_provider or trace.get_tracer_provider()
            if hasattr(tp, "force_flush"):
                results.append(bool(tp.force_flush(timeout_millis)))
            mp = self.meter_provider or metrics.get_meter_provider()
            if hasattr(mp, "force_flush"):
                remaining = max(int((deadline - time.monotonic()) * 1000), 0)
                results.append(bool(mp.force_flush(remaining)))

        finished = _bounded(flush, deadline - time.monotonic())
        return finished and all(results)

    def shutdown(self, timeout_millis: int = SHUTDOWN_TIMEOUT_MILLIS) -> None:
        """Flush, uninstrument every instrumentor, shut down the providers we created.

        Returns within about ``timeout_millis`` even when the backend is down or never
        answers; spans not exported by then are lost (and a warning says so).
        """
        global _active
        deadline = time.monotonic() + timeout_millis / 1000
        flushed = self.force_flush(timeout_millis)
        for instrumentor in reversed(self._instrumentors):
            try:
                instrumentor.uninstrument()
            except Exception:
                logger.warning("otel-dl: uninstrumenting %r failed", instrumentor, exc_info=True)
        self._instrumentors.clear()
        providers = [p for p in (self.tracer_provider, self.meter_provider) if p is not None]
        stopped = _bounded(
            lambda: [provider.shutdown() for provider in providers],
            deadline - time.monotonic(),
        )
        if not (flushed and stopped):
            logger.warning(
                "otel-dl: telemetry could not be flushed within %.1f s (is the OTLP backend"
                " down or not answering?); what was not exported by then is lost",
                timeout_millis / 1000,
            )
        with _lock:
            if _active is self:
                _active = None
                set_config(None)


_HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _termination_signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while the block runs; they take effect right after.

    A process on its way out is often sent SIGTERM as well (a pre-fork server stopping
    its workers), and a handler that raises SystemExit then would cut the flush short,
    losing the spans it was sending. The flush is bounded, so the delay is too. Only the
    main thread can set handlers; elsewhere, and for handlers set outside Python, the
    block runs as it is.
    """
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def hold(number: int, _frame: Any) -> None:
        caught.append(number)

    if threading.current_thread() is threading.main_thread():
        for held in _HELD_SIGNALS:
            if signal.getsignal(held) is not None:
                previous[held] = signal.signal(held, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def _shutdown_at_exit() -> None:
    """atexit: shut down the active handle, bounded, in place of the SDK's own unbounded
    shutdown of the providers ``instrument()`` created."""
    handle = _active
    if handle is not None:
        with _termination_signals_held():
            handle.shutdown()


def _flush_at_child_exit() -> None:
    """multiprocessing finalizer: flush what a child process queued before it exits.

    multiprocessing ends a child (``fork`` and ``forkserver`` start methods, DataLoader
    workers among them) with ``os._exit()``, which skips atexit and so every provider's
    shutdown: the spans still queued in the child's batch processor were lost. It runs
    its own finalizers first, and this is one of them.
    """
    handle = _active
    if handle is not None:
        with _termination_signals_held():
            handle.force_flush(SHUTDOWN_TIMEOUT_MILLIS)


class _ChildExitHook:
    """Registers :func:`_flush_at_child_exit` in this process when it is a multiprocessing
    child, and in every multiprocessing child forked from it later (multiprocessing drops
    the finalizers a child inherits, then calls the hooks registered for after a fork)."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def install(self) -> None:
        pid = os.getpid()
        if self.pid == pid:
            return
        if self.pid is None:  # a forked child inherits the registration
            _mp_util.register_after_fork(self, _ChildExitHook._in_child)
        self.pid = pid
        if multiprocessing.parent_process() is not None:
            _mp_util.Finalize(None, _flush_at_child_exit, exitpriority=10)

    def _in_child(self) -> None:
        self.pid = os.getpid()
        _mp_util.Finalize(None, _flush_at_child_exit, exitpriority=10)


_child_exit_hook = _ChildExitHook()
_atexit_registered = False


_lock = threading.RLock()
_active: Instrumentation | None = None


def _wanted(name: str, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    short = name[len(NAME_PREFIX) :]
    if name in exclude or short in exclude:
        return "excluded by OTEL_PYTHON_DISABLED_INSTRUMENTATIONS or exclude="
    if include and name.startswith(NAME_PREFIX) and name not in include and short not in include:
        return "not in OTEL_DL_INSTRUMENTATIONS or include="
    return None


def _entry_points(propagation: bool) -> list[EntryPoint]:
    found = entry_points(group=ENTRY_POINT_GROUP)
    wanted = [
        ep
        for ep in found
        if ep.name.startswith(NAME_PREFIX)
        or (propagation and ep.name in PROPAGATION_INSTRUMENTATIONS)
    ]
    return sorted(wanted, key=lambda e: e.name)


def instrument(
    service_name: str | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    request_hook: RequestHook | None = None,
    response_hook: ResponseHook | None = None,
    **options: Any,
) -> Instrumentation:
    """Set up tracing for a DL application; call once at startup.

    ``service_name`` becomes the Resource's ``service.name``. ``include``/``exclude``
    name instrumentors (``dataloader`` or ``otel_dl_dataloader``). ``request_hook(span,
    call)`` and ``response_hook(span, call, result)`` run on every otel-dl span. Every
    other option of the README's configuration table may be given by keyword, e.g.
    ``instrument("scorer", drift_method="js", traces_exporter="console")``; an argument
    wins over its environment variable, which wins over the default.

    Providers already set by the application are used as they are, never replaced.
    """
    global _active, _atexit_registered
    with _lock:
        overrides = dict(options)
        overrides.update(service_name=service_name, include=include, exclude=exclude)
        if _active is not None:
            _warn_not_applied(_active, overrides, request_hook, response_hook)
            return _active
        config = resolve_config(overrides)
        set_config(config)
        handle = Instrumentation(config=config)
        if not _tracer_provider_is_set():
            # The bounded shutdown registered below replaces the SDK's exit hook.
            provider = TracerProvider(resource=_resource(config), shutdown_on_exit=False)
            exporter = _span_exporter(config)
            if exporter is not None:
                from otel_dl.export import DropCountingSpanProcessor

                processor: SpanProcessor = DropCountingSpanProcessor(exporter)
                if config.sample_every > 1:
                    processor = SignalAwareSpanProcessor(
                        processor, config.sample_every, presample=True
                    )
                provider.add_span_processor(processor)
            trace.set_tracer_provider(provider)
            handle.tracer_provider = provider
        reader = None if _meter_provider_is_set() else _metric_reader(config)
        if reader is not None:
            # No reader (metrics_exporter "none"): no provider, so that nothing is
            # aggregated per call for nobody; the API's no-op meter takes the records.
            meter_provider = MeterProvider(
                resource=_resource(config),
                metric_readers=[reader],
                shutdown_on_exit=False,
            )
            metrics.set_meter_provider(meter_provider)
            handle.meter_provider = meter_provider
        hooks = Hooks(request_hook, response_hook)
        for ep in _entry_points(config.propagation):
            reason = _wanted(ep.name, config.include, config.exclude)
            if reason is None:
                reason = _enable(ep, handle, hooks)
            if reason is not None:
                handle.skipped[ep.name] = reason
        _active = handle
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_shutdown_at_exit)
        _child_exit_hook.install()
        logger.debug("otel-dl instrumented %s; skipped %s", handle.instrumented, handle.skipped)
        return handle


def _warn_not_applied(
    active: Instrumentation,
    overrides: dict[str, Any],
    request_hook: RequestHook | None,
    response_hook: ResponseHook | None,
) -> None:
    """A repeated ``instrument()`` call returns the active handle; what it asked for
    differently is checked as the first call's was (a bad value raises ConfigError) and
    named in a warning, never silently dropped."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if not given and request_hook is None and response_hook is None:
        logger.debug("otel_dl.instrument() called again; returning the active handle")
        return
    config = resolve_config(overrides)
    ignored = [
        f"{name}={getattr(config, name)!r}"
        for name in given
        if getattr(config, name) != getattr(active.config, name)
    ]
    ignored += [
        name
        for name, hook in (("request_hook", request_hook), ("response_hook", response_hook))
        if hook is not None
    ]
    if ignored:
        logger.warning(
            "otel_dl.instrument() was called again: the active instrumentation is returned "
            "and this call's %s is not applied. To change the configuration, call "
            "shutdown() on the handle first, then instrument() again.",
            ", ".join(ignored),
        )


def _enable(ep: EntryPoint, handle: Instrumentation, hooks: Hooks) -> str | None:
    """Instrument one entry point; returns why it was skipped, or None."""
    try:
        instrumentor_cls = ep.load()
    except ImportError as exc:
        return f"not importable: {exc}"
    instrumentor = instrumentor_cls()
    if instrumentor.is_instrumented_by_opentelemetry:
        # Already on, e.g. under `opentelemetry-instrument`: adopt it, do not re-wrap.
        handle.instrumented.append(ep.name)
        handle._instrumentors.append(instrumentor)
        return None
    conflict = instrumentor._check_dependency_conflicts()
    if conflict is not None:
        return str(conflict)
    if ep.name.startswith(NAME_PREFIX):
        instrumentor.instrument(hooks=hooks)
    else:
        instrumentor.instrument(skip_dep_check=True)
    if not instrumentor.is_instrumented_by_opentelemetry:
        return "instrument() did not take effect"
    handle.instrumented.append(ep.name)
    handle._instrumentors.append(instrumentor)
    if ep.name == "fastapi":
        # Apps made from a FastAPI class imported before instrument() (see _propagation).
        imported = ImportedFastAPI()
        if imported.instrument():
            handle._instrumentors.append(imported)
    return None

"""``otel_dl.instrument()``: the one call an application makes at startup.

It resolves the configuration (argument > environment > default), sets up the
OpenTelemetry providers when the application has not, and enables every installed
otel-dl instrumentor found under the ``opentelemetry_instrumentor`` entry-point group.
It is idempotent: a second call returns the same handle and instruments nothing twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
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

from otel_dl._config import Config, resolve_config, set_config
from otel_dl._span import Hooks, RequestHook, ResponseHook
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
    attributes = {SERVICE_NAME: config.service_name} if config.service_name else {}
    return Resource.create(attributes)


@dataclass
class Instrumentation:
    """The handle ``instrument()`` returns.

    ``instrumented`` names the instrumentors it enabled; ``skipped`` maps the others to
    the reason. ``shutdown()`` flushes, uninstruments, and shuts down the providers
    ``instrument()`` created (never the application's own).
    """

    config: Config
    instrumented: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    _instrumentors: list[Any] = field(default_factory=list, repr=False)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every finished span and metric now."""
        ok = True
        tp = self.tracer_provider or trace.get_tracer_provider()
        if hasattr(tp, "force_flush"):
            ok = bool(tp.force_flush(timeout_millis)) and ok
        mp = self.meter_provider or metrics.get_meter_provider()
        if hasattr(mp, "force_flush"):
            ok = bool(mp.force_flush(timeout_millis)) and ok
        return ok

    def shutdown(self) -> None:
        """Flush, uninstrument every instrumentor, shut down the providers we created."""
        global _active
        self.force_flush()
        for instrumentor in reversed(self._instrumentors):
            try:
                instrumentor.uninstrument()
            except Exception:
                logger.warning("otel-dl: uninstrumenting %r failed", instrumentor, exc_info=True)
        self._instrumentors.clear()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        with _lock:
            if _active is self:
                _active = None
                set_config(None)


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
    global _active
    with _lock:
        if _active is not None:
            logger.debug("otel_dl.instrument() called again; returning the active handle")
            return _active
        overrides = dict(options)
        overrides.update(service_name=service_name, include=include, exclude=exclude)
        config = resolve_config(overrides)
        set_config(config)
        handle = Instrumentation(config=config)
        if not _tracer_provider_is_set():
            provider = TracerProvider(resource=_resource(config))
            exporter = _span_exporter(config)
            if exporter is not None:
                from otel_dl.export import DropCountingSpanProcessor

                processor: SpanProcessor = DropCountingSpanProcessor(exporter)
                if config.sample_every > 1:
                    processor = SignalAwareSpanProcessor(processor, config.sample_every)
                provider.add_span_processor(processor)
            trace.set_tracer_provider(provider)
            handle.tracer_provider = provider
        if not _meter_provider_is_set():
            reader = _metric_reader(config)
            meter_provider = MeterProvider(
                resource=_resource(config), metric_readers=[reader] if reader else []
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
        logger.debug("otel-dl instrumented %s; skipped %s", handle.instrumented, handle.skipped)
        return handle


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
    return None

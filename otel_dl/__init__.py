"""otel-dl: OpenTelemetry tracing for deep-learning pipelines.

Call ``otel_dl.instrument()`` once at startup. Data-loader batches, feature lookups and
model calls then become spans carrying provenance, drift, data quality and prediction
confidence; view them in Jaeger or Grafana Tempo::

    import otel_dl

    otel_dl.instrument(service_name="scorer")
    with otel_dl.attributes(experiment="baseline-v2"):
        for batch in loader:
            model(batch)

The public API is what this module exports; everything else is private.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from otel_dl._version import __version__

if TYPE_CHECKING:
    from otel_dl import confidence, drift, semconv
    from otel_dl._config import Config, ConfigError
    from otel_dl._context import attributes
    from otel_dl._guard import internal_error_counts
    from otel_dl._instrument import Instrumentation, instrument
    from otel_dl._span import DlCall, Hooks
    from otel_dl._stage import StageSpan, stage
    from otel_dl._watch import watch
    from otel_dl.breaker import Guarded, GuardPolicy, guard
    from otel_dl.calibration import CalibrationTracker
    from otel_dl.export import (
        DropCountingSpanProcessor,
        FastOTLPHTTPSpanExporter,
        FastOTLPSpanExporter,
    )
    from otel_dl.monitor import FeatureMonitor
    from otel_dl.reference import Reference, ReferenceFileError
    from otel_dl.sampling import SignalAwareSpanProcessor

# Where each public name lives. They are imported on first use (PEP 562), so a process
# that needs only a light part of the package (the collector reads ``otel_dl.semconv``)
# does not load numpy and the OpenTelemetry SDK: about 40 MiB of resident memory.
_EXPORTS = {
    "CalibrationTracker": "otel_dl.calibration",
    "Config": "otel_dl._config",
    "ConfigError": "otel_dl._config",
    "DlCall": "otel_dl._span",
    "DropCountingSpanProcessor": "otel_dl.export",
    "FastOTLPHTTPSpanExporter": "otel_dl.export",
    "FastOTLPSpanExporter": "otel_dl.export",
    "FeatureMonitor": "otel_dl.monitor",
    "GuardPolicy": "otel_dl.breaker",
    "Guarded": "otel_dl.breaker",
    "Hooks": "otel_dl._span",
    "Instrumentation": "otel_dl._instrument",
    "Reference": "otel_dl.reference",
    "ReferenceFileError": "otel_dl.reference",
    "SignalAwareSpanProcessor": "otel_dl.sampling",
    "StageSpan": "otel_dl._stage",
    "attributes": "otel_dl._context",
    "guard": "otel_dl.breaker",
    "instrument": "otel_dl._instrument",
    "internal_error_counts": "otel_dl._guard",
    "stage": "otel_dl._stage",
    "watch": "otel_dl._watch",
}


def __getattr__(name: str) -> Any:
    """A public name, or a submodule, imported on first use."""
    module = _EXPORTS.get(name)
    if name.startswith("__"):
        raise AttributeError(f"module 'otel_dl' has no attribute {name!r}")
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:
        try:
            value = importlib.import_module(f"otel_dl.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"otel_dl.{name}":
                raise
            raise AttributeError(f"module 'otel_dl' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "CalibrationTracker",
    "Config",
    "ConfigError",
    "DlCall",
    "DropCountingSpanProcessor",
    "FastOTLPHTTPSpanExporter",
    "FastOTLPSpanExporter",
    "FeatureMonitor",
    "GuardPolicy",
    "Guarded",
    "Hooks",
    "Instrumentation",
    "Reference",
    "ReferenceFileError",
    "SignalAwareSpanProcessor",
    "StageSpan",
    "__version__",
    "attributes",
    "confidence",
    "drift",
    "guard",
    "instrument",
    "internal_error_counts",
    "semconv",
    "stage",
    "watch",
]

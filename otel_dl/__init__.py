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

from otel_dl import confidence, drift, semconv
from otel_dl._config import Config, ConfigError
from otel_dl._context import attributes
from otel_dl._guard import internal_error_counts
from otel_dl._instrument import Instrumentation, instrument
from otel_dl._span import DlCall, Hooks
from otel_dl._stage import StageSpan, stage
from otel_dl._version import __version__
from otel_dl._watch import watch
from otel_dl.calibration import CalibrationTracker
from otel_dl.export import (
    DropCountingSpanProcessor,
    FastOTLPHTTPSpanExporter,
    FastOTLPSpanExporter,
)
from otel_dl.guard import Guarded, GuardPolicy, guard
from otel_dl.monitor import FeatureMonitor
from otel_dl.reference import Reference, ReferenceFileError
from otel_dl.sampling import SignalAwareSpanProcessor

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

"""The one span-and-signal helper every instrumentor and ``otel_dl.stage`` goes through.

An instrumentor's wrapper reads like "patch this, extract that"::

    def _wrap_predict(wrapped, instance, args, kwargs):
        return traced_call(
            wrapped, instance, args, kwargs,
            site="sklearn.predict", name="inference", stage=semconv.STAGE_INFERENCE,
            component=semconv.COMPONENT_SKLEARN, after=extract_signals, hooks=hooks,
        )

``traced_call`` checks suppression first, starts the span as the current span, runs
the ``before``/``after`` extractors and the user's hooks inside the guard, records the
user's exception on the span (status ERROR, ``error.type``) and re-raises it unchanged,
and records the signal metrics for every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from otel_dl import semconv
from otel_dl._config import get_config
from otel_dl._context import current_attributes
from otel_dl._guard import instrumentation_enabled, report_internal_error
from otel_dl._version import __version__
from otel_dl.sampling import sampling_rate

Attributes = dict[str, AttributeValue]

_tracer = trace.get_tracer("otel_dl", __version__)


@dataclass
class DlCall:
    """What a hook sees of an instrumented call."""

    component: str
    instance: Any
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


RequestHook = Callable[[Span, DlCall], None]
ResponseHook = Callable[[Span, DlCall, Any], None]


@dataclass(frozen=True)
class Hooks:
    """The ``request_hook``/``response_hook`` pair an instrumentor was given."""

    request: RequestHook | None = None
    response: ResponseHook | None = None


NO_HOOKS = Hooks()


@dataclass
class _Instruments:
    duration: metrics.Histogram
    rows: metrics.Counter
    predictions: metrics.Counter
    drift: metrics.Histogram
    nan_fraction: metrics.Histogram
    out_of_range: metrics.Histogram
    confidence: metrics.Histogram
    provider: object = field(default=None)


_instruments: _Instruments | None = None


def _get_instruments() -> _Instruments:
    global _instruments
    provider = metrics.get_meter_provider()
    if _instruments is None or _instruments.provider is not provider:
        meter = metrics.get_meter("otel_dl", __version__)

        def histogram(name: str) -> metrics.Histogram:
            spec = semconv.METRICS[name]
            return meter.create_histogram(name, unit=spec.unit, description=spec.brief)

        def counter(name: str) -> metrics.Counter:
            spec = semconv.METRICS[name]
            return meter.create_counter(name, unit=spec.unit, description=spec.brief)

        _instruments = _Instruments(
            duration=histogram(semconv.METRIC_OPERATION_DURATION),
            rows=counter(semconv.METRIC_BATCH_ROWS),
            predictions=counter(semconv.METRIC_PREDICTIONS),
            drift=histogram(semconv.METRIC_DRIFT_SCORE),
            nan_fraction=histogram(semconv.METRIC_QUALITY_NAN_FRACTION),
            out_of_range=histogram(semconv.METRIC_QUALITY_OUT_OF_RANGE_FRACTION),
            confidence=histogram(semconv.METRIC_CONFIDENCE_MEAN),
            provider=provider,
        )
    return _instruments


def record_metrics(
    attrs: Mapping[str, AttributeValue], duration_s: float, feature_count: int | None = None
) -> None:
    """Feed a finished span's signals to the metrics, with low-cardinality attributes only."""
    inst = _get_instruments()
    labels: Attributes = {}
    for key in (semconv.DL_STAGE, semconv.DL_COMPONENT, semconv.DL_MODEL_NAME):
        value = attrs.get(key)
        if value is not None:
            labels[key] = value
    inst.duration.record(duration_s, labels)
    rows = attrs.get(semconv.DL_BATCH_SIZE)
    if isinstance(rows, int):
        inst.rows.add(rows, labels)
    predictions = attrs.get(semconv.DL_PREDICTION_COUNT)
    if isinstance(predictions, int):
        inst.predictions.add(predictions, labels)
    drift = attrs.get(semconv.DL_DRIFT_SCORE)
    if isinstance(drift, float):
        drift_labels = labels
        feature = attrs.get(semconv.DL_DRIFT_FEATURE)
        cap = get_config().metrics_max_features
        if feature is not None and feature_count is not None and feature_count <= cap:
            drift_labels = {**labels, semconv.DL_DRIFT_FEATURE: feature}
        inst.drift.record(drift, drift_labels)
    for key, instrument in (
        (semconv.DL_QUALITY_NAN_FRACTION, inst.nan_fraction),
        (semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION, inst.out_of_range),
        (semconv.DL_CONFIDENCE_MEAN, inst.confidence),
    ):
        value = attrs.get(key)
        if isinstance(value, float):
            instrument.record(value, labels)


def base_attributes(
    stage: str, component: str, extra: Mapping[str, AttributeValue] | None = None
) -> Attributes:
    """``dl.stage``, ``dl.component``, the user's ``otel_dl.attributes()`` and ``extra``."""
    attrs: Attributes = {semconv.DL_STAGE: stage, semconv.DL_COMPONENT: component}
    custom = current_attributes()
    if custom:
        attrs.update(custom)
    if extra:
        attrs.update(extra)
    return attrs


def start_span(
    name: str,
    attrs: Attributes,
    *,
    start_time: int | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span:
    return _tracer.start_span(name, kind=kind, attributes=attrs, start_time=start_time)


def record_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed by the user's exception ``exc`` (which the caller re-raises)."""
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.set_attribute("error.type", type(exc).__qualname__)
    span.record_exception(exc, escaped=True)


def finish_span(
    span: Span,
    attrs: Mapping[str, AttributeValue],
    start_ns: int,
    end_ns: int | None = None,
    feature_count: int | None = None,
) -> None:
    """Set the extracted attributes, record metrics and end the span."""
    end_ns = time.time_ns() if end_ns is None else end_ns
    if attrs:
        span.set_attributes(attrs)
    if span.is_recording():
        every = {**_span_attributes(span), **attrs}
        duration_s = (end_ns - start_ns) / 1e9
        record_metrics(every, duration_s, feature_count)
        config = get_config()
        if config.sample_every > 1:
            status = getattr(span, "status", None)
            error = status is not None and status.status_code is StatusCode.ERROR
            span.set_attribute(
                semconv.DL_SAMPLING_RATE, sampling_rate(every, error, duration_s, config)
            )
    span.end(end_time=end_ns)


def _span_attributes(span: Span) -> Mapping[str, AttributeValue]:
    return getattr(span, "attributes", None) or {}


Extractor = Callable[[DlCall], Attributes | None]
ResultExtractor = Callable[[DlCall, Any], Attributes | None]
KeepOpen = Callable[[Span, DlCall, Any, int, int], bool]


def traced_call(
    wrapped: Callable[..., Any],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    site: str,
    name: str,
    stage: str,
    component: str,
    before: Extractor | None = None,
    after: ResultExtractor | None = None,
    hooks: Hooks = NO_HOOKS,
    attributes: Mapping[str, AttributeValue] | None = None,
    keep_open: KeepOpen | None = None,
) -> Any:
    """Call ``wrapped(*args, **kwargs)`` inside an otel-dl span; see the module docstring.

    ``before`` runs before the call and may return attributes; ``after`` runs on the
    result and may return attributes (the signals). Neither can break the call.
    ``keep_open(span, call, result, start_ns, end_ns)`` returning True leaves the span
    open after a successful call, for work the result does later (a lazy job); the
    caller then ends it.
    """
    if not instrumentation_enabled():
        return wrapped(*args, **kwargs)
    span: Span | None = None
    token = None
    call = DlCall(component, instance, args, kwargs)
    start_ns = time.time_ns()
    try:
        attrs = base_attributes(stage, component, attributes)
        if before is not None:
            attrs.update(before(call) or {})
        span = start_span(name, attrs, start_time=start_ns)
        token = context.attach(trace.set_span_in_context(span))
    except Exception:
        report_internal_error(site)
    if span is not None and hooks.request is not None:
        try:
            hooks.request(span, call)
        except Exception:
            report_internal_error(f"{site}.request_hook")
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        end_ns = time.time_ns()
        if token is not None:
            context.detach(token)
        if span is not None:
            try:
                record_error(span, exc)
                finish_span(span, {}, start_ns, end_ns)
            except Exception:
                report_internal_error(site)
        raise
    end_ns = time.time_ns()
    if token is not None:
        context.detach(token)
    if span is not None:
        extracted: Attributes | None = None
        try:
            if after is not None:
                extracted = after(call, result)
        except Exception:
            report_internal_error(site)
        if hooks.response is not None:
            try:
                hooks.response(span, call, result)
            except Exception:
                report_internal_error(f"{site}.response_hook")
        try:
            if keep_open is not None and keep_open(span, call, result, start_ns, end_ns):
                if extracted:
                    span.set_attributes(extracted)
                return result
            finish_span(span, extracted or {}, start_ns, end_ns)
        except Exception:
            report_internal_error(site)
            span.end(end_time=end_ns)
    return result
